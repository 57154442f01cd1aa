"""The self-check's cases, and the probe that runs them as a client of a private service.

Each case does what a client of a plain TCP echo server may do (send at once after connect,
pause, pipeline, half-close, reset) and raises CaseFailed, with what it saw, where the echo
differs from that of a plain server. echod.service.selfcheck runs them on each path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from echod.kernel import libbpf
from echod.kernel.bypass import Bypass, socket_key
from echod.kernel.bypass_paths import socket_path

if TYPE_CHECKING:
    from echod.service.selfcheck import CheckService

HOST = "127.0.0.1"
CASE_TIMEOUT = 2.0  # a case whose echo does not come back within this has failed
PAUSE = 0.002  # "after a pause": well past the window in which a fresh server socket differs


class CaseFailed(Exception):
    """A case saw something a plain TCP echo server would not do; the message says what."""


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc)) if exc.errno else str(exc)


class Probe:
    """The client side of the cases, and what they look at on the server side."""

    def __init__(self, service: CheckService, bypass: Bypass | None, mode: str) -> None:
        self.service = service
        self.bypass = bypass
        self.mode = mode
        self.loop = asyncio.get_running_loop()
        self.port = service.port

    async def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await self.loop.sock_connect(sock, (HOST, self.port))
        except OSError as exc:
            sock.close()
            raise CaseFailed(f"connect: {_errname(exc)}") from exc
        return sock

    async def send(self, sock: socket.socket, data: bytes) -> None:
        try:
            await self.loop.sock_sendall(sock, data)
        except OSError as exc:
            raise CaseFailed(f"send failed with {_errname(exc)}") from exc

    async def recv_exact(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = await self.loop.sock_recv(sock, min(n - len(buf), 1 << 20))
            except OSError as exc:
                raise CaseFailed(
                    f"receive failed with {_errname(exc)} after {len(buf)} of {n} B"
                ) from exc
            if not chunk:
                raise CaseFailed(f"EOF after {len(buf)} of {n} B of echo")
            buf += chunk
        return bytes(buf)

    async def roundtrip(self, sock: socket.socket, data: bytes) -> None:
        """Send (concurrently with reading, so a large one cannot deadlock) and check."""
        sender = asyncio.ensure_future(self.send(sock, data))
        reader = asyncio.ensure_future(self.recv_exact(sock, len(data)))
        try:
            # A failed send ends the case at once, without waiting for an echo that cannot come.
            done, _ = await asyncio.wait((sender, reader), return_when=asyncio.FIRST_EXCEPTION)
            if sender in done and sender.exception() is not None:
                sender.result()
            got = await reader
        finally:
            for task in (sender, reader):
                task.cancel()
            await asyncio.gather(sender, reader, return_exceptions=True)
        if got != data:
            at = next(i for i, (a, b) in enumerate(zip(got, data, strict=True)) if a != b)
            raise CaseFailed(f"echo differs from what was sent at byte {at} of {len(data)}")

    async def until(self, pred: Callable[[], bool], what: str, within: float = 1.0) -> None:
        deadline = time.monotonic() + within
        while not pred():
            if time.monotonic() > deadline:
                raise CaseFailed(what)
            await asyncio.sleep(0.002)

    def client_path(self, sock: socket.socket) -> tuple[str, str] | None:
        assert self.bypass is not None
        return socket_path(self.bypass.paths_fd, sock)

    def in_bypass_map(self, sock: socket.socket) -> bool:
        """Whether either end of sock's connection is in the bypass sockhash."""
        return self.ends_in_bypass_map(sock.getsockname()[:2], sock.getpeername()[:2])

    def ends_in_bypass_map(self, local: tuple[str, int], remote: tuple[str, int]) -> bool:
        """Whether either end of the connection local <-> remote is in the bypass sockhash."""
        assert self.bypass is not None
        for a, b in ((local, remote), (remote, local)):
            with contextlib.suppress(KeyError):
                libbpf.map_lookup(self.bypass.sockets_fd, socket_key(self.bypass.netns, a, b), 8)
                return True
        return False


# -- the cases -------------------------------------------------------------------------------


async def _early(p: Probe, size: int) -> None:
    with await p.connect() as sock:
        await p.roundtrip(sock, os.urandom(size))


