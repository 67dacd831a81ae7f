"""Writing a file so that a reader sees the old one or the whole new one, never a part.

The content goes to a unique temporary file in the same folder (so the rename stays on one file
system), is flushed to disk, gets its final mode, and is renamed over the target; a failure
removes the temporary file and leaves the target as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Let ``write(tmp)`` fill a temporary file, then rename it to ``path``; ``mode`` (e.g. 0o600)
    is set before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), mode)


def write_json_atomic(path: str | os.PathLike, data, mode: int | None = None, **dumps) -> Path:
    """``data`` as indented JSON with a final newline."""
    text = json.dumps(data, indent=2, **dumps) + "\n"
    return write_bytes_atomic(path, text.encode(), mode)
