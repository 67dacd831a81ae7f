"""``hlip-fed site``: a hospital's site folder, its enrolment, and its SuperNode.

``index`` and ``check`` work on the site folder (layout in ``docs/site-layout.md``); ``start``
runs at the hospital (``check`` first, then ``flower-supernode`` and the site's launcher, which
runs approved app versions only: ``approve``, ``approvals``, ``disapprove``), and ``policy check``
shows what the site's policy would refuse; ``enroll``, ``revoke`` and ``list`` run at the
consortium operator, on the SuperLink host (``docs/deployment.md``).
Subcommands are added by small ``_add_<name>(sub)`` functions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("site", help="site folders, site enrolment, a site's SuperNode")
    sub = parser.add_subparsers(dest="site_command", required=True, metavar="SUBCOMMAND")
    _add_index(sub)
    _add_check(sub)
    _add_start(sub)
    _add_enroll(sub)
    _add_revoke(sub)
    _add_list(sub)
    _add_policy(sub)
    _add_approvals(sub)


def _add_policy(sub) -> None:
    p = sub.add_parser("policy", help="the site's policy: what the server may ask of this site")
    actions = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = actions.add_parser("check", help="what the site would refuse in a run config (exit 1 if anything)")
    check.add_argument("--state", type=Path, required=True, help="the site's state folder (holds policy.yaml)")
    check.add_argument("--policy", type=Path, help="a policy file instead of STATE/policy.yaml")
    check.add_argument("--run-config", required=True,
                       help="as for flwr run, e.g. \"config='demo' overrides='federation.rounds=5'\"")
    check.set_defaults(func=_policy_check)
    show = actions.add_parser("show", help="print the policy in force (the default when there is none)")
    show.add_argument("--state", type=Path, required=True)
    show.add_argument("--policy", type=Path)
    show.set_defaults(func=_policy_show)


def _add_approvals(sub) -> None:
    for name, help_text, func in (("approve", "approve an app version (its FAB's SHA-256, or the .fab)", _approve),
                                  ("disapprove", "withdraw an app version's approval", _disapprove)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--state", type=Path, required=True, help="the site's state folder (as for site start)")
        p.add_argument("app", metavar="HASH_OR_FAB", help="hlip-fed app build prints both")
        p.set_defaults(func=func)
    p = sub.add_parser("approvals", help="the app versions this site runs")
    p.add_argument("--state", type=Path, required=True)
    p.set_defaults(func=_approvals)


def _approve(args: argparse.Namespace) -> int:
    from hlip_fed.security.approvals import approve

    print(f"approved {approve(args.state, args.app)}")
    return 0


def _disapprove(args: argparse.Namespace) -> int:
    from hlip_fed.security.approvals import disapprove

    print(f"no longer approved {disapprove(args.state, args.app)}")
    return 0


def _approvals(args: argparse.Namespace) -> int:
    from hlip_fed.security.approvals import read_approvals

    approvals = read_approvals(args.state)
    for fab_hash, entry in sorted(approvals.items(), key=lambda item: item[1].get("approved", "")):
        print(f"{fab_hash}  approved {entry.get('approved', '?')}  from {entry.get('from', '?')}")
    if not approvals:
        print("no app version is approved: this site runs nothing (hlip-fed site approve)")
    return 0


def _parse_run_config(text: str) -> dict[str, str]:
    """``key='value' key2="v w"`` (flwr run's --run-config) as a dict of strings."""
    import shlex

    from hlip_fed.errors import HlipError

    out = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HlipError(f"--run-config: {item!r} is not KEY=VALUE")
        out[key.strip()] = value
    return out


def _policy_check(args: argparse.Namespace) -> int:
    from hlip_fed.security.policy import check_run_config, site_policy

    policy = site_policy(args.state, str(args.policy) if args.policy else None, deployed=True)
    refused = check_run_config(_parse_run_config(args.run_config), policy)
    for reason in refused:
        print(f"refused: {reason}")
    if not refused:
        print("the site's policy allows this run config")
    return 1 if refused else 0


def _policy_show(args: argparse.Namespace) -> int:
    from hlip_fed.security.policy import policy_yaml, site_policy

    print(policy_yaml(site_policy(args.state, str(args.policy) if args.policy else None, deployed=True)), end="")
    return 0


def _add_start(sub) -> None:
    p = sub.add_parser("start", help="check the site folder, then run flower-supernode (foreground)")
    p.add_argument("--superlink", required=True, help="the consortium's fleet address HOST:PORT")
    p.add_argument("--ca", type=Path, required=True, help="the consortium's ca.crt")
    p.add_argument("--key", type=Path, required=True, help="this site's private key (NAME.key)")
    p.add_argument("--data", type=Path, required=True, help="the site folder")
    p.add_argument("--state", type=Path,
                   help="caches, optimiser state, audit log (default $XDG_STATE_HOME/hlip-fed/NAME)")
    p.add_argument("--name", help="site name (default: the key file's name)")
    p.add_argument("--truth", type=Path, help="labels of the site's test split, for local metrics")
    p.add_argument("--runtime-port", type=int, default=9094,
                   help="loopback port for the node's ClientApp processes (default 9094)")
    p.add_argument("--node-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a further node-config entry (repeatable)")
    p.add_argument("--skip-check", action="store_true", help="do not read every scan first")
    p.add_argument("--policy", type=Path,
                   help="the site's policy file (default STATE/policy.yaml, else the safe default)")
    p.set_defaults(func=_start)


def _add_enroll(sub) -> None:
    p = sub.add_parser("enroll", help="operator: register a site's public key on the SuperLink")
    p.add_argument("name", help="site name, e.g. hospital-a")
    p.add_argument("--key", type=Path, required=True, help="the site's NAME.pub")
    p.add_argument("--state", type=Path, required=True, help="the SuperLink's state folder")
    p.set_defaults(func=_enroll)


def _add_revoke(sub) -> None:
    p = sub.add_parser("revoke", help="operator: unregister a site's key; its node is refused at once")
    p.add_argument("name")
    p.add_argument("--state", type=Path, required=True, help="the SuperLink's state folder")
    p.set_defaults(func=_revoke)


def _add_list(sub) -> None:
    p = sub.add_parser("list", help="operator: enrolled sites with node IDs and status")
    p.add_argument("--state", type=Path, required=True, help="the SuperLink's state folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="write the site manifest (one line per study) from the folder")
    p.add_argument("dir", help="site folder")
    p.add_argument("--out", help="manifest path (default DIR/manifest.jsonl)")
    p.set_defaults(func=_index)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="read every study once and list what training can use")
    p.add_argument("dir", help="site folder")
    p.add_argument("--manifest", help="manifest to check (default DIR/manifest.jsonl, else the folder)")
    p.add_argument("--split", action="append", help="only this split (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_check)


def _index(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hlip_fed.data.errors import DataError
    from hlip_fed.data.manifest import MANIFEST_NAME, index_site, read_manifest, write_manifest

    out = Path(args.out) if args.out else Path(args.dir) / MANIFEST_NAME
    previous = []
    if out.is_file():
        try:
            previous = read_manifest(out)
        except DataError:
            previous = []  # a broken manifest is simply rewritten
    entries = index_site(args.dir, previous)
    try:
        write_manifest(entries, out)
    except OSError as exc:
        raise DataError(out, f"cannot write manifest ({exc.strerror or exc})") from None
    splits: dict[str, int] = {}
    for e in entries:
        splits[e["split"]] = splits.get(e["split"], 0) + 1
    scans = sum(len(e["scans"]) for e in entries)
    no_report = sum(1 for e in entries if not e.get("report") and not e.get("report_text"))
    split_text = ", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "none"
    print(f"indexed {len(entries)} studies ({split_text}), {scans} scans -> {out}")
    if no_report:
        print(f"warning: {no_report} studies have no report; run `hlip-fed site check {args.dir}`")
    return 0


def _check(args: argparse.Namespace) -> int:
    import logging
    import warnings

    from hlip_fed.data.check import check_site

    logging.getLogger("pydicom").setLevel(logging.ERROR)  # pydicom's own warnings duplicate ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every problem that matters is in the report
        report = check_site(args.dir, manifest=args.manifest, splits=args.split)
    if args.json:
        print(json.dumps({**report.to_dict(), "usable": report.usable}, indent=2))
    else:
        print("\n".join(report.lines()))
    return 0 if report.usable else 1


def _start(args: argparse.Namespace) -> int:
    import os
    import sys

    from hlip_fed.deploy.flower_env import flower_env
    from hlip_fed.deploy.supernode import SuperNodeConfig, site_command
    from hlip_fed.errors import HlipError

    extra = {}
    for item in args.node_config:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HlipError(f"--node-config {item!r} is not KEY=VALUE")
        extra[key] = value.strip("\"'")
    if args.policy is not None:
        from hlip_fed.security.policy import load_policy

        load_policy(args.policy)  # a broken policy stops the start, not the first round
        extra["policy-path"] = str(args.policy.resolve())
    cfg = SuperNodeConfig(args.superlink, args.ca, args.key, args.data, args.state, args.name,
                          args.truth, args.runtime_port, extra)
    cfg.validate()
    if not args.skip_check:
        check = argparse.Namespace(dir=str(args.data), manifest=None, split=None, json=False)
        if _check(check) != 0:
            raise HlipError(f"{args.data}: no usable study; fix the problems above first")
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = site_command(cfg, sys.executable)
    print(f"site {cfg.site_name}: starting flower-supernode -> {cfg.superlink} "
          f"(state {cfg.state_dir}, audit log {cfg.state_dir / 'audit.jsonl'}, "
          f"approved apps {cfg.state_dir / 'approved-apps.json'})", flush=True)
    from hlip_fed.security.approvals import read_approvals

    if not read_approvals(cfg.state_dir):
        print(f"site {cfg.site_name}: no app version is approved yet, so every run will be refused "
              f"(hlip-fed app build, then hlip-fed site approve --state {cfg.state_dir} HASH)", flush=True)
    sys.stdout.flush()
    # Replace this process: the service manager and `kill` see the site's launcher, whose child
    # is flower-supernode.
    os.execve(argv[0], argv, flower_env(flwr_home=cfg.state_dir / "flwr-home"))
    return 0  # not reached


def _enroll(args: argparse.Namespace) -> int:
    from hlip_fed.deploy.enrolment import Enrolment
    from hlip_fed.deploy.flwr_cli import operator_cli

    record = Enrolment(args.state, operator_cli(args.state)).enroll(args.name, args.key)
    print(f"enrolled site {record.name} as node {record.node_id} ({record.fingerprint})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from hlip_fed.deploy.enrolment import Enrolment
    from hlip_fed.deploy.flwr_cli import operator_cli

    record = Enrolment(args.state, operator_cli(args.state)).revoke(args.name)
    print(f"revoked site {record.name} (node {record.node_id}) at {record.revoked_at}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from hlip_fed.deploy.enrolment import Enrolment
    from hlip_fed.deploy.flwr_cli import operator_cli

    enrolment = Enrolment(args.state, operator_cli(args.state))
    status = {int(n["node-id"]): n.get("status", "?") for n in enrolment.flwr.list_nodes()}
    rows = [dict(asdict(r), status=status.get(r.node_id, "unknown")) for r in enrolment.records()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<20} node {r['node_id']:<20} {r['status']:<13} {r['fingerprint']}"
                  + (f"  revoked {r['revoked_at']}" if r["revoked_at"] else ""))
    return 0
