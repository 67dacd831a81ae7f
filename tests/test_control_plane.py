"""The closed control plane, with real Flower daemons on loopback.

A SuperLink (TLS from our PKI, ``--enable-supernode-auth``, persistent state) runs on a loopback
port with the fleet gateway in front on a second port. The site side holds only the CA
certificate and the gateway's address; the operator uses the loopback port. Every process a test
starts is stopped by PID in a ``finally``, also when the test fails.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from pathlib import Path

import httpx
import pytest

from hlip_fed.deploy.fleet_gateway import ALLOWED_PATHS, FLEET_ROUTES
from hlip_fed.deploy.enrolment import Enrolment, SiteRecord
from hlip_fed.deploy.flower_env import flower_env
from hlip_fed.deploy.flwr_cli import FlwrCli, write_connection
from hlip_fed.deploy.processes import ManagedProcess, free_port
from hlip_fed.deploy.superlink import (
    SuperLinkConfig,
    SuperLinkDeployment,
    flower_executable,
    superlink_command,
)
from hlip_fed.errors import HlipError
from hlip_fed.security.pki import init_pki
from hlip_fed.security.site_keys import SiteKeyPaths, create_site_key

pytestmark = pytest.mark.timeout(120)

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probeapp"
version = "1.0.0"
description = "A Flower app that is only submitted, never executed"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "hlipfedtest"

[tool.flwr.app.components]
serverapp = "probeapp.server:app"
clientapp = "probeapp.client:app"

[tool.flwr.app.config]
num-server-rounds = 1
"""


