"""Launching the consortium's SuperLink with a closed control plane.

Two processes, both started from here and stopped by PID:

* ``flower-superlink`` on **loopback** (default ``127.0.0.1:9093``): Fleet, Control and Runtime
  APIs (Flower 1.42 cannot separate them), TLS from the consortium PKI,
  ``--enable-supernode-auth``, a persistent SQLite state, no runtime dependency installation;
* the :mod:`fleet gateway <hlip_fed.deploy.fleet_gateway>` on the **site-facing** address
  (default ``0.0.0.0:9092``), presenting the same certificate and relaying only Fleet routes.

Sites are given ``HOST:9092``; the operator runs ``flwr`` on the SuperLink host against
``127.0.0.1:9093`` (see :mod:`hlip_fed.deploy.flwr_cli`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from hlip_fed.atomic import write_json_atomic
from hlip_fed.deploy.flower_env import flower_env
from hlip_fed.deploy.processes import (
    ManagedProcess,
    check_port_free,
    process_start_time,
    stop_all,
    wait_for_port,
)
from hlip_fed.errors import HlipError
from hlip_fed.security.files import check_private_mode
from hlip_fed.security.pki import (
    PkiPaths,
    days_left,
    load_certificate,
    subject_alt_names,
    verify_issued_by,
)

FLEET_PORT = 9092
CONTROL_PORT = 9093
STATE_DB = "superlink.db"
SERVER_FILE = "server.json"  # PIDs and addresses of the running server, for `hlip-fed server stop`
OPERATOR_HOME = "operator"  # the operator's `flwr` profile (loopback Control API), in the state dir


def flower_executable(name: str) -> str:
    """Flower's console script from this interpreter's environment, else from ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise HlipError(f"{name} not found; install the project (it depends on flwr)")
    return found


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class SuperLinkConfig:
    """Where the SuperLink listens, which certificates it uses and where it keeps state."""

    certs: Path
    state_dir: Path
    fleet_host: str = "0.0.0.0"
    fleet_port: int = FLEET_PORT
    control_host: str = "127.0.0.1"
    control_port: int = CONTROL_PORT
    isolation: str = "subprocess"  # "process" when ServerApps are started separately
    max_request_mb: int = 1024  # the gateway refuses larger requests (a ViT-B update is ~350 MB in fp32)

    @property
    def pki(self) -> PkiPaths:
        return PkiPaths(Path(self.certs))

    @property
    def control_address(self) -> str:
        """Where the operator's ``flwr`` and the gateway reach the SuperLink."""
        return _address(self.control_host, self.control_port)

    @property
    def fleet_address(self) -> str:
        return _address(self.fleet_host, self.fleet_port)

    @property
    def database(self) -> Path:
        return Path(self.state_dir) / STATE_DB

    @property
    def log_dir(self) -> Path:
        return Path(self.state_dir) / "logs"

    def validate(self) -> None:
        """Refuse configurations that would open the control plane or fail at the first handshake."""
        if not is_loopback(self.control_host):
            raise HlipError(f"the Control API must stay on loopback, not {self.control_host}: "
                            "Flower does not authenticate it")
        if self.fleet_port == self.control_port:
            raise HlipError(f"the fleet and control ports must differ (both {self.fleet_port})")
        # The CA key is not needed here and must not be on the SuperLink host at all: whoever
        # steals it can issue a server certificate every site trusts.
        if self.pki.ca_key.exists():
            raise HlipError(f"{self.pki.ca_key}: the CA private key must not sit in the folder the SuperLink "
                            "serves from; keep it offline (hlip-fed certs init --ca-out) and copy only ca.crt, "
                            "superlink.crt and superlink.key to the server")
        for path in (self.pki.ca_cert, self.pki.server_cert, self.pki.server_key):
            if not path.is_file():
                raise HlipError(f"{path} missing; create it with `hlip-fed certs init`")
        check_private_mode(self.pki.server_key)
        ca, cert = load_certificate(self.pki.ca_cert), load_certificate(self.pki.server_cert)
        verify_issued_by(cert, ca)
        for c, path in ((ca, self.pki.ca_cert), (cert, self.pki.server_cert)):
            if days_left(c) < 0:
                raise HlipError(f"{path} expired on {c.not_valid_after_utc:%Y-%m-%d}")
        host = self.control_host.strip("[]")
        if host not in subject_alt_names(cert):
            raise HlipError(f"{self.pki.server_cert} does not name {host}; the gateway and the "
                            "operator connect there (re-run certs init without --no-loopback)")


