"""Site authentication keys: one NIST EC key pair per hospital, in the formats Flower reads.

With ``--enable-supernode-auth`` the SuperLink accepts only SuperNodes whose public key the
operator registered, and each SuperNode signs its requests with the matching private key.
Flower 1.42 fixes the formats: ``flower-supernode --auth-supernode-private-key`` loads the file
with ``load_ssh_private_key`` (OpenSSH private-key format) and ``flwr supernode register`` loads
the public key with ``load_ssh_public_key`` (an OpenSSH ``ecdsa-sha2-nistp*`` line) and accepts
only NIST curves. Files written by :func:`create_site_key`:

``NAME.key`` (0600) stays at the hospital; ``NAME.pub`` (0644) goes to the consortium operator.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hlip_fed.errors import HlipError
from hlip_fed.security.files import check_private_mode, check_writable, write_public, write_secret

CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
DEFAULT_CURVE = "P-384"  # the curve Flower itself generates keys on
_NIST = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
COMMENT_PREFIX = "hlip-fed-site:"


def check_site_name(name: str) -> str:
    """Site names become file names and key comments: lower-case letters, digits, ``.-_``."""
    if not _SITE_NAME.match(name):
        raise HlipError(f"site name {name!r} must be 1-63 characters of a-z, 0-9, '.', '-', '_' "
                        "and start with a letter or digit")
    return name


@dataclass(frozen=True)
class SiteKeyPaths:
    """The two files of one site's key pair."""

    private: Path
    public: Path


def site_key_paths(out: Path, name: str) -> SiteKeyPaths:
    out = Path(out)
    return SiteKeyPaths(out / f"{name}.key", out / f"{name}.pub")


def openssh_public_line(public_key: ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    """``ecdsa-sha2-nistpNNN AAAA... comment`` as ``flwr supernode register`` expects."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH,
                                   serialization.PublicFormat.OpenSSH)
    return line + (f" {comment}".encode() if comment else b"") + b"\n"


def create_site_key(name: str, out: Path, curve: str = DEFAULT_CURVE,
                    force: bool = False) -> SiteKeyPaths:
    """Generate a site's key pair; refuses to replace an existing key unless ``force``."""
    check_site_name(name)
    if curve not in CURVES:
        raise HlipError(f"curve {curve!r} is not supported; choose one of {', '.join(CURVES)}")
    paths = site_key_paths(out, name)
    check_writable([paths.private, paths.public], force)
    key = ec.generate_private_key(CURVES[curve]())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    write_secret(paths.private, private, force)
    write_public(paths.public, openssh_public_line(key.public_key(), COMMENT_PREFIX + name), force)
    return paths


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH public key and apply the same checks ``flwr supernode register`` does."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise HlipError(f"cannot read public key {path}: {exc.strerror}") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise HlipError(f"{path} is not an OpenSSH public key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _NIST):
        raise HlipError(f"{path} is not a NIST EC (ecdsa-sha2-nistp*) key, which Flower requires")
    return key


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a site's OpenSSH private key the way ``flower-supernode`` will, refusing lax modes."""
    check_private_mode(path)
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise HlipError(f"cannot read private key {path}: {exc.strerror}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise HlipError(f"{path} is not an unencrypted OpenSSH private key ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _NIST):
        raise HlipError(f"{path} is not a NIST EC key, which Flower requires")
    return key


def key_comment(path: Path) -> str:
    """The comment after the key material on an OpenSSH public-key line (often the site name)."""
    parts = Path(path).read_text(errors="replace").split(None, 2)
    return parts[2].strip() if len(parts) > 2 else ""


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:...`` fingerprint, identical to ``ssh-keygen -lf`` so operators can compare."""
    blob = base64.b64decode(openssh_public_line(public_key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def flower_public_key_bytes(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The PEM SubjectPublicKeyInfo bytes the SuperLink stores and compares for a node."""
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
