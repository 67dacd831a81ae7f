"""Writing key material safely: no silent overwrite, private files readable by the owner only.

A private key that is briefly world-readable, or a CA key replaced by a rerun of ``certs init``
(which would orphan every certificate already issued), are both mistakes that cannot be undone,
so every write goes through :func:`write_secret` / :func:`write_public`.
"""

from __future__ import annotations

import os
from pathlib import Path

from hlip_fed.errors import HlipError

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


def check_writable(paths: list[Path], force: bool) -> None:
    """Refuse up front if any target exists, so that a command writes all of its files or none."""
    if force:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise HlipError(f"refusing to overwrite {', '.join(existing)} (use --force to replace)")


def _write(path: Path, data: bytes, mode: int, force: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    check_writable([path], force)
    # Create under a temporary name with the final mode already set (O_CREAT with mode, umask
    # cannot widen it), then rename: readers never see a partial or wrongly-permissioned file.
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        if force:
            os.replace(tmp, path)
        else:
            # link() fails if the target appeared meanwhile: no race with a concurrent writer.
            try:
                os.link(tmp, path)
            except FileExistsError as exc:
                raise HlipError(f"refusing to overwrite {path} (use --force to replace)") from exc
            finally:
                os.unlink(tmp)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def write_secret(path: Path, data: bytes, force: bool = False) -> Path:
    """Write a private key with mode 0600."""
    return _write(Path(path), data, PRIVATE_MODE, force)


def write_public(path: Path, data: bytes, force: bool = False) -> Path:
    """Write a certificate or public key with mode 0644."""
    return _write(Path(path), data, PUBLIC_MODE, force)


def check_private_mode(path: Path) -> None:
    """Refuse to use a private key that group or others can read (as OpenSSH does)."""
    mode = Path(path).stat().st_mode & 0o777
    if mode & 0o077:
        raise HlipError(f"{path} is readable by other users (mode {mode:o}); run chmod 600 {path}")
