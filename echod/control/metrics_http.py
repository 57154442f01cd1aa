"""The /metrics endpoint: a tiny HTTP/1.0-style server on the daemon's event loop.

One route, hard bounds. Each connection carries one request and one response: the request
header must arrive within HEADER_TIMEOUT and fit in MAX_HEADER bytes, the response must be
taken within WRITE_TIMEOUT, and at most MAX_CLIENTS connections are open at once. So an idle
or slow client costs one socket for a few seconds and no thread: http.server (a thread per
connection, no timeout) gives none of these bounds.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import cast

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from echod.config.validators import parse_address
from echod.control.limits import METRICS_BACKLOG, METRICS_CLIENTS

__all__ = ["MetricsServer", "start_metrics_server"]

log = structlog.get_logger("echod.metrics")

HEADER_TIMEOUT = 5.0  # seconds from accept to the end of the request header
WRITE_TIMEOUT = 5.0  # seconds for the client to take the response
MAX_HEADER = 8192  # bytes of request line and header fields
MAX_CLIENTS = METRICS_CLIENTS
ROUTES = ("/metrics", "/")
# Seconds: scrapes in a loop cost the event loop one rendering this often, no more (the
# figures change once a tick anyway).
RENDER_MAX_AGE = 0.25

_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) (\S+) HTTP/(\d)\.(\d)")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}

Render = Callable[[], bytes]


def respond(head: bytes, render: Render) -> tuple[int, bytes, bool]:
    """(status, body, whether to send the body) for one request header (without its end)."""
    line, *fields = head.replace(b"\r\n", b"\n").split(b"\n")
    match = _REQUEST_LINE.fullmatch(line)
    if match is None or any(b":" not in f or f.startswith((b" ", b"\t")) for f in fields):
        return 400, b"bad request\n", True
    method, target, major = match.group(1), match.group(2), match.group(3)
    if major != b"1":
        return 505, b"HTTP/1.x only\n", True
    if target.split(b"?", 1)[0].decode("latin-1") not in ROUTES:
        return 404, b"not found: try /metrics\n", True
    if method not in (b"GET", b"HEAD"):
        return 405, b"GET or HEAD only\n", True
    return 200, render(), method == b"GET"


def response(status: int, body: bytes, send_body: bool = True) -> bytes:
    """The bytes of a whole response: one per connection, so `Connection: close`."""
    ctype = CONTENT_TYPE_LATEST if status == 200 else "text/plain; charset=utf-8"
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Allow: GET, HEAD\r\n" if status == 405 else "")
        + "Connection: close\r\n\r\n"
    )
    return head.encode() + (body if send_body else b"")


class _Scrape(asyncio.Protocol):
    """One connection: read the header (bounded), answer once, close."""

    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(HEADER_TIMEOUT, self.abort)
        self.server.admit(self)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.buffer += data
        end = _header_end(self.buffer)
        if end < 0 and len(self.buffer) <= MAX_HEADER:
            return
        if end < 0 or end > MAX_HEADER:
            self.answer(431, b"request header over 8 KiB\n")
            return
        self.answer(*respond(self.buffer[:end], self.server.render))

    def eof_received(self) -> bool:
        # A half-close before the header ended: nothing to answer; after it, let the answer go.
        return self.answered

    def answer(self, status: int, body: bytes, send_body: bool = True) -> None:
        """Send the one response and close; the client has WRITE_TIMEOUT to take it."""
        assert self.transport is not None
        self.answered = True
        self.transport.pause_reading()
        self.transport.write(response(status, body, send_body))
        self.transport.close()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(WRITE_TIMEOUT, self.abort)

    def abort(self) -> None:
        """Drop the connection at once (deadline, eviction or shutdown)."""
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.server.release(self)


def _header_end(buffer: bytes) -> int:
    """Where the header ends (the empty line), or -1; bare LF line ends are taken too."""
    ends = [i for i in (buffer.find(b"\r\n\r\n"), buffer.find(b"\n\n")) if i >= 0]
    return min(ends) if ends else -1


class MetricsServer:
    """A /metrics listener on the running loop; close() stops it and drops its clients."""

    def __init__(self, host: str, render: Render) -> None:
        self.host = host
        self.port = 0
        self._render = render
        self._cache: tuple[float, bytes] | None = None
        self._server: asyncio.Server | None = None
        # Open connections, oldest first (dicts keep insertion order).
        self._clients: dict[_Scrape, None] = {}

    @property
    def url(self) -> str:
        """Where to scrape."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def clients(self) -> int:
        """Connections open now."""
        return len(self._clients)

    async def start(self, port: int) -> None:
        """Listen on host:port (0: any free port); OSError if the address is taken."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Scrape(self), self.host, port, backlog=METRICS_BACKLOG, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def render(self) -> bytes:
        """The exposition, re-rendered at most every RENDER_MAX_AGE s: scrapes cost no more."""
        now = time.monotonic()
        if self._cache is None or now - self._cache[0] >= RENDER_MAX_AGE:
            self._cache = (now, self._render())
        return self._cache[1]

    def admit(self, client: _Scrape) -> None:
        """Take client; at the cap, make room by dropping the oldest one still sending its
        header (a scraper sends its request at once), or drop client if none is."""
        if len(self._clients) >= MAX_CLIENTS:
            oldest = next((c for c in self._clients if not c.answered), None)
            log.debug("metrics.client_dropped", clients=len(self._clients))
            if oldest is None:
                client.abort()
                return
            del self._clients[oldest]
            oldest.abort()
        self._clients[client] = None

    def release(self, client: _Scrape) -> None:
        """client's connection is gone."""
        self._clients.pop(client, None)

    async def close(self) -> None:
        """Stop listening and drop every client; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for client in list(self._clients):
            client.abort()
        self._clients.clear()
        await server.wait_closed()


async def start_metrics_server(addr: str, render: Render) -> MetricsServer:
    """Serve /metrics on addr ("127.0.0.1:9108", "[::1]:9108", or a bare port for 127.0.0.1)."""
    host, port = parse_address(addr, min_port=0)
    server = MetricsServer(host, render)
    await server.start(port)
    return server
