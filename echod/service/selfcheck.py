"""The self-check: before a path serves its first client, prove it on the running kernel.

Sockmap behaviour differs between kernel builds: a redirect into a socket not yet accepted,
data queued before the insert, FIN handling, FIONREAD. A path is trusted only once a private
listener (127.0.0.1, an ephemeral port, reachable through no map of the serving port) has
echoed each case below exactly, on the path's own machinery: a private Service in the path's
mode, on the BPF maps and the bypass the daemon would serve with.
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

import structlog

from echod.config.schema import Config
from echod.kernel import libbpf
from echod.kernel.bypass import Bypass, in_cgroup, socket_key
from echod.kernel.bypass_paths import socket_path
from echod.kernel.echo import KernelEcho, SocketMaps
from echod.service.paths import Outcome, path_name
from echod.service.service import Service

log = structlog.get_logger("echod.selfcheck")

HOST = "127.0.0.1"
CASE_TIMEOUT = 2.0  # a case whose echo does not come back within this has failed
PAUSE = 0.002  # "after a pause": well past the window in which a fresh server socket differs


class CaseFailed(Exception):
    """A case saw something a plain TCP echo server would not do; the message says what."""


class CheckService(Service):
    """A private Service on 127.0.0.1:0 that borrows the daemon's maps and bypass storage."""

    def __init__(self, config: Config, maps: SocketMaps | None, paths_fd: int | None) -> None:
        super().__init__(config)
        self.log = log.bind(private=True)
        self.log.info = self.log.debug  # its start and stop are the check's, logged once there
        self._borrowed = maps
        if paths_fd is not None:
            self.bypass_readers.add(os.dup(paths_fd))

    def _load_kernel(self) -> None:
        if self.maps is None:
            if self._borrowed is None:
                raise OSError(errno.ENOENT, "no BPF maps to check the kernel path with")
            self.maps = self._borrowed  # borrowed: not entered in self._bpf, never closed here

    @property
    def port(self) -> int:
        """The ephemeral port the private listener got."""
        return int(self.listeners[0].getsockname()[1])


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


def _cases(mode: str, bypass: bool) -> list[tuple[str, Case]]:
    cases = list(COMMON)
    if mode == "kernel":
        cases.append(("kernel_echo", kernel_echo))
    if bypass:
        cases.append(("bypass_taken", bypass_taken))
    return cases


# -- running a path ---------------------------------------------------------------------------


def _private_config(config: Config, mode: str) -> Config:
    return config.replace(
        hosts=[HOST],
        port=0,
        mode=mode,
        bypass=False,
        workers=1,
        max_connections=64,
        max_connections_per_ip=0,
        allow=[],
        shutdown_grace=0.2,
    )


