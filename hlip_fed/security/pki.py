"""The consortium's X.509 PKI: a private CA and the SuperLink's TLS server certificate.

Sites pin the consortium CA (``flower-supernode --root-certificates ca.crt``) instead of trusting
public CAs, so the SuperLink can run on any host name or bare IP the consortium controls. The
server certificate must list every name and address sites (and the operator, on loopback) dial,
because TLS clients check the subject alternative names, not the common name.

Files written by :func:`init_pki`:

==================  ======  ==========================================================
``ca.crt``          0644    CA certificate, handed to every site and the operator (both folders)
``ca.key``          0600    CA private key, in the CA folder: kept offline by the operator, never
                            on the SuperLink host (``hlip-fed server start`` refuses a certificate
                            folder that holds it)
``superlink.crt``   0644    SuperLink TLS certificate, signed by the CA, valid 90 days by default
``superlink.key``   0600    SuperLink TLS private key, on the SuperLink host only
==================  ======  ==========================================================

A stolen server key is useful only until its certificate expires, so server certificates are
short-lived and rotated with :func:`reissue_server_cert` from the offline CA folder; sites keep
trusting the same ``ca.crt``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hlip_fed.errors import HlipError
from hlip_fed.security.files import check_writable, write_public, write_secret

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"

# The operator reaches the Control API and the gateway reaches the SuperLink on loopback, both
# over TLS verified against the same CA, so loopback names are in the certificate by default.
LOOPBACK_DNS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")

CA_DAYS = 3650
SERVER_DAYS = 90  # short-lived: a stolen server key stops working soon; rotate with reissue_server_cert


@dataclass(frozen=True)
class PkiPaths:
    """Where the CA and SuperLink certificate files of one certificate directory live."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_key(self) -> Path:
        return self.directory / CA_KEY

    @property
    def server_cert(self) -> Path:
        return self.directory / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.directory / SERVER_KEY

    def all(self) -> list[Path]:
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def split_names(names: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Sort host names into DNS names and IP addresses (a SAN entry has a different type for each)."""
    dns: list[str] = []
    ips: list[str] = []
    for raw in names:
        name = raw.strip().strip("[]")
        if not name:
            continue
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            if not all(part and len(part) < 64 for part in name.split(".")) or " " in name:
                raise HlipError(f"{raw!r} is neither an IP address nor a valid DNS name") from None
            dns.append(name.lower())
    return dns, ips


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def create_ca(common_name: str = "hlip-fed consortium CA", days: int = CA_DAYS
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed CA that may sign end-entity certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hlip-fed"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    start = _now() - dt.timedelta(minutes=5)  # tolerate small clock skew between hosts
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def issue_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    server_name: str,
    extra_names: list[str] | tuple[str, ...] = (),
    include_loopback: bool = True,
    days: int = SERVER_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a TLS server certificate whose SANs cover ``server_name``, ``extra_names`` and loopback."""
    names = [server_name, *extra_names]
    if include_loopback:
        names += [*LOOPBACK_DNS, *LOOPBACK_IPS]
    dns, ips = split_names(names)
    dns, ips = _dedupe(dns), _dedupe(ips)
    if not dns and not ips:
        raise HlipError("the server certificate needs at least one host name or IP address")
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - dt.timedelta(minutes=5)
    not_after = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cn = server_name.strip().strip("[]")[:64]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hlip-fed"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def init_pki(
    out: Path,
    server_name: str,
    extra_names: list[str] | tuple[str, ...] = (),
    include_loopback: bool = True,
    ca_days: int = CA_DAYS,
    server_days: int = SERVER_DAYS,
    force: bool = False,
    ca_out: Path | None = None,
) -> PkiPaths:
    """Create the CA (``ca.crt``, ``ca.key``) in ``ca_out`` and ``superlink.crt/superlink.key``
    plus a copy of ``ca.crt`` in ``out``; without ``ca_out`` everything goes to ``out`` (a folder
    the SuperLink then refuses to serve from until ``ca.key`` is moved away).

    Every target is checked before anything is written, so a refused run leaves no
    half-initialised directory behind.
    """
    paths, ca_paths = PkiPaths(Path(out)), PkiPaths(Path(ca_out or out))
    targets = [paths.ca_cert, paths.server_cert, paths.server_key, ca_paths.ca_cert, ca_paths.ca_key]
    check_writable(list(dict.fromkeys(targets)), force)
    ca_key, ca_cert = create_ca(days=ca_days)
    key, cert = issue_server_cert(ca_key, ca_cert, server_name, extra_names, include_loopback,
                                  server_days)
    for folder in {paths.directory, ca_paths.directory}:
        folder.mkdir(parents=True, exist_ok=True)
    write_secret(ca_paths.ca_key, _pem_key(ca_key), force)
    for target in {paths.ca_cert, ca_paths.ca_cert}:
        write_public(target, _pem_cert(ca_cert), force)
    write_secret(paths.server_key, _pem_key(key), force)
    write_public(paths.server_cert, _pem_cert(cert), force)
    return paths