async def early_1b(p: Probe) -> None:
    await _early(p, 1)


async def early_64k(p: Probe) -> None:
    await _early(p, 64 * 1024)


async def paused(p: Probe) -> None:
    with await p.connect() as sock:
        await asyncio.sleep(PAUSE)
        await p.roundtrip(sock, os.urandom(64))


async def bulk_1m(p: Probe) -> None:
    with await p.connect() as sock:
        await p.roundtrip(sock, os.urandom(1 << 20))


async def pipelined(p: Probe) -> None:
    with await p.connect() as sock:
        data = os.urandom(64 * 1000)
        reader = asyncio.ensure_future(p.recv_exact(sock, len(data)))
        try:
            for i in range(1000):
                await p.send(sock, data[i * 64 : (i + 1) * 64])
            got = await reader
        finally:
            reader.cancel()
        if got != data:
            raise CaseFailed("echo of the pipelined writes differs from what was sent")


async def half_close(p: Probe) -> None:
    with await p.connect() as sock:
        data = os.urandom(4000)
        await p.send(sock, data)
        sock.shutdown(socket.SHUT_WR)
        got = await p.recv_exact(sock, len(data))
        if got != data:
            raise CaseFailed("echo before EOF differs from what was sent")
        try:
            more = await p.loop.sock_recv(sock, 1)
        except OSError as exc:
            raise CaseFailed(f"after the echo: {_errname(exc)} instead of EOF") from exc
        if more:
            raise CaseFailed("bytes after the echo instead of EOF")


async def reset(p: Probe) -> None:
    before = set(p.service.conns)
    sock = await p.connect()
    try:
        await p.send(sock, os.urandom(10_000))  # part of a message the peer never finishes
        await p.until(lambda: bool(p.service.conns - before), "the connection was never accepted")
        mine = p.service.conns - before
        in_bypass = p.bypass is not None and p.in_bypass_map(sock)
        keys = (sock.getsockname()[:2], sock.getpeername()[:2])
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    await p.until(lambda: not mine & p.service.conns, "the reset connection is still served")
    maps = p.service.maps
    for conn in mine:
        if conn.cookie and maps is not None:
            with contextlib.suppress(KeyError):
                libbpf.map_lookup(maps.sockets_fd, struct.pack("=Q", conn.cookie), 8)
                raise CaseFailed("the reset socket is still in the sockhash")
    if in_bypass and p.ends_in_bypass_map(*keys):
        raise CaseFailed("an end of the reset connection is still in the bypass map")


async def kernel_echo(p: Probe) -> None:
    before = set(p.service.conns)
    with await p.connect() as sock:
        await p.until(
            lambda: any(c.in_map for c in p.service.conns - before),
            "no socket entered the sockhash",
        )
        user_bytes = p.service.counts["user_bytes"]
        await p.roundtrip(sock, os.urandom(64 * 1024))
        fell = p.service.counts["user_bytes"] - user_bytes
        if fell:
            raise CaseFailed(f"{fell} B were echoed in user space instead")


async def bypass_taken(p: Probe) -> None:
    want = "short_circuit" if p.mode == "kernel" else "ingress"
    with await p.connect() as sock:
        for _ in range(3):  # the short circuit takes a client once its first echo is back
            await p.roundtrip(sock, os.urandom(64))
        seen = p.client_path(sock)
        if seen is None or seen[1] != want:
            got = "not in the bypass" if seen is None else f"path {seen[1]}"
            raise CaseFailed(f"the client end is {got}, not {want}")


Case = Callable[[Probe], Awaitable[None]]
COMMON: tuple[tuple[str, Case], ...] = (
    ("early_1b", early_1b),
    ("early_64k", early_64k),
    ("paused", paused),
    ("bulk_1m", bulk_1m),
    ("pipelined", pipelined),
    ("half_close", half_close),
    ("reset", reset),
)


def cases_for(mode: str, bypass: bool) -> list[tuple[str, Case]]:
    cases = list(COMMON)
    if mode == "kernel":
        cases.append(("kernel_echo", kernel_echo))
    if bypass:
        cases.append(("bypass_taken", bypass_taken))
    return cases