async def check_path(
    config: Config, mode: str, bypass: Bypass | None, kernel: KernelEcho | None
) -> Outcome:
    """Run the path's cases on a private listener; the first case that fails ends the check.

    `kernel` (kernel paths) and `bypass` (bypass paths) are the loaded objects to check: the
    ones the daemon serves with. Nothing is left behind: the private listener is closed, its
    address unwatched, its connections gone.
    """
    name = path_name(mode, bypass is not None)
    started = time.perf_counter()
    outcome = Outcome(name, "passed")
    cases = _cases(mode, bypass is not None)
    if bypass is not None and not in_cgroup(bypass.cgroup or ""):
        # The cgroup's programs never see echod's own sockets: nothing here can prove the path.
        outcome.result = "not_run"
        outcome.detail = f"echod runs outside the bypass cgroup {bypass.cgroup}"
        outcome.cases = {n: "not_run" for n, _ in cases}
        return outcome
    maps = kernel.maps if kernel is not None else None
    service = CheckService(
        _private_config(config, mode), maps, bypass.paths_fd if bypass is not None else None
    )
    endpoint: list[tuple[str, int]] = []
    early: socket.socket | None = None
    try:
        await service.start()
        probe = Probe(service, bypass, mode)
        if bypass is not None:
            early = await probe.connect()  # before the private listener is watched
            await probe.roundtrip(early, os.urandom(100))
            endpoint = [(HOST, service.port)]
            bypass.watch(endpoint, mode)
        for case, run in cases:
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(CASE_TIMEOUT):
                    await run(probe)
                log.debug(
                    "selfcheck.case",
                    path=name,
                    case=case,
                    ms=round((time.perf_counter() - t0) * 1000, 1),
                )
            except (CaseFailed, TimeoutError) as exc:
                detail = str(exc) if isinstance(exc, CaseFailed) else "no echo within 2 s"
                outcome.result, outcome.case, outcome.detail = "failed", case, detail
                outcome.cases[case] = "failed"
                break
            outcome.cases[case] = "passed"
        if early is not None and outcome.result == "passed":
            outcome.cases["pre_attach"] = "failed"
            try:
                async with asyncio.timeout(CASE_TIMEOUT):
                    await probe.roundtrip(early, os.urandom(100))
                if probe.in_bypass_map(early):
                    raise CaseFailed("it entered the bypass map")
                outcome.cases["pre_attach"] = "passed"
            except (CaseFailed, TimeoutError) as exc:
                detail = str(exc) if isinstance(exc, CaseFailed) else "no echo within 2 s"
                outcome.result, outcome.case, outcome.detail = "failed", "pre_attach", detail
    except OSError as exc:  # the private listener could not be had
        outcome.result, outcome.detail = "failed", f"self-check listener: {exc}"
    finally:
        if early is not None:
            early.close()
        if bypass is not None and endpoint:
            bypass.unfollow(endpoint)
        with contextlib.suppress(Exception):
            if service.state != "stopped":
                await service.stop(grace=0.2)
        service.close()
    for case, _ in cases:
        outcome.cases.setdefault(case, "not_run")
    if bypass is not None:
        outcome.cases.setdefault("pre_attach", "not_run")
    outcome.ms = (time.perf_counter() - started) * 1000
    log.info(
        "selfcheck.done",
        path=name,
        result=outcome.result,
        case=outcome.case,
        detail=outcome.detail,
        ms=round(outcome.ms, 1),
    )
    return outcome


def _unavailable(name: str, what: str, exc: OSError) -> Outcome:
    text = exc.strerror or str(exc)
    if exc.filename:
        text = f"{exc.filename}: {text}"
    return Outcome(name, "failed", detail=f"{what} unavailable: {text}")


class SelfCheck:
    """What the daemon's service runs before a path serves (paths.Checker)."""

    async def path(
        self, config: Config, mode: str, bypass: Bypass | None, kernel: KernelEcho | None
    ) -> Outcome:
        """Check one path on the objects the daemon would serve it with."""
        return await check_path(config, mode, bypass, kernel)

    async def every_path(
        self, config: Config, kernel: KernelEcho | None, bypass: Bypass | None
    ) -> dict[str, Outcome]:
        """All four paths: what is not loaded is loaded for the time of the check."""
        out: dict[str, Outcome] = {"user": await check_path(config, "user", None, None)}
        with contextlib.ExitStack() as stack:
            bypass_error = kernel_error = None
            if bypass is None:
                try:
                    bypass = stack.enter_context(Bypass(config.bypass_cgroup, config.bypass_object))
                except OSError as exc:
                    bypass_error = exc
            if kernel is None:
                try:
                    kernel = stack.enter_context(KernelEcho(config.bpf_object))
                except OSError as exc:
                    kernel_error = exc
            for mode, with_bypass in (("user", True), ("kernel", False), ("kernel", True)):
                name = path_name(mode, with_bypass)
                if with_bypass and bypass_error is not None:
                    out[name] = _unavailable(name, "the bypass", bypass_error)
                elif mode == "kernel" and kernel_error is not None:
                    out[name] = _unavailable(name, "kernel mode", kernel_error)
                else:
                    out[name] = await check_path(
                        config, mode, bypass if with_bypass else None, kernel
                    )
        return out
