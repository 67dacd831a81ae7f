"""``hlip-fed server``: run the consortium's SuperLink behind the fleet gateway, start runs.

``start`` runs in the foreground (for a service manager) and wraps Flower's ``flower-superlink``
on loopback with TLS, ``--enable-supernode-auth``, a persistent database and no runtime
installation or telemetry, plus the site-facing gateway (``docs/deployment.md``); ``stop`` ends
a server started for the same state folder; ``run`` submits the app as a run through the
operator's loopback connection.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("server", help="run the federation server (SuperLink + gateway)")
    sub = parser.add_subparsers(dest="server_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("start", help="start flower-superlink and the fleet gateway (foreground)")
    p.add_argument("--certs", type=Path, required=True, help="folder with ca.crt, superlink.crt/.key")
    p.add_argument("--state", type=Path, required=True, help="state folder (database, logs, enrolments)")
    p.add_argument("--host", default="0.0.0.0", help="site-facing address of the gateway (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=9092, help="site-facing port (default 9092)")
    p.add_argument("--control-port", type=int, default=9093,
                   help="loopback port of the SuperLink itself (default 9093)")
    p.add_argument("--max-request-mb", type=int, default=1024,
                   help="the gateway refuses larger requests from sites (default 1024)")
    p.set_defaults(func=_start)

    p = sub.add_parser("stop", help="stop the server started with this state folder")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=60.0)
    p.set_defaults(func=_stop)

    p = sub.add_parser("run", help="start a federated run of the app (run on the server host)")
    p.add_argument("app", type=Path, nargs="?", default=Path("."), help="app folder (default .)")
    p.add_argument("--state", type=Path, required=True)
    p.add_argument("--run-config", help="e.g. \"run-dir='/srv/runs/r1' overrides='federation.rounds=20'\"")
    p.set_defaults(func=_run)


def _start(args: argparse.Namespace) -> int:
    from hlip_fed.deploy.flwr_cli import write_connection
    from hlip_fed.deploy.superlink import OPERATOR_HOME, SuperLinkConfig, SuperLinkDeployment

    cfg = SuperLinkConfig(args.certs, args.state, fleet_host=args.host, fleet_port=args.port,
                          control_port=args.control_port, max_request_mb=args.max_request_mb)

    def ready(deployment: SuperLinkDeployment) -> None:
        home = Path(args.state) / OPERATOR_HOME
        write_connection(home, cfg.control_address, cfg.pki.ca_cert)
        pids = ", ".join(f"{k} {v}" for k, v in deployment.pids().items())
        print(f"SuperLink on {cfg.control_address} (loopback), sites connect to {cfg.fleet_address}; "
              f"{pids}; logs in {cfg.log_dir}", flush=True)

    return SuperLinkDeployment(cfg).run_foreground(on_ready=ready)


def _stop(args: argparse.Namespace) -> int:
    import os
    import signal
    import time

    from hlip_fed.deploy.processes import process_start_time
    from hlip_fed.deploy.superlink import read_server_info
    from hlip_fed.errors import HlipError

    info = read_server_info(args.state)
    if info is None:
        print(f"no server is running for {args.state}")
        return 0
    pid, started = int(info["pid"]), info["start_time"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while process_start_time(pid) == started and time.monotonic() < deadline:
        time.sleep(0.2)
    if process_start_time(pid) == started:
        raise HlipError(f"server (pid {pid}) did not stop within {args.timeout:g}s")
    print(f"stopped server (pid {pid})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from hlip_fed.deploy.flwr_cli import operator_cli

    run_id = operator_cli(args.state).start_run(args.app, args.run_config)
    print(f"started run {run_id}; follow it with `flwr log {run_id}` "
          f"(FLWR_HOME={Path(args.state).resolve() / 'operator'})")
    return 0
