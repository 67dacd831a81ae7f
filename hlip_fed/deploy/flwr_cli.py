"""The operator's ``flwr`` commands, pointed at the SuperLink's loopback Control API.

``flwr`` reads its SuperLink connection from ``$FLWR_HOME/config.toml``. Each operator profile
gets its own ``FLWR_HOME`` holding a single connection (address + CA certificate), so commands
cannot accidentally reach another SuperLink listed in a user's personal configuration, and every
call runs with :func:`~hlip_fed.deploy.flower_env.flower_env` (telemetry and update checks off).
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hlip_fed.deploy.flower_env import flower_env
from hlip_fed.deploy.superlink import OPERATOR_HOME, flower_executable
from hlip_fed.errors import HlipError

CONNECTION = "hlip-fed"


def write_connection(flwr_home: Path, address: str, ca_cert: Path) -> Path:
    """Write a ``config.toml`` whose default (and only) connection is ``address`` over TLS."""
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = flwr_home / "config.toml"
    path.write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f"address = {json.dumps(address)}\n"
        f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}\n"
    )
    return path


@dataclass
class FlwrCli:
    """Runs ``flwr`` with one profile; ``json_call`` parses ``--format json`` output."""

    flwr_home: Path
    timeout_s: float = 60.0

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([flower_executable("flwr"), *args], capture_output=True,
                                  text=True, env=flower_env(flwr_home=self.flwr_home), cwd=cwd,
                                  timeout=self.timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise HlipError(f"flwr {' '.join(args)} timed out after {self.timeout_s:.0f}s") from exc

    def json_call(self, *args: str, cwd: Path | None = None) -> dict:
        """Run ``flwr ARGS --format json``; raise :class:`HlipError` with Flower's message on failure."""
        proc = self.run(*args, "--format", "json", cwd=cwd)
        try:
            result = json.loads(proc.stdout)
        except json.JSONDecodeError:
            result = {"success": False, "error-message": (proc.stdout + proc.stderr).strip()}
        if proc.returncode != 0 or not result.get("success", False):
            message = result.get("error-message") or (proc.stdout + proc.stderr).strip()
            raise HlipError(f"flwr {' '.join(args)} failed: {message}")
        return result

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        """Enrol a site's OpenSSH public key; returns the node ID Flower assigned."""
        extra = ["--name", name] if name else []
        return int(self.json_call("supernode", "register", str(public_key), *extra)["node-id"])

    def unregister_node(self, node_id: int) -> None:
        """Revoke a node: its key can no longer authenticate."""
        self.json_call("supernode", "unregister", str(node_id))

    def list_nodes(self) -> list[dict]:
        return list(self.json_call("supernode", "list").get("nodes", []))

    def start_run(self, app: Path, run_config: str | None = None) -> int:
        """Submit the app folder as a run (its ServerApp starts on the SuperLink host)."""
        extra = ["--run-config", run_config] if run_config else []
        return int(self.json_call("run", str(Path(app).resolve()), CONNECTION, *extra)["run-id"])


def operator_cli(state_dir: Path) -> FlwrCli:
    """The operator profile that ``hlip-fed server start`` writes into the SuperLink's state dir."""
    home = Path(state_dir) / OPERATOR_HOME
    if not (home / "config.toml").is_file():
        raise HlipError(f"{home}/config.toml missing; run `hlip-fed server start --state {state_dir}` "
                        "on this host first")
    return FlwrCli(home)
