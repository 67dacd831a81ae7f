"""A site's own record of everything it sent to the federation server.

A hospital must be able to show its data protection officer what left the building. The ClientApp
appends one JSON line per reply to ``audit.jsonl`` in the site's state folder, written before the
reply is handed to Flower: when it was sent, run, round, message type, which records the reply
holds (by kind), the array keys with dtypes and shapes, the number of bytes, a SHA-256 of the array
payload, and every metric name with its value. An error reply (the ClientApp failed) is recorded
with the error text, which also leaves the site.

The payload digest is :func:`payload_sha256`: for each array in record order, the key (UTF-8), a
NUL, the dtype and shape, a NUL, then the raw C-order bytes. Anyone holding the arrays (the site
from its logs, the operator from what it received) can recompute it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, RecordDict

AUDIT_FILE = "audit.jsonl"


def payload_sha256(arrays: ArrayRecord) -> str:
    digest = hashlib.sha256()
    for key, array in arrays.items():
        values = np.ascontiguousarray(array.numpy())
        digest.update(key.encode() + b"\0" + f"{values.dtype.str}{tuple(values.shape)}".encode() + b"\0")
        digest.update(values.tobytes())
    return digest.hexdigest()


def record_kinds(content: RecordDict) -> dict[str, str]:
    """Every record of a reply by name and kind, so anything beyond arrays and metrics shows."""
    kinds = {}
    for name, record in content.items():
        kinds[name] = type(record).__name__
    return kinds


def audit_entry(message_type: str, run_id: int, server_round: int | None, content: RecordDict | None,
                error: str | None = None, detail: str | None = None) -> dict:
    """The audit line for one outgoing reply (``content`` None for an error reply: ``error`` is
    what left the site, ``detail`` what stayed in it)."""
    entry: dict = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        "run": int(run_id),
        "round": server_round,
        "type": message_type,
    }
    if error is not None:
        entry["error"] = error
        if detail is not None:
            entry["detail"] = detail
        return entry
    assert content is not None
    entry["records"] = record_kinds(content)
    arrays = [(name, rec) for name, rec in content.array_records.items()]
    entry["arrays"] = {
        name: {
            "keys": list(rec.keys()),
            "dtypes": sorted({str(a.dtype) for a in rec.values()}),
            "shapes": {k: list(a.shape) for k, a in rec.items()},
            "bytes": int(sum(a.numpy().nbytes for a in rec.values())),
            "sha256": payload_sha256(rec),
        }
        for name, rec in arrays
    }
    entry["bytes"] = int(sum(v["bytes"] for v in entry["arrays"].values()))
    entry["metrics"] = {name: dict(rec) for name, rec in content.metric_records.items()}
    entry["config"] = {name: dict(rec) for name, rec in content.config_records.items()}
    return entry


def append_audit(state_dir: str | Path, entry: dict) -> Path:
    """Append one line and flush it to disk before the reply leaves (O_APPEND: whole lines)."""
    path = Path(state_dir) / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(entry, sort_keys=True, default=_plain) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def read_audit(state_dir: str | Path) -> list[dict]:
    path = Path(state_dir) / AUDIT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plain(value):
    """JSON for record values: numpy scalars as numbers, bytes (config records) as hex."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    raise TypeError(f"cannot record {type(value).__name__} in the audit log")
