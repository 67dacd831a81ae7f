"""The environment every Flower process of the federation runs with.

Flower's defaults suit a laptop, not a hospital network: it sends telemetry events, polls
``api.flower.ai`` for updates, installs an app's Python dependencies at run time with ``uv sync``
(i.e. downloads and executes code chosen by whoever started the run), and two internal switches
start extra gRPC Fleet/Control listeners on ``0.0.0.0``. :func:`flower_env` turns all of that off
for daemons and CLI calls alike, so no outbound connection or extra listener depends on an
operator remembering an environment variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

FORCED = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
# Setting either of these to 1 makes flower-superlink open legacy gRPC listeners (Control API on
# 0.0.0.0:9093, Fleet API on 0.0.0.0:9092) next to its HTTP port, bypassing the fleet gateway.
REMOVED = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def flower_env(base: Mapping[str, str] | None = None, flwr_home: Path | None = None
               ) -> dict[str, str]:
    """A copy of ``base`` (default: ``os.environ``) made safe for Flower daemons and ``flwr`` CLIs.

    ``flwr_home`` sets ``FLWR_HOME`` (where ``flwr`` keeps its ``config.toml`` with the SuperLink
    connection, and daemons their caches), so an operator profile never mixes with a user's own.
    """
    env = dict(os.environ if base is None else base)
    for key in REMOVED:
        env.pop(key, None)
    env.update(FORCED)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    # Flower daemons spawn helpers by bare name (flower-superexec, flwr-serverapp,
    # flwr-clientapp); they must come from this installation, not whatever PATH finds first.
    bin_dir = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *path])
    return env
