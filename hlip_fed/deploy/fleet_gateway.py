"""The site-facing TLS gateway: forwards Flower's Fleet API and nothing else.

Flower 1.42's ``flower-superlink`` serves the Fleet API (for SuperNodes), the Control API (start
runs, register SuperNode keys) and the Runtime API (for ServerApp processes) on one HTTPS host and
port, and the open-source Control API does not authenticate its caller. Exposing that port to the
hospitals would let anyone holding the (public) CA certificate enrol a key or start a run whose
code then executes at every site. So the SuperLink listens on loopback only, and this gateway,
bound to the site-facing interface with the same server certificate, relays exactly the Fleet
routes below (``POST`` only) to it; every other request is answered ``403`` here and never
reaches Flower, and a body larger than ``--max-request-mb`` (declared or streamed) ``413``.

Protocol facts this relies on (checked against Flower 1.42's ``FleetHttpClient``): SuperNodes
speak protobuf over HTTP/1.1, one ``POST /v1/fleet/<route>`` per call, and authenticate with
signature headers that are forwarded unchanged, so the SuperLink still verifies every node itself.

Run as ``python -m hlip_fed.deploy.fleet_gateway --listen 0.0.0.0:9092 --upstream
127.0.0.1:9093 --certfile superlink.crt --keyfile superlink.key --ca-file ca.crt``.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import uvicorn

FLEET_PREFIX = "/v1/fleet/"
# The routes of Flower 1.42's Fleet router (flwr.superlink.routers.fleet.router). A test compares
# this list with the installed Flower, so an upgrade that adds a route is noticed, not silently
# blocked or silently forwarded.
FLEET_ROUTES = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received",
})
ALLOWED_PATHS = frozenset(FLEET_PREFIX + r for r in FLEET_ROUTES)

# Connection-scoped headers (RFC 9110 7.6.1) must not be relayed; Host is set for the upstream.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host",
})
# The gateway's server adds its own Date; Server would only advertise versions.
RESPONSE_DROPPED = HOP_BY_HOP | {"date", "server"}

log = logging.getLogger("hlip_fed.fleet_gateway")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def is_allowed(method: str, path: str) -> bool:
    """Whether a site may send this request: a Fleet route, by POST, with no path tricks."""
    return method == "POST" and path in ALLOWED_PATHS


class FleetGateway:
    """ASGI application relaying allowed requests to the SuperLink over TLS."""

    def __init__(self, upstream: str, ca_file: str, timeout_s: float = 300.0, max_body_bytes: int = 1 << 30) -> None:
        self.upstream = upstream.rstrip("/")
        self.ca_file = ca_file
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.client: Any = None  # httpx.AsyncClient, created in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        # websocket and anything else: no response, the server closes the connection

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Verify the SuperLink with the consortium CA, even on loopback: a local process
                # that grabbed the port first must not receive the sites' traffic.
                context = ssl.create_default_context(cafile=self.ca_file)
                self.client = httpx.AsyncClient(
                    verify=context,
                    timeout=httpx.Timeout(self.timeout_s, connect=10.0),
                    limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        client = scope.get("client") or ("?", 0)
        if not is_allowed(method, path):
            log.warning("denied %s %s from %s", method, path, client[0])
            await _plain(send, 403, b"forbidden: only the Fleet API is served here\n")
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit():
            await _plain(send, 400, b"bad content-length\n")
            return
        if int(declared) > self.max_body_bytes:
            log.warning("refused %s from %s: body of %s bytes, limit %d", path, client[0],
                        declared.decode("latin-1"), self.max_body_bytes)
            await _plain(send, 413, b"request too large\n")
            return
        headers = [(k, v) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
        url = self.upstream + path  # no query string: the Fleet API takes none, so none passes
        body = _body(receive, self.max_body_bytes)
        request = self.client.build_request(method, url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except TooLarge:
            log.warning("refused %s from %s: body above the limit of %d bytes", path, client[0], self.max_body_bytes)
            await _plain(send, 413, b"request too large\n")
            return
        except httpx.HTTPError as exc:
            log.error("upstream %s unavailable for %s: %s", self.upstream, path, exc)
            await _plain(send, 502, b"SuperLink unavailable\n")
            return
        try:
            await send({
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k, v) for k, v in response.headers.raw
                            if k.decode("latin-1").lower() not in RESPONSE_DROPPED],
            })
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


class TooLarge(Exception):
    """A streamed request body went past the gateway's limit."""


async def _body(receive: Receive, limit: int) -> AsyncIterator[bytes]:
    """Stream the request body through (model updates can be large; never buffer them whole),
    stopping with :class:`TooLarge` past ``limit`` bytes whatever its Content-Length said."""
    seen = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise TooLarge()
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _plain(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` into its parts."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def serve(listen: str, upstream: str, certfile: str, keyfile: str, ca_file: str,
          log_level: str = "info", max_request_mb: int = 1024) -> None:
    """Serve the gateway with TLS until interrupted (blocking)."""
    host, port = split_address(listen)
    up_host, up_port = split_address(upstream)
    up = f"[{up_host}]:{up_port}" if ":" in up_host else f"{up_host}:{up_port}"
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn's access log already records each call; httpx would log it a second time.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    config = uvicorn.Config(
        FleetGateway(f"https://{up}", ca_file, max_body_bytes=max_request_mb << 20), host=host, port=port,
        ssl_certfile=certfile, ssl_keyfile=keyfile, lifespan="on", log_level=log_level,
        server_header=False, proxy_headers=False, timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hlip_fed.deploy.fleet_gateway",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="site-facing HOST:PORT")
    parser.add_argument("--upstream", required=True, help="SuperLink HOST:PORT on loopback")
    parser.add_argument("--certfile", required=True, help="TLS certificate presented to sites")
    parser.add_argument("--keyfile", required=True, help="its private key")
    parser.add_argument("--ca-file", required=True, help="CA that signed the SuperLink certificate")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--max-request-mb", type=int, default=1024, help="refuse larger requests (413)")
    args = parser.parse_args(argv)
    serve(args.listen, args.upstream, args.certfile, args.keyfile, args.ca_file, args.log_level, args.max_request_mb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