def reissue_server_cert(
    out: Path,
    server_name: str,
    extra_names: list[str] | tuple[str, ...] = (),
    include_loopback: bool = True,
    server_days: int = SERVER_DAYS,
    force: bool = False,
    ca_dir: Path | None = None,
) -> PkiPaths:
    """Issue a new SuperLink certificate into ``out`` from the CA in ``ca_dir`` (default ``out``):
    rotation before expiry, or a new address.

    Sites keep trusting the same ``ca.crt``, so nothing has to be redistributed, unlike
    re-running :func:`init_pki` with ``force``, which replaces the CA itself.
    """
    paths, ca_paths = PkiPaths(Path(out)), PkiPaths(Path(ca_dir or out))
    for required in (ca_paths.ca_cert, ca_paths.ca_key):
        if not required.is_file():
            raise HlipError(f"{required} missing; create the CA with `hlip-fed certs init`")
    check_writable([paths.server_cert, paths.server_key], force)
    ca_cert = load_certificate(ca_paths.ca_cert)
    try:
        ca_key = serialization.load_pem_private_key(ca_paths.ca_key.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise HlipError(f"{ca_paths.ca_key}: not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or \
            ca_key.public_key().public_numbers() != ca_cert.public_key().public_numbers():
        raise HlipError(f"{ca_paths.ca_key} does not belong to {ca_paths.ca_cert}")
    key, cert = issue_server_cert(ca_key, ca_cert, server_name, extra_names, include_loopback,
                                  server_days)
    paths.directory.mkdir(parents=True, exist_ok=True)
    if paths.ca_cert != ca_paths.ca_cert:
        write_public(paths.ca_cert, _pem_cert(ca_cert), True)  # the SuperLink's copy of the same CA
    write_secret(paths.server_key, _pem_key(key), force)
    write_public(paths.server_cert, _pem_cert(cert), force)
    return paths


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate, with a readable error for a wrong or damaged file."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise HlipError(f"{path}: not a readable PEM certificate ({exc})") from exc


def subject_alt_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*ext.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in ext.get_values_for_type(x509.IPAddress))]


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> int:
    """Whole days until the certificate expires (negative once expired)."""
    return (cert.not_valid_after_utc - (now or _now())).days


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise :class:`HlipError` unless ``ca_cert`` signed ``cert`` (catches mixed-up directories)."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as exc:
        raise HlipError(f"certificate {cert.subject.rfc4514_string()} was not issued by "
                        f"{ca_cert.subject.rfc4514_string()}: {exc}") from exc
    except Exception as exc:  # InvalidSignature carries no message
        raise HlipError(f"certificate {cert.subject.rfc4514_string()} has a signature that "
                        f"{ca_cert.subject.rfc4514_string()} did not make") from exc