def superlink_command(cfg: SuperLinkConfig) -> list[str]:
    """``flower-superlink`` bound to loopback with TLS, node auth and persistent state."""
    pki = cfg.pki
    return [
        flower_executable("flower-superlink"),
        "--ssl-ca-certfile", str(pki.ca_cert),
        "--ssl-certfile", str(pki.server_cert),
        "--ssl-keyfile", str(pki.server_key),
        "--enable-supernode-auth",
        "--database", str(cfg.database),
        "--isolation", cfg.isolation,
        "--disable-runtime-dependency-installation",
        "--host", cfg.control_host.strip("[]"),
        "--port", str(cfg.control_port),
    ]


def gateway_command(cfg: SuperLinkConfig) -> list[str]:
    """The fleet gateway, run by this interpreter so it uses the same installed packages."""
    pki = cfg.pki
    return [
        sys.executable, "-m", "hlip_fed.deploy.fleet_gateway",
        "--listen", cfg.fleet_address,
        "--upstream", cfg.control_address,
        "--certfile", str(pki.server_cert),
        "--keyfile", str(pki.server_key),
        "--ca-file", str(pki.ca_cert),
        "--max-request-mb", str(cfg.max_request_mb),
    ]


@dataclass
class SuperLinkDeployment:
    """The running SuperLink + gateway pair; a context manager that always stops both."""

    cfg: SuperLinkConfig
    processes: list[ManagedProcess] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> SuperLinkDeployment:
        cfg = self.cfg
        cfg.validate()
        check_port_free(cfg.control_host.strip("[]"), cfg.control_port)
        check_port_free(cfg.fleet_host.strip("[]"), cfg.fleet_port)
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        env = flower_env(flwr_home=Path(cfg.state_dir) / "flwr-home")
        try:
            link = ManagedProcess("flower-superlink", superlink_command(cfg),
                                  cfg.log_dir / "superlink.log")
            self.processes.append(link.start(env))
            wait_for_port(link, cfg.control_host.strip("[]"), cfg.control_port, timeout)
            gateway = ManagedProcess("fleet gateway", gateway_command(cfg),
                                     cfg.log_dir / "fleet-gateway.log")
            self.processes.append(gateway.start(env))
            dial = "127.0.0.1" if cfg.fleet_host in ("0.0.0.0", "") else (
                "::1" if cfg.fleet_host == "::" else cfg.fleet_host.strip("[]"))
            wait_for_port(gateway, dial, cfg.fleet_port, timeout)
            link.remember_descendants()  # flower-superexec, which detaches into its own session
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_all(self.processes)

    def run_foreground(self, poll_s: float = 1.0, on_ready=None) -> int:
        """Start, then supervise until SIGTERM/SIGINT (exit 0) or until a daemon dies (error).

        Meant for a service manager (systemd ``Type=simple``): one foreground process that owns
        both daemons, records them in ``server.json``, stops both when either dies so the
        manager restarts the pair, and leaves nothing running when it exits.
        """
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        info = Path(self.cfg.state_dir) / SERVER_FILE
        try:
            self.start()
            _write_json(info, {
                "pid": os.getpid(), "start_time": process_start_time(os.getpid()),
                "fleet": self.cfg.fleet_address, "control": self.cfg.control_address,
                "processes": self.pids(),
            })
            if on_ready is not None:
                on_ready(self)
            while not stop.wait(poll_s):
                for proc in self.processes:
                    proc.remember_descendants()  # ServerApp helpers, so they are stopped too
                    if not proc.running():
                        raise proc.fail(f"exited with code {proc.popen.returncode}")
        finally:
            self.stop()
            info.unlink(missing_ok=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    def pids(self) -> dict[str, int | None]:
        return {p.name: p.pid for p in self.processes}

    def __enter__(self) -> SuperLinkDeployment:
        return self.start() if not self.processes else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data)


def read_server_info(state_dir: Path) -> dict | None:
    """The running server's ``server.json``, or None when no server of this state dir runs."""
    path = Path(state_dir) / SERVER_FILE
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if process_start_time(int(info.get("pid", 0))) != info.get("start_time"):
        return None  # a stale file from a server that was killed; the PID may be reused
    return info
