"""The consortium PKI and site keys: formats Flower accepts, SANs, file modes, no silent overwrite."""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from hlip_fed.cli import main
from hlip_fed.errors import HlipError
from hlip_fed.security.inventory import inventory
from hlip_fed.security.pki import (
    init_pki,
    load_certificate,
    reissue_server_cert,
    subject_alt_names,
    verify_issued_by,
)
from hlip_fed.security.site_keys import (
    create_site_key,
    fingerprint,
    load_site_private_key,
    load_site_public_key,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return init_pki(tmp_path_factory.mktemp("certs"), "link.example.org",
                    ["10.1.2.3", "alt.example.org", "2001:db8::7"])


def test_init_writes_ca_and_server_cert_with_modes(pki):
    assert {p.name for p in pki.directory.iterdir()} == {"ca.crt", "ca.key", "superlink.crt",
                                                        "superlink.key"}
    assert mode(pki.ca_key) == 0o600 and mode(pki.server_key) == 0o600
    assert mode(pki.ca_cert) == 0o644 and mode(pki.server_cert) == 0o644
    ca, cert = load_certificate(pki.ca_cert), load_certificate(pki.server_cert)
    verify_issued_by(cert, ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc


def test_server_cert_names_server_extra_and_loopback(pki):
    sans = subject_alt_names(load_certificate(pki.server_cert))
    for name in ["link.example.org", "alt.example.org", "localhost", "10.1.2.3", "127.0.0.1",
                 "::1", "2001:db8::7"]:
        assert name in sans


def test_loopback_names_can_be_left_out(tmp_path):
    paths = init_pki(tmp_path, "10.9.9.9", include_loopback=False)
    assert subject_alt_names(load_certificate(paths.server_cert)) == ["10.9.9.9"]


def _handshake(pki, connect_name: str) -> str:
    """Serve one TLS handshake with the SuperLink cert; connect verifying against the CA only."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_ctx.wrap_socket(raw, server_hostname=connect_name) as tls:
                return tls.version()
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("name", ["link.example.org", "10.1.2.3", "localhost", "127.0.0.1"])
def test_tls_clients_accept_the_certificate_for_each_san(pki, name):
    assert _handshake(pki, name) in ("TLSv1.2", "TLSv1.3")


def test_tls_clients_reject_a_name_not_in_the_certificate(pki):
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, "other.example.org")


def test_init_refuses_to_overwrite_anything_unless_forced(tmp_path):
    paths = init_pki(tmp_path, "a.example.org")
    before = {p: p.read_bytes() for p in paths.all()}
    with pytest.raises(HlipError, match="refusing to overwrite"):
        init_pki(tmp_path, "b.example.org")
    assert {p: p.read_bytes() for p in paths.all()} == before
    init_pki(tmp_path, "b.example.org", force=True)
    assert paths.ca_key.read_bytes() != before[paths.ca_key]
    assert mode(paths.ca_key) == 0o600


def test_init_writes_nothing_if_one_target_exists(tmp_path):
    (tmp_path / "superlink.key").write_text("someone's key")
    with pytest.raises(HlipError, match="superlink.key"):
        init_pki(tmp_path, "a.example.org")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["superlink.key"]


def test_private_keys_are_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        paths = init_pki(tmp_path / "c", "a.example.org")
        site = create_site_key("hospital-a", tmp_path / "s")
    finally:
        os.umask(old)
    assert mode(paths.ca_key) == mode(paths.server_key) == mode(site.private) == 0o600


def test_invalid_server_name_is_refused(tmp_path):
    with pytest.raises(HlipError, match="neither an IP address nor a valid DNS name"):
        init_pki(tmp_path, "bad name")


@pytest.mark.parametrize("curve, ssh_type", [("P-384", "ecdsa-sha2-nistp384"),
                                             ("P-256", "ecdsa-sha2-nistp256")])
def test_site_key_is_in_the_formats_flower_reads(tmp_path, curve, ssh_type):
    paths = create_site_key("hospital-a", tmp_path, curve=curve)
    assert mode(paths.private) == 0o600 and mode(paths.public) == 0o644
    # flower-supernode --auth-supernode-private-key uses load_ssh_private_key
    private = serialization.load_ssh_private_key(paths.private.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert paths.private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    # flwr supernode register uses its own loader (load_ssh_public_key + NIST curve check)
    from flwr.cli.supernode.register import try_load_public_key

    pem = try_load_public_key(paths.public)
    loaded = serialization.load_pem_public_key(pem)
    assert loaded.public_numbers() == private.public_key().public_numbers()
    line = paths.public.read_text().split()
    assert line[0] == ssh_type and line[2] == "hlip-fed-site:hospital-a"
    assert fingerprint(load_site_public_key(paths.public)).startswith("SHA256:")
    assert load_site_private_key(paths.private).public_key().public_numbers() == \
        private.public_key().public_numbers()


def test_site_key_refuses_overwrite_and_bad_names(tmp_path):
    paths = create_site_key("hospital-a", tmp_path)
    original = paths.private.read_bytes()
    with pytest.raises(HlipError, match="refusing to overwrite"):
        create_site_key("hospital-a", tmp_path)
    assert paths.private.read_bytes() == original
    create_site_key("hospital-a", tmp_path, force=True)
    assert paths.private.read_bytes() != original
    for bad in ["", "Hospital A", "../etc", "-x"]:
        with pytest.raises(HlipError, match="site name"):
            create_site_key(bad, tmp_path)


def test_site_private_key_readable_by_others_is_refused(tmp_path):
    paths = create_site_key("hospital-a", tmp_path)
    paths.private.chmod(0o644)
    with pytest.raises(HlipError, match="readable by other users"):
        load_site_private_key(paths.private)


def test_non_nist_public_key_is_refused(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    path = tmp_path / "ed.pub"
    path.write_bytes(key.public_bytes(serialization.Encoding.OpenSSH,
                                      serialization.PublicFormat.OpenSSH))
    with pytest.raises(HlipError, match="NIST EC"):
        load_site_public_key(path)


def test_inventory_shows_subject_sans_expiry_and_keys(pki, tmp_path):
    create_site_key("hospital-b", pki.directory, force=True)
    entries = {e.path.name: e for e in inventory(pki.directory)}
    server = entries["superlink.crt"]
    assert "CN=link.example.org" in server.summary and "10.1.2.3" in server.summary
    assert "days left" in server.summary and not server.warnings
    assert entries["ca.crt"].summary.startswith("CA ")
    assert "hospital-b" in entries["hospital-b.pub"].summary
    assert entries["ca.key"].kind == "private key" and not entries["ca.key"].warnings


def test_cli_init_site_list(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "init", "--out", str(out), "--ca-out", str(tmp_path / "ca"),
                 "--server-name", "link.example.org", "--ip", "10.0.0.5", "--days", "10"]) == 0
    assert {p.name for p in out.iterdir()} == {"ca.crt", "superlink.crt", "superlink.key"}
    assert {p.name for p in (tmp_path / "ca").iterdir()} == {"ca.crt", "ca.key"}
    assert main(["certs", "site", "hospital-c", "--out", str(out)]) == 0
    capsys.readouterr()
    # a certificate expiring within 30 days is flagged and makes `list` exit non-zero
    assert main(["certs", "list", str(out)]) == 1
    listing = capsys.readouterr().out
    assert "superlink.crt" in listing and "SAN=link.example.org" in listing
    assert "10.0.0.5" in listing and "expires in" in listing
    expiry = load_certificate(out / "superlink.crt").not_valid_after_utc
    assert expiry - dt.datetime.now(dt.timezone.utc) < dt.timedelta(days=11)
    assert "hospital-c.pub" in listing and "hospital-c.key" in listing
    # the refusal is one line on stderr, exit code 2
    assert main(["certs", "site", "hospital-c", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to overwrite") and err.count("\n") == 1


def test_cli_list_flags_a_world_readable_key(tmp_path, capsys):
    paths = create_site_key("hospital-d", tmp_path)
    paths.private.chmod(0o644)
    assert main(["certs", "list", str(tmp_path)]) == 1
    assert "readable by other users" in capsys.readouterr().out


def test_server_cert_is_renewed_from_the_same_ca(tmp_path, capsys):
    out = tmp_path / "certs"
    paths = init_pki(out, "old.example.org")
    ca_before = paths.ca_cert.read_bytes()
    assert main(["certs", "server", "--out", str(out), "--server-name", "new.example.org"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["certs", "server", "--out", str(out), "--server-name", "new.example.org",
                 "--ip", "10.0.0.9", "--force"]) == 0
    assert paths.ca_cert.read_bytes() == ca_before
    cert = load_certificate(paths.server_cert)
    verify_issued_by(cert, load_certificate(paths.ca_cert))
    assert {"new.example.org", "10.0.0.9", "127.0.0.1"} <= set(subject_alt_names(cert))
    assert "old.example.org" not in subject_alt_names(cert)
    assert mode(paths.server_key) == 0o600


def test_server_certs_are_short_lived_and_rotate_from_the_offline_ca(tmp_path, capsys):
    ca, server = tmp_path / "offline-ca", tmp_path / "server"
    paths = init_pki(server, "link.example.org", ca_out=ca)
    first = load_certificate(paths.server_cert)
    lifetime = first.not_valid_after_utc - first.not_valid_before_utc
    assert dt.timedelta(days=89) < lifetime <= dt.timedelta(days=91)  # 90 days by default
    assert main(["certs", "server", "--ca", str(ca), "--out", str(server), "--server-name", "link.example.org",
                 "--force"]) == 0
    renewed = load_certificate(paths.server_cert)
    assert renewed.serial_number != first.serial_number and not (server / "ca.key").exists()
    verify_issued_by(renewed, load_certificate(ca / "ca.crt"))
    assert (server / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()  # sites keep the same CA
    assert "until" in capsys.readouterr().out


def test_server_cert_needs_the_ca_key(tmp_path):
    paths = init_pki(tmp_path, "a.example.org")
    paths.ca_key.unlink()
    with pytest.raises(HlipError, match="ca.key missing"):
        reissue_server_cert(tmp_path, "a.example.org", force=True)


def test_a_site_start_refuses_a_memory_bound_or_precision_it_cannot_use(pki, tmp_path):
    from hlip_fed.deploy.supernode import SuperNodeConfig

    key = create_site_key("hospital-a", tmp_path / "keys").private
    (tmp_path / "data").mkdir()
    cfg = SuperNodeConfig("link.example.org:9092", pki.ca_cert, key, tmp_path / "data", tmp_path / "state",
                          extra={"memory-cache-mb": "512"})
    cfg.validate()
    assert "memory-cache-mb=" in cfg.node_config()
    cfg.extra["memory-cache-mb"] = "-1"
    with pytest.raises(HlipError, match="site hospital-a: node config memory-cache-mb='-1'"):
        cfg.validate()
    cfg.extra.update({"memory-cache-mb": "512", "precision": "bf16-held"})
    cfg.validate()
    cfg.extra["precision"] = "half"
    with pytest.raises(HlipError, match="site hospital-a: node config precision='half'"):
        cfg.validate()
