"""Child processes started and stopped by PID, with their output in a log file.

Every daemon is started in a new session, so its PID is also its process-group ID: stopping
signals the whole group (the daemon and whatever it forked) without ever matching processes by
name, which could hit another user's or another test's Flower. Flower detaches some helpers into
sessions of their own (``flower-superexec``), so the daemon's descendants are also collected by
PID (psutil) before it is stopped, and any that outlive it are killed. A PID with its start time
names one process, so a reused PID is never signalled.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hlip_fed.errors import HlipError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it, so parallel runs don't clash)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    """Refuse early if something already listens there: a probe would otherwise mistake that
    process for ours, and our daemon would die on its bind error after we reported success."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons do
        try:
            s.bind((host, port))
        except OSError as exc:
            raise HlipError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class ManagedProcess:
    """One daemon we started: its name, PID and log, and how to stop it."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)
    # Descendants seen while it ran, as (PID, start time) so a reused PID is never signalled.
    helpers: list[tuple[int, str]] = field(default_factory=list)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self, env: Mapping[str, str] | None = None,
              cwd: Path | None = None) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            try:
                self.popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True)
            except OSError as exc:
                raise HlipError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        return self

    def remember_descendants(self) -> list[int]:
        """Record the daemon's current descendants, so they can be stopped even if it crashes."""
        if self.running():
            for pid in _descendants(self.popen.pid):
                ident = (pid, process_start_time(pid))
                if ident[1] and ident not in self.helpers:
                    self.helpers.append(ident)
        return self.helpers

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait, then SIGKILL it; safe to call twice or after a crash."""
        if self.popen is None:
            return None
        pid = self.popen.pid
        descendants = list(self.remember_descendants())
        if self.popen.poll() is None:
            _signal_group(pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(pid, signal.SIGKILL)
                self.popen.wait(5)
        # Children that outlived their parent are still in the group: stop them too.
        _signal_group(pid, signal.SIGKILL)
        _stop_pids(descendants)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL the daemon, its group and every descendant at once: a crash, not a shutdown."""
        if self.popen is None:
            return
        descendants = list(self.remember_descendants())
        _signal_group(self.popen.pid, signal.SIGKILL)
        for pid, _ in descendants:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        _stop_pids(descendants, grace=0.0)

    def fail(self, reason: str) -> HlipError:
        return HlipError(f"{self.name} {reason}; last log lines from {self.log_path}:\n"
                         f"{log_tail(self.log_path)}")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (empty if it is gone)."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def process_start_time(pid: int) -> str:
    """The start time of ``pid`` (``""`` if it is gone): with the PID it names one process."""
    try:
        return repr(psutil.Process(pid).create_time()) if pid > 0 else ""
    except psutil.Error:
        return ""


def same_process_alive(pid: int, start_time: str) -> bool:
    """Whether the process ``pid`` started at ``start_time`` still runs (a zombie does not)."""
    return bool(start_time) and _alive((pid, start_time))


def _alive(ident: tuple[int, str]) -> bool:
    """Still the same process (same start time) and not a zombie."""
    try:
        proc = psutil.Process(ident[0])
        return repr(proc.create_time()) == ident[1] and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _stop_pids(idents: list[tuple[int, str]], grace: float = 3.0) -> None:
    """Give descendants that outlived their parent a moment to exit on their own, then kill them."""
    deadline = time.monotonic() + grace
    alive = list(idents)
    while alive and time.monotonic() < deadline:
        alive = [i for i in alive if _alive(i)]
        if alive:
            time.sleep(0.1)
    for pid, _ in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for_port(proc: ManagedProcess, host: str, port: int, timeout: float = 30.0) -> None:
    """Wait until ``proc`` accepts TCP connections on ``host:port``; fail fast if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise proc.fail(f"exited with code {proc.popen.returncode if proc.popen else '?'} "
                            "before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise proc.fail(f"did not listen on {host}:{port} within {timeout:.0f}s")


def stop_all(procs: Sequence[ManagedProcess]) -> None:
    """Stop in reverse start order, so front ends go before the services they depend on."""
    for proc in reversed(procs):
        proc.stop()
