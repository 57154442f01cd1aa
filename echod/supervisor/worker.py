"""One worker process: a Service with its own listeners and uvloop, driven by its supervisor.

The supervisor (pool.WorkerPool) starts it as `python -m echod.supervisor.worker FD`, FD being its
end of a socketpair, and sends `init` with the configuration first. From then on the worker
answers the service's methods over that channel (channel.Channel). In kernel mode the
supervisor sends the BPF maps' fds with `start` and `restart`; the worker inserts the sockets
it accepts into that one shared sockhash, while the supervisor owns the program and reads
the counters.

The worker ignores SIGINT (a terminal's ^C is the supervisor's to handle) and leaves on
SIGTERM. When the channel closes, the supervisor has gone: the worker stops at once and exits,
so that nothing outlives the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
from typing import Any

import structlog
import uvloop

from echod import logs
from echod.config.schema import Config
from echod.control.protocol import RequestError
from echod.kernel.echo import SocketMaps
from echod.service.service import Service
from echod.supervisor.channel import Channel

log = structlog.get_logger("echod.supervisor.worker")

EXIT_GRACE = 0.5  # seconds a worker whose supervisor has gone gives its connections


class WorkerService(Service):
    """A Service whose BPF maps come from the supervisor instead of its own BPF object.

    Its guard's doorbell is the supervisor's `ring` notification: the supervisor owns the
    BPF object and its ring, and passes every worker the cookies the verdict rang for.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.reuse_port = True
        self.udp.owns_kernel = False  # the supervisor's: it attaches the UDP kernel path
        self.udp.reuse_port = True
        self.offered: SocketMaps | None = None

    def offer(self, fds: dict[str, int], bypass: bool = False) -> None:
        """The supervisor sent the maps' fds, by name; takes ownership of every one.

        sockets_fd, active_fd and counters_fd are the echo object's maps (SocketMaps.fds).
        With `bypass`, bypass_sockets and bypass_paths are the bypass object's sockhash and path
        storage, which this worker reads to know which connections the bypass keeps in user
        space, and keeps until no connection of that object is left (PathReaders.retire).
        """
        self.drop_offer()
        fds = dict(fds)
        if bypass and {"bypass_sockets", "bypass_paths"} <= fds.keys():
            self.bypass_readers.add(fds.pop("bypass_paths"), fds.pop("bypass_sockets"))
            self.bypass_readers.retire(self.loop, keep_newest=True)
            self._mark_listeners()
            self.accept_follow()
        elif not bypass:
            self.bypass_readers.retire(self.loop, keep_newest=False)
        if {"sockets_fd", "active_fd", "counters_fd"} <= fds.keys():
            names = ("sockets_fd", "active_fd", "counters_fd")
            self.offered = SocketMaps(**{name: fds.pop(name) for name in names}, owned=True)
        for fd in fds.values():  # nothing else is expected: nobody may keep it
            os.close(fd)

    def drop_offer(self) -> None:
        """Close offered fds that were not taken."""
        if self.offered is not None:
            self.offered.close()
            self.offered = None

    def _load_kernel(self) -> None:
        if self.maps is None:
            if self.offered is None:
                raise OSError(errno.ENOENT, "the supervisor sent no BPF maps")
            self.maps = self._bpf.enter_context(self.offered)
            self.offered = None


class Worker:
    """The worker's side of the channel: each request is a method of its service."""

    def __init__(self, sock: socket.socket) -> None:
        self.done = asyncio.Event()
        self.channel = Channel(sock, self.handle, on_close=self.done.set)
        self.service: WorkerService | None = None
        self.guard: asyncio.Task[None] | None = None
        self.index = -1

    async def handle(self, method: str, params: dict[str, Any], fds: dict[str, int]) -> Any:
        """Serve one request from the supervisor."""
        if fds and (method not in ("start", "restart") or self.service is None):
            for fd in fds.values():  # only start and restart carry maps: nobody else may keep these
                os.close(fd)
            fds = {}
        if method == "init":
            return self._init(params)
        svc = self.service
        if svc is None:
            raise RequestError("bad_state", "not initialised")
        if method in ("start", "restart"):
            svc.offer(fds, bool(params.get("bypass")))
            try:
                if method == "start":
                    return await svc.start(params.get("mode"), params.get("port"))
                return await svc.restart(params.get("mode"))
            finally:
                svc.drop_offer()
        if method == "stop":
            return await svc.stop(grace=params.get("grace"))
        if method == "apply_live":
            config = Config(**params["config"])
            await svc.apply_live(config)
            logs.configure(config.log_level, config.log_format)
            return None
        if method == "ring":  # a notification: the verdict rang the bell for these sockets
            svc.ring(params["cookies"])
            return None
        if method == "status":
            return svc.status()
        if method == "stats":
            return svc.stats()
        if method == "sample":
            svc.sample_rates()
            # Every second: cheap figures only (no process figures, no map reads).
            kernel_sockets = svc.kpath.sockets
            return {
                "counters": svc.counters(),
                "kernel_sockets": kernel_sockets,
                "totals": svc.totals(),
            }
        raise RequestError("unknown_method", method)

    def _init(self, params: dict[str, Any]) -> dict[str, Any]:
        self.index = int(params["index"])
        config = Config(**params["config"])
        logs.configure(config.log_level, config.log_format)
        structlog.contextvars.bind_contextvars(worker=self.index)
        if self.service is not None:
            raise RequestError("bad_state", "already initialised")
        self.service = WorkerService(config)
        self.guard = asyncio.get_running_loop().create_task(self.service.run())
        return {"pid": os.getpid()}

    async def run(self) -> None:
        """Serve until the supervisor goes or SIGTERM comes, then stop and release."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, self.done.set)
        try:
            await self.done.wait()
        finally:
            if self.guard is not None:
                self.guard.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self.guard
            svc = self.service
            if svc is not None:
                if svc.state != "stopped":
                    try:
                        await svc.stop(grace=EXIT_GRACE)
                    except RequestError:
                        pass
                svc.close()
            self.channel.close()


def main() -> None:
    """`python -m echod.supervisor.worker FD`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))

    async def run() -> None:
        await Worker(sock).run()

    uvloop.run(run())


if __name__ == "__main__":
    main()
