"""What is in a certificate directory: certificates with their SANs and expiry, site keys.

Expired or soon-to-expire certificates take the whole federation down at once (every site's TLS
handshake fails), so ``hlip-fed certs list`` puts days-left next to each certificate and flags
private keys whose file mode lets other users read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hlip_fed.errors import HlipError
from hlip_fed.security.pki import days_left, subject_alt_names
from hlip_fed.security.site_keys import fingerprint, key_comment

EXPIRY_WARNING_DAYS = 30


@dataclass
class Entry:
    """One file of key material and what a person needs to know about it."""

    path: Path
    kind: str  # "certificate", "public key", "private key"
    summary: str
    warnings: list[str] = field(default_factory=list)


def _describe_cert(path: Path, data: bytes) -> Entry:
    cert = x509.load_pem_x509_certificate(data)
    left = days_left(cert)
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    sans = subject_alt_names(cert)
    summary = (f"{'CA ' if is_ca else ''}subject={cert.subject.rfc4514_string()}"
               + (f" SAN={','.join(sans)}" if sans else "")
               + f" expires={cert.not_valid_after_utc:%Y-%m-%d} ({left} days left)")
    warnings = []
    if left < 0:
        warnings.append("EXPIRED")
    elif left < EXPIRY_WARNING_DAYS:
        warnings.append(f"expires in {left} days")
    return Entry(path, "certificate", summary, warnings)


def _describe_public(path: Path, data: bytes) -> Entry:
    key = serialization.load_ssh_public_key(data)
    if isinstance(key, ec.EllipticCurvePublicKey):
        algo = f"EC {key.curve.name}"
        summary = f"{algo} {fingerprint(key)}"
    else:
        summary = type(key).__name__
    comment = key_comment(path)
    return Entry(path, "public key", summary + (f" ({comment})" if comment else ""))


def _describe_private(path: Path) -> Entry:
    mode = path.stat().st_mode & 0o777
    warnings = [f"mode {mode:o}: readable by other users"] if mode & 0o077 else []
    return Entry(path, "private key", f"mode {mode:o}", warnings)


def describe(path: Path) -> Entry | None:
    """Describe one file, or ``None`` if it is not key material."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return _describe_cert(path, data)
        if b"PRIVATE KEY-----" in data:
            return _describe_private(path)
        if data.startswith((b"ecdsa-sha2-", b"ssh-")):
            return _describe_public(path, data)
    except ValueError as exc:
        return Entry(path, "unreadable", str(exc), ["cannot be parsed"])
    return None


def inventory(directory: Path) -> list[Entry]:
    """Describe every certificate and key file directly inside ``directory``, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HlipError(f"{directory} is not a directory")
    entries = [describe(p) for p in sorted(directory.iterdir()) if p.is_file()]
    return [e for e in entries if e is not None]
