"""The federated app's bundle (FAB), built with Flower's own builder so that its SHA-256 is the
one a SuperNode receives when ``flwr run`` sends the same source.

``pyproject.toml``'s ``fab-include`` keeps the app's code only (``hlip_fed/``, ``server/``,
``client/``; the builder adds the pyproject itself): docs, tests and benchmarks never travel.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from hlip_fed.errors import HlipError


def build_app(source: str | Path, out: str | Path) -> tuple[Path, str]:
    """Write the FAB of ``source`` into ``out``; return its path and SHA-256."""
    from flwr.cli.build import build_fab_from_disk, get_fab_filename  # lazy: only building an app needs Flower's CLI
    from flwr.cli.config_utils import load_and_validate

    source = Path(source).resolve()
    if not (source / "pyproject.toml").is_file():
        raise HlipError(f"{source}: no pyproject.toml; give the app's source folder with --source")
    try:
        config, _ = load_and_validate(source / "pyproject.toml")
        fab = build_fab_from_disk(source)
    except ValueError as exc:
        raise HlipError(f"{source}: cannot build the app bundle: {str(exc).splitlines()[0]}") from None
    fab_hash = hashlib.sha256(fab).hexdigest()
    path = Path(out) / get_fab_filename(config, fab_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fab)
    return path, fab_hash