class Federation:
    """Paths, processes and the two ``flwr`` profiles of one test federation."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = init_pki(root / "certs", "127.0.0.1", ca_out=root / "ca")
        self.rogue = create_site_key("rogue", root / "rogue")  # never enrolled
        # ServerApps are not executed here ("process" isolation starts none): a run that the
        # operator starts stays pending, which is all these tests need to observe.
        self.cfg = SuperLinkConfig(root / "certs", root / "state", fleet_host="127.0.0.1",
                                   fleet_port=free_port(), control_port=free_port(),
                                   isolation="process")
        self.deployment = SuperLinkDeployment(self.cfg)
        self.operator = FlwrCli(root / "operator-home")
        write_connection(self.operator.flwr_home, self.cfg.control_address, self.pki.ca_cert)
        # The site side: the same CA certificate, but only the site-facing address.
        self.site_address = f"127.0.0.1:{self.cfg.fleet_port}"
        self.site = FlwrCli(root / "site-home")
        write_connection(self.site.flwr_home, self.site_address, self.pki.ca_cert)
        self.app = root / "app"
        (self.app / "probeapp").mkdir(parents=True)
        (self.app / "pyproject.toml").write_text(APP_PYPROJECT)
        for name in ("__init__", "server", "client"):
            (self.app / "probeapp" / f"{name}.py").write_text("app = None\n")

        self.enrolment = Enrolment(self.cfg.state_dir, self.operator)

    def enroll(self, name: str) -> tuple[SiteKeyPaths, SiteRecord]:
        """Create site ``name``'s key and enrol it through the operator's loopback connection."""
        keys = create_site_key(name, self.root / name)
        return keys, self.enrolment.enroll(name, keys.public)

    def tls_client(self) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.pki.ca_cert)),
                            headers={"content-type": "application/protobuf"}, timeout=10)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    federation = Federation(tmp_path_factory.mktemp("federation"))
    try:
        federation.deployment.start()
        yield federation
    finally:
        federation.deployment.stop()
    for proc in federation.deployment.processes:
        assert not proc.running(), f"{proc.name} (pid {proc.pid}) still running"
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP (address, port) pairs a process listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            raw = bytes.fromhex(hex_addr)
            if width == 4:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(
                    raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            found.add((addr, int(hex_port, 16)))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_superlink_listens_on_loopback_only_and_gateway_on_fleet_port(fed):
    link, gateway = fed.deployment.processes
    assert _listening(link.pid) == {("127.0.0.1", fed.cfg.control_port)}
    assert _listening(gateway.pid) == {("127.0.0.1", fed.cfg.fleet_port)}


def test_site_client_with_ca_cert_cannot_enroll_a_key(fed):
    before = len(fed.operator.list_nodes())
    # 1. The operator's own tool, pointed at the site-facing address.
    with pytest.raises(HlipError, match="403"):
        fed.site.register_node(fed.rogue.public)
    # 2. Fleet's self-registration, correctly signed with the rogue key: Flower refuses it
    #    because --enable-supernode-auth leaves enrolment to the Control API.
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = load_ssh_private_key(fed.rogue.private.read_bytes(), None)
    fleet = FleetHttpClient.from_server_address(
        fed.site_address, insecure=False, root_certificates=fed.pki.ca_cert.read_bytes(),
        interceptors=[NodeAuthHttpInterceptor(key, key.public_key())])
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            fleet.RegisterNode(RegisterNodeFleetRequest(
                public_key=public_key_to_bytes(key.public_key())))
        assert refused.value.response.status_code >= 400
    finally:
        fleet._client.close()
    assert len(fed.operator.list_nodes()) == before


def test_site_client_with_ca_cert_cannot_start_a_run(fed):
    before = fed.operator.json_call("list").get("runs", [])
    with pytest.raises(HlipError, match="403"):
        fed.site.json_call("run", str(fed.app))
    # The same request by hand, as a script at a site would send it.
    from flwr.proto.control_pb2 import StartRunRequest
    from flwr.supercore.control import ControlHttpClient

    control = ControlHttpClient.from_server_address(
        fed.site_address, insecure=False, root_certificates=fed.pki.ca_cert.read_bytes(),
        interceptors=[])
    try:
        with pytest.raises(httpx.HTTPStatusError) as refused:
            control.StartRun(StartRunRequest())
        assert refused.value.response.status_code == 403
    finally:
        control._client.close()
    assert fed.operator.json_call("list").get("runs", []) == before


def test_operator_on_loopback_can_enroll_and_start_a_run(fed):
    keys, record = fed.enroll("hospital-a")
    assert record.node_id in {int(n["node-id"]) for n in fed.operator.list_nodes()}
    with pytest.raises(HlipError, match="already enrolled"):
        fed.enrolment.enroll("hospital-a", keys.public)
    run = fed.operator.json_call("run", str(fed.app))
    runs = fed.operator.json_call("list")["runs"]
    assert int(run["run-id"]) in {int(r["run-id"]) for r in runs}


RAW_DENIED = [
    b"GET /docs HTTP/1.1",
    b"GET /openapi.json HTTP/1.1",
    b"GET /health HTTP/1.1",
    b"GET /v1/fleet/get-run HTTP/1.1",
    b"POST /v1/control/list-nodes HTTP/1.1",
    b"POST /v1/runtime/acquire-task HTTP/1.1",
    b"POST /v1/fleet/../control/start-run HTTP/1.1",
    b"POST /v1/fleet/%2e%2e/control/start-run HTTP/1.1",
    b"POST //v1/control/start-run HTTP/1.1",
    b"POST /v1/fleet/get-run/../../control/register-node HTTP/1.1",
]


def _raw_request(fed, request_line: bytes) -> int:
    """Send one request byte for byte (no client-side path normalisation); return the status."""
    ctx = ssl.create_default_context(cafile=str(fed.pki.ca_cert))
    with socket.create_connection(("127.0.0.1", fed.cfg.fleet_port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request_line + b"\r\nHost: x\r\nContent-Type: application/protobuf\r\n"
                        b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            head = tls.recv(4096)
    return int(head.split(b" ", 2)[1])


@pytest.mark.parametrize("request_line", RAW_DENIED, ids=lambda b: b.decode())
def test_gateway_denies_everything_but_fleet_posts(fed, request_line):
    assert _raw_request(fed, request_line) == 403


def test_gateway_forwards_fleet_posts_to_flower(fed):
    # Unsigned, so Flower's own node authentication (not the gateway) answers 401.
    assert _raw_request(fed, b"POST /v1/fleet/get-run HTTP/1.1") == 401
    # A denied request on a kept-alive connection does not open the way for the next one.
    with fed.tls_client() as client:
        url = f"https://{fed.site_address}"
        assert client.post(url + "/v1/fleet/get-run").status_code == 401
        assert client.post(url + "/v1/control/list-runs").status_code == 403
        assert client.post(url + "/v1/fleet/get-run").status_code == 401


@pytest.mark.parametrize("which", ["gateway", "superlink"])
def test_plaintext_request_fails(fed, which):
    port = fed.cfg.fleet_port if which == "gateway" else fed.cfg.control_port
    with pytest.raises(httpx.HTTPError):
        r = httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", timeout=10)
        pytest.fail(f"plaintext request answered with HTTP {r.status_code}")


def test_wrong_ca_is_refused(fed, tmp_path):
    other = init_pki(tmp_path / "other", "127.0.0.1")
    ctx = ssl.create_default_context(cafile=str(other.ca_cert))
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"https://{fed.site_address}/v1/fleet/get-run", verify=ctx, timeout=10)


def _supernode(fed, key: SiteKeyPaths, name: str) -> ManagedProcess:
    argv = [flower_executable("flower-supernode"), "--superlink", fed.site_address,
            "--root-certificates", str(fed.pki.ca_cert),
            "--auth-supernode-private-key", str(key.private),
            "--isolation", "process", "--port", str(free_port()),
            "--node-config", 'data-dir="/nonexistent"',
            "--max-retries", "2", "--max-wait-time", "20"]
    return ManagedProcess(name, argv, fed.root / f"{name}.log")


def _status(fed, node_id: int) -> str | None:
    return next((n["status"] for n in fed.operator.list_nodes() if int(n["node-id"]) == node_id),
                None)


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


def test_supernodes_through_the_gateway_enrolled_joins_unenrolled_refused_revoked_dropped(fed):
    keys, record = fed.enroll("hospital-b")
    good = _supernode(fed, keys, "supernode-hospital-b")
    rogue = _supernode(fed, fed.rogue, "supernode-rogue")
    nodes = [good, rogue]
    try:
        for node in nodes:
            node.start(flower_env(flwr_home=fed.root / "supernode-home"))
        assert _wait(lambda: _status(fed, record.node_id) == "online", 30), \
            "the enrolled SuperNode never came online through the gateway"
        assert _wait(lambda: not rogue.running(), 30), "the unenrolled SuperNode was not refused"
        assert rogue.popen.returncode != 0
        assert "Failed to activate SuperNode" in rogue.log_path.read_text()
        assert good.running()
        # Revocation takes effect on the connected node: its next signed call is rejected.
        fed.enrolment.revoke("hospital-b")
        assert _status(fed, record.node_id) == "unregistered"
        assert _wait(lambda: not good.running(), 30), "the revoked SuperNode kept running"
        assert fed.enrolment.active("hospital-b") is None
    finally:
        for node in nodes:
            node.stop()
    for node in nodes:
        assert not node.running()


def test_fleet_allowlist_matches_installed_flower():
    from flwr.superlink.routers.fleet.router import router

    routes = {(route.path, tuple(sorted(route.methods))) for route in router.routes}
    assert routes == {(path, ("POST",)) for path in ALLOWED_PATHS}
    assert len(FLEET_ROUTES) == len(routes)


def test_superlink_command_and_environment(tmp_path):
    cfg = SuperLinkConfig(tmp_path / "certs", tmp_path / "state")
    argv = superlink_command(cfg)
    flags = " ".join(argv)
    for expected in ["--enable-supernode-auth", "--disable-runtime-dependency-installation",
                     "--host 127.0.0.1", "--port 9093", f"--database {cfg.database}",
                     "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile"]:
        assert expected in flags
    assert "--insecure" not in argv
    env = flower_env({"FLWR_INTERNAL_GRPC_CONTROL_API": "1", "FLWR_TELEMETRY_ENABLED": "1",
                      "PATH": "/bin"}, flwr_home=tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert "FLWR_INTERNAL_GRPC_CONTROL_API" not in env
    # Flower's helpers (flower-superexec, ...) resolve to this installation first.
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/bin"]
    assert env["FLWR_HOME"] == str(tmp_path / "home")


def test_control_api_on_a_public_address_is_refused(tmp_path):
    init_pki(tmp_path / "certs", "127.0.0.1", ca_out=tmp_path / "ca")
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        cfg = SuperLinkConfig(tmp_path / "certs", tmp_path / "state", control_host=host)
        with pytest.raises(HlipError, match="loopback"):
            cfg.validate()
    SuperLinkConfig(tmp_path / "certs", tmp_path / "state").validate()


def test_certificate_without_loopback_name_is_refused(tmp_path):
    init_pki(tmp_path / "certs", "link.example.org", include_loopback=False, ca_out=tmp_path / "ca")
    with pytest.raises(HlipError, match="does not name 127.0.0.1"):
        SuperLinkConfig(tmp_path / "certs", tmp_path / "state").validate()


def test_a_certs_folder_holding_the_ca_key_is_refused(tmp_path):
    """Whoever steals the CA key can issue a server certificate every site trusts: it stays offline."""
    init_pki(tmp_path / "together", "127.0.0.1")  # CA and server files in one folder
    with pytest.raises(HlipError, match="ca.key: the CA private key must not sit"):
        SuperLinkConfig(tmp_path / "together", tmp_path / "state").validate()
    init_pki(tmp_path / "certs", "127.0.0.1", ca_out=tmp_path / "ca")
    SuperLinkConfig(tmp_path / "certs", tmp_path / "state").validate()
    assert not (tmp_path / "certs" / "ca.key").exists() and (tmp_path / "ca" / "ca.key").exists()


def test_gateway_refuses_a_request_above_its_size_limit():
    """Declared (Content-Length) or streamed without one: 413, and nothing reaches the SuperLink."""
    import asyncio

    from hlip_fed.deploy.fleet_gateway import FleetGateway

    class Upstream:  # stands in for httpx.AsyncClient: reads the body as the real client would
        sent = 0

        def build_request(self, method, url, headers, content):
            return content

        async def send(self, content, stream):
            async for chunk in content:
                self.sent += len(chunk)
            raise AssertionError("a body above the limit reached the upstream client in full")

    def call(headers, chunks):
        gateway = FleetGateway("https://127.0.0.1:1", "ca.crt", max_body_bytes=1000)
        gateway.client = Upstream()
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        out = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            out.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/fleet/push-object", "headers": headers,
                 "client": ("10.0.0.7", 5000)}
        asyncio.run(gateway(scope, receive, send))
        return out[0]["status"], gateway.client.sent

    assert call([(b"content-length", b"5000")], [b"x" * 5000]) == (413, 0)
    status, forwarded = call([], [b"x" * 600, b"x" * 600, b"x" * 600])
    assert status == 413 and forwarded <= 1000
    assert call([(b"content-length", b"ten")], [b""])[0] == 400
