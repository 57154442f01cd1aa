"""One worker process as the supervisor sees it: its process, its channel and its life.

WorkerProcess owns the supervision of one worker (echod.supervisor.worker): spawning it with
its `init`, its requests and when it last answered, killing it when it hangs, reaping it once
it has exited, and how long to wait before its successor is started. Which workers there are,
what is kept of one that exits and when it is replaced are the pool's (echod.supervisor.pool).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog

from echod.control.protocol import RequestError
from echod.supervisor.channel import Channel, ChannelClosed

log = structlog.get_logger("echod.workers")

INIT_TIMEOUT = 30.0  # a new worker's interpreter start and `init`
WORKER_HANG = 15.0  # no answer to the tick for this long: killed and started again (not while
# it is busy with a start, stop or restart, which have their own deadlines)
RESPAWN_DELAY = 0.2  # doubled for a worker that dies soon after its start, up to RESPAWN_MAX
RESPAWN_MAX = 5.0
_QUERIES = frozenset({"status", "stats", "sample"})
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


class WorkerProcess:
    """One worker: its process and its channel."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process, channel: Channel) -> None:
        self.index = index
        self.proc = proc
        self.channel = channel
        self.started_at = time.monotonic()
        self.last_answer = time.monotonic()
        self.last_totals: dict[str, Any] | None = None  # connection counters, last sample
        self.retired = False  # its counts were kept and its exit logged
        self.last_status: dict[str, Any] | None = None
        self.kernel_sockets = 0
        self.counters: dict[str, int] = {}
        self.busy = 0  # start, stop, restart or apply_live requests in flight

    @classmethod
    async def spawn(
        cls,
        index: int,
        config: Callable[[], dict[str, Any]],
        on_exit: Callable[[WorkerProcess], None],
    ) -> WorkerProcess:
        """Start worker `index` and send it `init` with config(); on_exit once its channel closes.

        A worker that does not start is killed and reaped, and OSError raised.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc: asyncio.subprocess.Process | None = None
        try:
            # /proc/self/exe: the path of the interpreter may not be ours to open (a venv
            # whose interpreter links into a home directory, for a daemon running as
            # `echod`), while the running image always is. That image does not know the venv
            # it runs for (uvloop makes it argv[0] too), so the worker is given our sys.path.
            # Only the supervisor speaks to systemd (NotifyAccess=main).
            env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY}
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            proc = await asyncio.create_subprocess_exec(
                "/proc/self/exe",
                "-m",
                "echod.supervisor.worker",
                str(theirs.fileno()),
                pass_fds=[theirs.fileno()],
                start_new_session=True,  # a terminal's ^C reaches the supervisor alone
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        finally:
            theirs.close()
            if proc is None:
                ours.close()
        worker: WorkerProcess | None = None

        def closed() -> None:
            if worker is not None:
                on_exit(worker)

        worker = cls(index, proc, Channel(ours, on_close=closed))
        try:
            await worker.call("init", INIT_TIMEOUT, index=index, config=config())
        except BaseException as exc:
            worker.retired = True  # never one of the pool's: nothing to keep or start again
            worker.channel.close()
            worker.kill()
            await worker.proc.wait()
            if isinstance(exc, RequestError | ChannelClosed | TimeoutError):
                raise OSError(f"worker {index} did not start: {exc}") from exc
            raise
        log.info("worker.started", index=index, pid=proc.pid)
        return worker

    @property
    def pid(self) -> int:
        """The worker's pid."""
        return self.proc.pid

    async def call(self, method: str, wait_s: float, **params: Any) -> Any:
        """One request to this worker, answered within wait_s seconds."""
        fds = params.pop("fds", None)
        busy = method not in _QUERIES
        self.busy += busy
        try:
            reply = await self.channel.call(method, params, fds=fds, wait_s=wait_s)
        finally:
            self.busy -= busy
        self.last_answer = time.monotonic()
        return reply

    def stale_status(self, now: float) -> dict[str, Any] | None:
        """What it said last, marked stale with how long it has been silent.

        None when it said nothing yet, or is gone (its state is then `unresponsive`).
        """
        if self.last_status is None or self.channel.closed or self.proc.returncode is not None:
            return None
        return {**self.last_status, "stale": True, "silent_s": round(now - self.last_answer, 1)}

    def kill(self) -> None:
        """SIGKILL, unless it has exited already."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def kill_if_hung(self, now: float) -> None:
        """Kill it when it has not answered for WORKER_HANG seconds (and is not busy)."""
        hung = now - self.last_answer > WORKER_HANG and not self.busy
        if hung and self.proc.returncode is None:
            log.error("worker.hung", index=self.index, pid=self.pid, silent_s=WORKER_HANG)
            self.kill()

    async def reap(self, wait_s: float) -> int:
        """Its exit status, once it has exited; SIGKILL after wait_s seconds."""
        try:
            async with asyncio.timeout(wait_s):
                return await self.proc.wait()
        except TimeoutError:
            log.error("worker.kill", index=self.index, pid=self.pid)
            self.kill()
            return await self.proc.wait()

    def respawn_delay(self, restarts: int) -> float:
        """How long to wait before its successor starts, after `restarts` restarts in all."""
        lived = time.monotonic() - self.started_at
        return RESPAWN_DELAY if lived > 10 else min(RESPAWN_DELAY * 2**restarts, RESPAWN_MAX)
