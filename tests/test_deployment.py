"""A hospital deployment on loopback with the operator commands and real Flower daemons.

One server (``hlip-fed server start``: SuperLink + fleet gateway, TLS, node authentication) and
three sites (``hlip-fed site start``) of a small phantom consortium (the demo preset: NIfTI and DICOM
sites, real reports), enrolled with ``hlip-fed site enroll``. The first site is honest,
the second is killed with SIGKILL mid-round and restarted, the third misbehaves through its node config
(NaN, 1000x update, missing key in rounds 1, 2, 3). The SuperLink is killed after round 2 and
restarted; a new run with the same run folder resumes at round 3. The sites run the app version
their operators approved (``hlip-fed site approve``); the same app with one line changed is refused
before any of its code runs. Every daemon is started with
HTTP(S) proxies pointing at a local trap, so any telemetry or other outbound request would be
seen. The tests share the daemons and run in file order; every process is stopped by PID at the
end, also when a test fails.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import FAST_RUN
from client.site_exec import NOT_APPROVED
from hlip_fed.deploy.app_bundle import build_app
from hlip_fed.deploy.enrolment import Enrolment
from hlip_fed.deploy.flwr_cli import FlwrCli, operator_cli, write_connection
from hlip_fed.deploy.processes import (
    ManagedProcess,
    free_port,
    log_tail,
    process_start_time,
    same_process_alive,
)
from hlip_fed.deploy.superlink import read_server_info
from hlip_fed.errors import HlipError
from hlip_fed.federation.audit import read_audit
from hlip_fed.federation.checkpoint import load_latest
from hlip_fed.federation.params import federated_keys
from hlip_fed.federation.run import config_from_run
from hlip_fed.model import create_model
from hlip_fed.security.approvals import approve
from hlip_fed.security.pki import init_pki
from hlip_fed.security.site_keys import create_site_key

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
HLIP = [sys.executable, "-m", "hlip_fed.cli"]
HONEST, KILLED, BAD = "northgate-stroke", "riverside-oncology", "st-mary-general"  # demo preset sites
OVERRIDES = FAST_RUN + ["federation.rounds=3", "federation.round_timeout_s=150",
                        "federation.node_wait_s=120", "train.threads=1"]


class ProxyTrap:
    """A listening socket that daemons are told is their HTTP(S) proxy: it records connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.hits: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.hits.append(conn.recv(512))
                except OSError:
                    self.hits.append(b"")

    def close(self) -> None:
        self.sock.close()


