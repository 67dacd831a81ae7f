"""The app versions a site's operator approved: FAB hashes in the site's state folder.

A Flower App Bundle (FAB) is identified by the SHA-256 of its bytes, the hash the SuperNode
receives with every task. ``hlip-fed app build`` prints the hash of a checkout or of the released
source; the operator approves it (``hlip-fed site approve``) and the site's task launcher
(:mod:`client.site_exec`) runs only tasks whose FAB hash is in ``STATE/approved-apps.json``.
The file maps each hash to when it was approved and what it was approved from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

from hlip_fed.atomic import write_json_atomic
from hlip_fed.errors import HlipError

APPROVALS_FILE = "approved-apps.json"
_HASH = re.compile(r"[0-9a-f]{64}")


def fab_sha256(path: str | Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise HlipError(f"{path}: cannot read the app bundle ({exc.strerror or exc})") from None


def resolve_hash(hash_or_fab: str) -> tuple[str, str]:
    """(hash, where it came from) for a 64-hex hash or a ``.fab`` file."""
    text = hash_or_fab.strip().lower()
    if _HASH.fullmatch(text):
        return text, "hash"
    if Path(hash_or_fab).is_file():
        return fab_sha256(hash_or_fab), str(Path(hash_or_fab).resolve())
    raise HlipError(f"{hash_or_fab}: neither a SHA-256 (64 hex digits) nor an app bundle file")


def read_approvals(state_dir: str | Path) -> dict[str, dict]:
    path = Path(state_dir) / APPROVALS_FILE
    if not path.exists():
        return {}
    try:
        approvals = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HlipError(f"{path}: not a readable approvals file ({exc})") from None
    if not isinstance(approvals, dict) or not all(_HASH.fullmatch(h) for h in approvals):
        raise HlipError(f"{path}: not an approvals file (a JSON object keyed by SHA-256)")
    return approvals


def _write(state_dir: Path, approvals: dict[str, dict]) -> None:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_json_atomic(state_dir / APPROVALS_FILE, approvals, mode=0o600, sort_keys=True)


def approve(state_dir: str | Path, hash_or_fab: str) -> str:
    fab_hash, source = resolve_hash(hash_or_fab)
    approvals = read_approvals(state_dir)
    approvals[fab_hash] = {"approved": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "from": source}
    _write(Path(state_dir), approvals)
    return fab_hash


def disapprove(state_dir: str | Path, hash_or_fab: str) -> str:
    fab_hash, _ = resolve_hash(hash_or_fab)
    approvals = read_approvals(state_dir)
    if approvals.pop(fab_hash, None) is None:
        raise HlipError(f"{fab_hash} is not approved at this site ({Path(state_dir) / APPROVALS_FILE})")
    _write(Path(state_dir), approvals)
    return fab_hash


def is_approved(state_dir: str | Path, fab_hash: str) -> bool:
    return fab_hash in read_approvals(state_dir)
