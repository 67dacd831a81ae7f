"""``hlip-fed certs``: create the consortium CA, the SuperLink TLS certificate and site keys.

``init`` runs once at the consortium operator; ``server`` renews the SuperLink certificate from
the same CA; ``site`` runs at each hospital, which sends only ``NAME.pub`` to the operator for
enrolment; ``list`` shows expiry so renewals are not missed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("certs",
                                   help="create and inspect TLS certificates and site keys",
                                   description="Create the consortium CA, the SuperLink TLS "
                                               "certificate and site keys; show their expiry.")
    sub = parser.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    init = sub.add_parser("init", help="create the CA and the SuperLink TLS certificate")
    _add_name_args(init, "folder for the SuperLink host: superlink.crt/.key and a copy of ca.crt")
    init.add_argument("--ca-out", type=Path, required=True,
                      help="folder for the CA (ca.key, ca.crt): keep it offline, never on the SuperLink host")
    init.add_argument("--ca-days", type=int, default=3650, help="CA validity (default 3650)")
    init.add_argument("--days", type=int, default=90,
                      help="SuperLink certificate validity (default 90; rotate with `certs server`)")
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(func=_init)

    server = sub.add_parser("server", help="issue a new SuperLink certificate from the existing "
                                           "CA (renewal or new address; sites keep ca.crt)")
    _add_name_args(server, "folder for the new superlink.crt/.key (and ca.crt)")
    server.add_argument("--ca", type=Path, help="the CA folder holding ca.crt and ca.key (default: --out)")
    server.add_argument("--days", type=int, default=90, help="validity (default 90)")
    server.add_argument("--force", action="store_true",
                        help="replace the existing superlink.crt/superlink.key")
    server.set_defaults(func=_server)

    site = sub.add_parser("site", help="create a site's authentication key pair")
    site.add_argument("name", help="site name, e.g. hospital-a")
    site.add_argument("--out", type=Path, required=True, help="directory for NAME.key / NAME.pub")
    site.add_argument("--curve", choices=["P-256", "P-384"], default="P-384")
    site.add_argument("--force", action="store_true", help="replace an existing key pair")
    site.set_defaults(func=_site)

    lst = sub.add_parser("list", help="show certificates (SANs, expiry) and keys in a directory")
    lst.add_argument("dir", type=Path, nargs="?", default=Path("."))
    lst.set_defaults(func=_list)


def _add_name_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--server-name", required=True,
                        help="host name or IP address the sites use to reach the SuperLink")
    parser.add_argument("--ip", action="append", default=[], metavar="ADDR",
                        help="further IP address for the certificate (repeatable)")
    parser.add_argument("--dns", action="append", default=[], metavar="NAME",
                        help="further DNS name for the certificate (repeatable)")
    parser.add_argument("--no-loopback", action="store_true",
                        help="leave localhost/127.0.0.1/::1 out (not for `server start`: the "
                             "gateway and the operator reach the SuperLink on 127.0.0.1)")


def _server(args: argparse.Namespace) -> int:
    from hlip_fed.security.pki import load_certificate, reissue_server_cert, subject_alt_names

    paths = reissue_server_cert(args.out, args.server_name, [*args.dns, *args.ip],
                                include_loopback=not args.no_loopback, server_days=args.days,
                                force=args.force, ca_dir=args.ca)
    cert = load_certificate(paths.server_cert)
    print(f"SuperLink: {paths.server_cert}  (key {paths.server_key}), signed by {paths.ca_cert}")
    print(f"           valid for {', '.join(subject_alt_names(cert))} "
          f"until {cert.not_valid_after_utc:%Y-%m-%d}; restart the SuperLink to use it")
    return 0


def _init(args: argparse.Namespace) -> int:
    from hlip_fed.security.pki import init_pki, load_certificate, subject_alt_names

    paths = init_pki(args.out, args.server_name, [*args.dns, *args.ip],
                     include_loopback=not args.no_loopback, ca_days=args.ca_days,
                     server_days=args.days, force=args.force, ca_out=args.ca_out)
    cert = load_certificate(paths.server_cert)
    print(f"CA:        {args.ca_out / 'ca.crt'}  (key {args.ca_out / 'ca.key'}: keep offline with the operator)")
    print(f"SuperLink: {paths.server_cert}  (key {paths.server_key}; copy {paths.directory} to the server)")
    print(f"           valid for {', '.join(subject_alt_names(cert))} until {cert.not_valid_after_utc:%Y-%m-%d}; "
          f"renew with `hlip-fed certs server --ca {args.ca_out} --out {paths.directory} --force`")
    print(f"Give {paths.ca_cert.name} to every site.")
    return 0


def _site(args: argparse.Namespace) -> int:
    from hlip_fed.security.site_keys import create_site_key, fingerprint, load_site_public_key

    paths = create_site_key(args.name, args.out, args.curve, args.force)
    fp = fingerprint(load_site_public_key(paths.public))
    print(f"private key: {paths.private}  (stays at the site)")
    print(f"public key:  {paths.public}  (send to the consortium operator for enrolment)")
    print(f"fingerprint: {fp}  (confirm it with the operator by a second channel)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from hlip_fed.security.inventory import inventory

    entries = inventory(args.dir)
    if not entries:
        print(f"no certificates or keys in {args.dir}")
        return 0
    width = max(len(e.path.name) for e in entries)
    for e in entries:
        flag = f"  !! {'; '.join(e.warnings)}" if e.warnings else ""
        print(f"{e.path.name:<{width}}  {e.kind:<11}  {e.summary}{flag}")
    return 1 if any(e.warnings for e in entries) else 0
