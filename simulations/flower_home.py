"""A project-local Flower home for ``flwr run . local-simulation``.

A fresh Flower home defines only the ``local`` connection, and ``flwr run`` reads connections from
``$FLWR_HOME/config.toml``. This writes one whose ``local-simulation`` connection runs one
simulated SuperNode per site of a consortium, each with one CPU, and tells the simulation's Ray
how many CPUs this process may use (Ray otherwise counts the host's, and runs more ClientApp
actors than there are cores to run them). Each home also gets its own pair of ports for the local
SuperLink that ``flwr run`` starts (Flower's default is one fixed pair per machine, so a second
simulation - a test beside a demo - would submit its run to the first one's SuperLink).

    python -m simulations.flower_home --home .flwr --data data/demo
    FLWR_HOME=.flwr flwr run . local-simulation --stream
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
from pathlib import Path

import psutil

from hlip_fed.deploy.flower_env import flower_env as deploy_flower_env
from hlip_fed.federation.run import consortium_sites

CONFIG = """[superlink]
default = "local-simulation"

[superlink.local]
address = ":local:"

[superlink.local-simulation]
address = ":local:"
options.num-supernodes = {sites}
options.backend.client-resources.num-cpus = 1
options.backend.init-args.num-cpus = {cpus}
"""

PORTS_FILE = "local-ports.json"  # this home's local SuperLink ports, as flwr's environment variables


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def write_flower_home(home: str | Path, sites: int) -> Path:
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(CONFIG.format(sites=sites, cpus=len(os.sched_getaffinity(0))))
    ports = home / PORTS_FILE
    if not ports.exists():  # kept across rewrites, so a SuperLink this home left running is found again
        http, control = _free_ports(2)
        ports.write_text(json.dumps({"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
                                     "FLWR_LOCAL_CONTROL_API_PORT": str(control)}) + "\n")
    return path


def flower_env(home: str | Path) -> dict[str, str]:
    """The environment for a ``flwr`` process: this Flower home, its local SuperLink's ports and the
    privacy switches."""
    env = deploy_flower_env(flwr_home=Path(home).resolve())
    env["HF_HUB_OFFLINE"] = "1"  # a simulation never downloads a model
    ports = Path(home) / PORTS_FILE
    if ports.exists():
        env.update(json.loads(ports.read_text()))
    return env


def local_superlink_pids(home: str | Path) -> list[int]:
    """PIDs of the detached local SuperLink that ``flwr run`` started for this Flower home
    (its database lives under ``<home>/local-superlink``); no command of Flower's stops it."""
    pattern = str(Path(home).resolve() / "local-superlink")
    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if p.info["pid"] != os.getpid() and pattern in " ".join(p.info["cmdline"] or [])]


def stop_local_superlink(home: str | Path, sig: int = signal.SIGKILL) -> None:
    """Signal every process of this Flower home's local SuperLink (gone already is fine)."""
    for pid in local_superlink_pids(home):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=".flwr")
    parser.add_argument("--data", required=True, help="consortium folder (one SuperNode per site)")
    args = parser.parse_args()
    path = write_flower_home(args.home, len(consortium_sites(args.data)))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