def _wait(condition, timeout: float, what: str, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    if not condition():
        tails = "\n".join(f"--- {p}\n{log_tail(p, 40)}" for p in logs)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class Deployment:
    def __init__(self, root: Path, consortium: Path) -> None:
        self.root, self.consortium = root, consortium
        self.pki = init_pki(root / "certs", "127.0.0.1", ca_out=root / "ca")
        self.state = root / "state"
        self.fleet_port, self.control_port = free_port(), free_port()
        self.fleet = f"127.0.0.1:{self.fleet_port}"
        self.keys = {n: create_site_key(n, root / "keys") for n in (HONEST, KILLED, BAD)}
        self.rogue = create_site_key("rogue", root / "rogue")
        self.run_dir = root / "run"
        self.trap = ProxyTrap()
        proxy = f"http://127.0.0.1:{self.trap.port}"
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                        HTTP_PROXY=proxy, HTTPS_PROXY=proxy, ALL_PROXY=proxy,
                        http_proxy=proxy, https_proxy=proxy, all_proxy=proxy,
                        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        self.env.pop("HLIP_FED_TEST_FAULTS", None)
        self.procs: list[ManagedProcess] = []
        self.seen: set[tuple[int, str]] = set()  # every daemon PID (with start time) ever seen
        self.servers = 0
        self.app_hash = build_app(ROOT, root / "fab")[1]  # the bundle flwr run sends from this checkout

    # -- processes -------------------------------------------------------------------------------
    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*HLIP, *map(str, args)], env=self.env, capture_output=True, text=True,
                              timeout=180, stdin=subprocess.DEVNULL)

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.root / "logs" / f"{name}-{len(self.procs)}.log")
        self.procs.append(proc.start(env or self.env))
        return proc

    def remember(self) -> None:
        for proc in self.procs:
            if proc.running():
                self.seen.add((proc.pid, process_start_time(proc.pid)))
                self.seen.update(proc.remember_descendants())

    def start_server(self) -> ManagedProcess:
        self.servers += 1
        proc = self._spawn(f"server{self.servers}", [
            *HLIP, "server", "start", "--certs", str(self.root / "certs"), "--state", str(self.state),
            "--host", "127.0.0.1", "--port", str(self.fleet_port), "--control-port", str(self.control_port)])
        _wait(lambda: read_server_info(self.state) is not None or not proc.running(), 90,
              "the server to start", [proc.log_path])
        assert proc.running(), log_tail(proc.log_path)
        self.remember()
        return proc

    def start_node(self, name: str, key=None, faults: bool = False, **node_config) -> ManagedProcess:
        key = key or self.keys[name]
        # These sites agree to the test's tiny settings (2 studies x 2 steps, a random text tower),
        # which the default site policy refuses (tests/test_site_policy.py).
        state = self.root / "site-state" / name
        state.mkdir(parents=True, exist_ok=True)
        (state / "policy.yaml").write_text("allow: ['*']\ndeny: []\nbounds: {}\n")
        approve(state, self.app_hash)
        argv = [*HLIP, "site", "start", "--superlink", self.fleet, "--ca", str(self.pki.ca_cert),
                "--key", str(key.private), "--data", str(self.consortium / "sites" / name),
                "--state", str(self.root / "site-state" / name), "--name", name,
                "--truth", str(self.consortium / "truth" / f"{name}.jsonl"),
                "--runtime-port", str(free_port())]
        for k, v in node_config.items():
            argv += ["--node-config", f"{k}={v}"]
        env = dict(self.env, HLIP_FED_TEST_FAULTS="1") if faults else None
        return self._spawn(f"node-{name}", argv, env)

    def stop_everything(self) -> None:
        self.remember()
        for proc in reversed(self.procs):
            proc.stop()
        for pid, started in self.seen:  # anything that escaped its parent
            if same_process_alive(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.trap.close()

    # -- operator view ---------------------------------------------------------------------------
    @property
    def operator(self) -> FlwrCli:
        return operator_cli(self.state)

    def node_id(self, name: str) -> int:
        return Enrolment(self.state, self.operator).active(name).node_id

    def status(self, name: str) -> str | None:
        node = self.node_id(name)
        return next((n["status"] for n in self.operator.list_nodes() if int(n["node-id"]) == node), None)

    def rounds(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def run_config(self, run_dir: Path | None = None, *extra: str) -> str:
        overrides = " ".join(shlex.quote(o) for o in [*OVERRIDES, *extra])
        return (f"data-root='{self.consortium}' run-dir='{run_dir or self.run_dir}' config='' "
                f"overrides=\"{overrides}\"")

    def logs(self) -> list[Path]:
        return [p.log_path for p in self.procs] + sorted((self.state / "logs").glob("*.log"))


@pytest.fixture(scope="module")
def phantom_consortium(tmp_path_factory):
    """Three sites of the demo preset, six studies each: the real file formats at CI size."""
    from hlip_fed.synth.consortium import build_consortium

    root = tmp_path_factory.mktemp("phantoms") / "consortium"
    build_consortium(root, "demo", sites=3, studies=6, heldout=6)
    return root


@pytest.fixture(scope="module")
def dep(tmp_path_factory, phantom_consortium):
    d = Deployment(tmp_path_factory.mktemp("deployment"), phantom_consortium)
    try:
        d.start_server()
        for name in (HONEST, KILLED, BAD):
            r = d.cli("site", "enroll", name, "--key", d.keys[name].public, "--state", d.state)
            assert r.returncode == 0, r.stderr
            assert f"enrolled site {name} as node" in r.stdout
        d.start_node(HONEST)
        d.start_node(KILLED)
        d.start_node(BAD, faults=True, misbehave="cycle")
        _wait(lambda: all(d.status(n) == "online" for n in (HONEST, KILLED, BAD)), 120,
              "three SuperNodes online", d.logs())
        d.remember()
        yield d
    finally:
        d.stop_everything()
    _wait(lambda: not any(same_process_alive(*ident) for ident in d.seen), 10, "every process to end")


def test_unenrolled_key_refused_and_a_site_cannot_enroll_or_start_a_run(dep):
    rogue = dep.start_node(HONEST, key=dep.rogue)
    _wait(lambda: not rogue.running(), 60, "the unenrolled SuperNode to be refused", [rogue.log_path])
    assert rogue.popen.returncode != 0
    assert "Failed to activate SuperNode" in rogue.log_path.read_text()
    site = FlwrCli(dep.root / "site-flwr")
    write_connection(site.flwr_home, dep.fleet, dep.pki.ca_cert)
    with pytest.raises(HlipError, match="403"):
        site.register_node(dep.rogue.public)
    with pytest.raises(HlipError, match="403"):
        site.start_run(ROOT, dep.run_config())
    assert not dep.operator.json_call("list").get("runs")
    for port in (dep.fleet_port, dep.control_port):
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", timeout=10)


def _by_node(dep, record: dict, key: str) -> set[str]:
    names = {str(dep.node_id(n)): n for n in (HONEST, KILLED, BAD)}
    if key == "rejected":
        return {names.get(str(r["node"]), str(r["node"])) for r in record[key]}
    if key == "no_reply":
        return {names.get(str(n), str(n)) for n in record[key]}
    return {names.get(k, k) for k in record[key]}


def test_rounds_survive_a_killed_site_a_misbehaving_site_and_a_killed_superlink(dep):
    ids = {n: dep.node_id(n) for n in (HONEST, KILLED, BAD)}
    first = dep.operator.start_run(ROOT, dep.run_config())
    assert first > 0
    killed = next(p for p in dep.procs if p.name == f"node-{KILLED}" and p.running())

    # The second site dies with SIGKILL after receiving its first train message, before it can reply.
    _wait(lambda: "Receiving: train message" in killed.log_path.read_text(), 240,
          f"{KILLED} to receive its train message", dep.logs())
    assert not read_audit(dep.root / "site-state" / KILLED)  # nothing was sent yet
    killed.kill()
    assert not killed.running()
    # Flower refuses a second activation until the dead node's heartbeat lapses; then it rejoins.
    _wait(lambda: dep.status(KILLED) == "offline", 150, f"the SuperLink to see {KILLED} offline", dep.logs())
    dep.start_node(KILLED)

    _wait(lambda: len(dep.rounds()) >= 1, 300, "round 1", dep.logs())
    r1 = dep.rounds()[0]
    assert _by_node(dep, r1, "train_sites") == {HONEST}
    assert BAD in _by_node(dep, r1, "rejected")
    assert any("non-finite" in r["reason"] for r in r1["rejected"] if r["node"] == ids[BAD])
    assert KILLED in _by_node(dep, r1, "rejected") | _by_node(dep, r1, "no_reply")

    _wait(lambda: len(dep.rounds()) >= 2, 300, "round 2", dep.logs())
    r2 = dep.rounds()[1]
    assert _by_node(dep, r2, "train_sites") == {HONEST, KILLED}  # the restarted site rejoined
    assert _by_node(dep, r2, "rejected") == {BAD}
    assert "update norm" in r2["rejected"][0]["reason"]

    # The SuperLink dies with SIGKILL; `server start` stops the rest and exits for a restart.
    info = read_server_info(dep.state)
    dep.remember()
    server = next(p for p in dep.procs if p.name.startswith("server") and p.running())
    os.kill(info["processes"]["flower-superlink"], signal.SIGKILL)
    _wait(lambda: not server.running(), 60, "the server command to exit", dep.logs())
    assert server.popen.returncode != 0
    assert load_latest(dep.run_dir / "checkpoints").round == 2
    dep.start_server()
    _wait(lambda: all(dep.status(n) == "online" for n in (HONEST, KILLED, BAD)), 180,
          "the SuperNodes to reconnect", dep.logs())
    second = dep.operator.start_run(ROOT, dep.run_config())
    assert second != first
    _wait(lambda: (dep.run_dir / "model" / "model.safetensors").exists(), 400,
          "the resumed run to finish", dep.logs())
    rounds = dep.rounds()
    assert [r["round"] for r in rounds] == [1, 2, 3]  # resumed at 3, nothing lost or repeated
    r3 = rounds[2]
    assert _by_node(dep, r3, "train_sites") == {HONEST, KILLED}
    assert _by_node(dep, r3, "rejected") == {BAD}
    assert "missing" in r3["rejected"][0]["reason"]
    assert load_latest(dep.run_dir / "checkpoints").round == 3
    dep.remember()


def test_what_sites_sent_is_only_federated_arrays_and_scalar_metrics(dep):
    cfg = config_from_run({"config": "", "overrides": shlex.join(OVERRIDES)})
    keys = federated_keys(create_model(cfg.model, seed=0), cfg.federation.groups)
    # reply-seconds: the handler's duration, for the server's round profile
    metric_names = {"num-examples", "train-loss", "train-seconds", "train-steps", "bytes-sent", "reply-seconds"}
    for name in (HONEST, KILLED, BAD):
        entries = read_audit(dep.root / "site-state" / name)
        train = [e for e in entries if e["type"] == "train"]
        assert train, name
        for e in entries:
            assert "error" not in e, e
            assert e["config"] == {}
            if e["type"] == "evaluate":
                assert e["records"] == {"metrics": "MetricRecord"} and e["bytes"] == 0
                continue
            # a training reply may add the received model's evaluation (federation.evaluate_with_train)
            carried = e["records"].pop("evaluation", None)
            assert e["records"] == {"arrays": "ArrayRecord", "metrics": "MetricRecord"}
            if carried:
                assert carried == "MetricRecord" and e["round"] > 1
                assert all(isinstance(v, float) for v in e["metrics"]["evaluation"].values())
            sent = e["arrays"]["arrays"]
            expected = keys[:-1] if name == BAD and e["round"] == 3 else keys
            assert sent["keys"] == expected and sent["dtypes"] == ["float32"]
            assert set(e["metrics"]["metrics"]) == metric_names
            assert all(isinstance(v, float) for v in e["metrics"]["metrics"].values())
    assert [e["round"] for e in read_audit(dep.root / "site-state" / HONEST) if e["type"] == "train"] == [1, 2, 3]
    assert not dep.trap.hits, f"outbound requests: {dep.trap.hits[:3]}"
    node = next(p for p in dep.procs if p.name == f"node-{HONEST}" and p.running())
    environ = Path(f"/proc/{node.pid}/environ").read_bytes().split(b"\0")
    assert b"FLWR_TELEMETRY_ENABLED=0" in environ


def test_revoked_site_is_refused_at_its_next_attempt(dep):
    node = next(p for p in dep.procs if p.name == f"node-{HONEST}" and p.running())
    r = dep.cli("site", "revoke", HONEST, "--state", dep.state)
    assert r.returncode == 0, r.stderr
    _wait(lambda: not node.running(), 60, "the revoked SuperNode to stop", [node.log_path])
    again = dep.start_node(HONEST)
    _wait(lambda: not again.running(), 60, "the revoked key to be refused", [again.log_path])
    assert again.popen.returncode != 0
    listing = dep.cli("site", "list", "--state", dep.state, "--json")
    rows = {row["name"]: row for row in json.loads(listing.stdout)}
    assert rows[HONEST]["revoked_at"] and rows[HONEST]["status"] == "unregistered"


def test_a_changed_app_is_refused_before_any_of_its_code_runs(dep, tmp_path):
    """One line added to client/app.py: a new FAB hash, which no site approved. The line is a
    canary that would write a file when the module is imported."""
    app = tmp_path / "hlip-fed"
    app.mkdir()
    (app / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    for package in ("hlip_fed", "server", "client"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    canary = tmp_path / "canary"
    with open(app / "client" / "app.py", "a") as fh:
        fh.write(f"\nimport pathlib; pathlib.Path({str(canary)!r}).write_text('ran')\n")
    changed = build_app(app, tmp_path / "fab")[1]
    assert changed != dep.app_hash
    enrolled = Enrolment(dep.state, dep.operator)
    sites = [n for n in (HONEST, KILLED, BAD) if enrolled.active(n) and dep.status(n) == "online"]
    assert sites
    before = {n: len(read_audit(dep.root / "site-state" / n)) for n in sites}
    run_dir = tmp_path / "run"
    # One round, waiting for the sites that are online (the revoked one is not).
    dep.operator.start_run(app, dep.run_config(run_dir, "federation.rounds=1", f"federation.min_nodes={len(sites)}"))
    _wait(lambda: (run_dir / "metrics.jsonl").exists(), 300, "the refused round", dep.logs())
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert not record["train_sites"]
    reasons = {r["node"]: r["reason"] for r in record["rejected"]}
    for name in sites:
        assert NOT_APPROVED in reasons[dep.node_id(name)]
        refusals = read_audit(dep.root / "site-state" / name)[before[name]:]
        assert refusals and all(e["error"] == NOT_APPROVED and changed in e["detail"] for e in refusals)
    assert not canary.exists()
