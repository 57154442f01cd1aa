"""The supervisor's side of `--workers N`: N worker processes, one BPF object, one answer.

The pool owns the BPF object (program, sockhash, activity set, counters) and decides the mode;
each worker (echod.supervisor.worker) owns its SO_REUSEPORT listeners, its connections and
its uvloop.
The maps reach the workers as fds over their channel (SCM_RIGHTS) with every `start` and
`restart` into kernel mode, rather than by inheritance: the object is loaded and unloaded as
the mode changes, long after the workers were started, and a worker started again after a
crash must get the maps that are loaded now.

A method of the pool asks every worker and answers when all have answered. A worker that dies
is logged, counted and started again (its connections are lost with it); one that stops
answering the tick for WORKER_HANG seconds is killed, and then started again the same way.
One worker's process (its spawn, requests, hang-kill and reaping) is echod.supervisor.process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import structlog

from echod.config.schema import LIVE_KEYS, Config
from echod.control.protocol import RequestError
from echod.control.replies import ProcessStatus, Stats, Status
from echod.figures import (
    METER,
    Rates,
    merge_stats,
    merge_status,
    process_figures,
    retire,
    sum_process,
)
from echod.kernel.echo import KernelEcho
from echod.service.admission import check_port_free
from echod.service.lifecycle import Lifecycle
from echod.service.udp import UdpService
from echod.supervisor.channel import ChannelClosed
from echod.supervisor.process import WorkerProcess

log = structlog.get_logger("echod.workers")

CALL_TIMEOUT = 30.0  # start, stop and restart: bounded by the grace and migration deadlines
QUERY_TIMEOUT = 5.0  # apply_live
# status, stats and the 1 s tick wait this long for each worker; one that has not answered by
# then is reported from what it said last, marked stale, so one stopped worker cannot stall them.
ANSWER_WAIT = 0.5
SHARE_SLACK = 1.1
POOL_BELL_GATHER = 0.02  # seconds the supervisor gathers rings before passing them on


class WorkerPool(Lifecycle):
    """N worker processes behind one service interface (what daemon.Daemon drives)."""

    def __init__(self, config: Config) -> None:
        # UDP: the workers have the sockets; the supervisor attaches the kernel path.
        super().__init__(config, UdpService(serves=False, owns_kernel=True))
        self.count = config.workers
        self._bpf = contextlib.ExitStack()
        self.workers: dict[int, WorkerProcess] = {}
        self.restarts = 0
        self.rates: dict[str, float] = {}
        self._retired: dict[str, Any] = {}
        self._retired_counters: dict[str, int] = {}
        self._rates = Rates()
        self._closing = False
        self._generation = 0  # moves with every request to all workers (start, stop, ...)
        self._exited: asyncio.Queue[WorkerProcess] = asyncio.Queue()

    # -- processes ----------------------------------------------------------------------------

    def _worker_config(self, config: Config | None = None) -> dict[str, Any]:
        """The config a worker runs with (ours, or `config`): limits split between the workers.

        SO_REUSEPORT spreads connections by a hash, so not quite evenly: each worker's share
        of max_connections has SHARE_SLACK more, lest one worker refuse while others have room.
        """
        config = self.config if config is None else config
        share = math.ceil(config.max_connections * SHARE_SLACK / self.count)
        # The bypass is the supervisor's: a worker only reads its path storage. `workers` stays:
        # a worker's UDP sockets steer each source address to one of that many (reuseport.py).
        mine = config.replace(max_connections=share, bypass=False)
        return dataclasses.asdict(mine)

    async def _spawn(self, index: int) -> WorkerProcess:
        return await WorkerProcess.spawn(index, self._worker_config, self._exited.put_nowait)

    async def open(self) -> None:
        """Start the worker processes (not yet serving)."""
        started = await asyncio.gather(
            *(self._spawn(i) for i in range(self.count)), return_exceptions=True
        )
        for result in started:
            if isinstance(result, WorkerProcess):
                self.workers[result.index] = result
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            raise failed[0]

    async def _each(
        self, method: str, wait_s: float = CALL_TIMEOUT, **params: Any
    ) -> list[tuple[WorkerProcess, Any]]:
        """Ask every worker at once; the first error is raised once all have answered.

        A reply that is a worker's status (start, stop, restart) is kept for status_now.
        """
        self._generation += 1
        # One that died waits to be started again, and joins in the pool's state then.
        workers = [w for w in self.workers.values() if not w.channel.closed]
        results = await asyncio.gather(
            *(w.call(method, wait_s, **params) for w in workers), return_exceptions=True
        )
        for w, result in zip(workers, results, strict=True):
            if isinstance(result, dict) and "connections_by_path" in result:
                w.last_status = result
        for result in results:
            if isinstance(result, BaseException):
                if isinstance(result, ChannelClosed | TimeoutError):
                    raise RequestError("internal", f"a worker did not answer {method}") from result
                raise result
        return list(zip(workers, results, strict=True))

    def _maps(self) -> dict[str, Any]:
        """The BPF maps a worker needs now, as start and restart pass them (fds, bypass)."""
        fds = self.kernel.maps.fds() if self.kernel is not None and self.mode == "kernel" else {}
        if self.bypass is not None:  # last, as WorkerService.offer expects
            fds |= {"bypass_sockets": self.bypass.sockets_fd, "bypass_paths": self.bypass.paths_fd}
        return {"fds": fds, "bypass": self.bypass is not None}

    # -- mode and BPF -------------------------------------------------------------------------

    def _load_kernel(self) -> None:
        if self.kernel is None:
            self.kernel = self._bpf.enter_context(KernelEcho(self.config.bpf_object))
            # Passing rings on costs every worker a wake-up: gather them for longer than one
            # process would (BELL_GATHER), which a flood's next 8 MiB ring still bounds.
            self.kernel.on_bell(asyncio.get_running_loop(), self._ring_workers, POOL_BELL_GATHER)

    def _unload(self) -> None:
        if self.kernel is not None:
            self._bpf.close()
            self.kernel = None

    def _maybe_unload(self) -> None:
        """Unload once no worker has a socket in the sockhash and the mode is not kernel."""
        if self.mode != "kernel" and not any(w.kernel_sockets for w in self.workers.values()):
            self._unload()

    # -- the service's methods ----------------------------------------------------------------

    async def _open(self) -> None:
        check_port_free(self.config)
        await self._each("start", mode=self.mode, port=self.config.port, **self._maps())

    async def _abort_start(self) -> None:
        with contextlib.suppress(RequestError):
            await self._stop_workers(0.1)
        self._unload()

    async def _stop_workers(self, grace: float) -> None:
        self._generation += 1
        busy = [w for w in self.workers.values() if not w.channel.closed]
        results = await asyncio.gather(
            *(w.call("stop", grace + CALL_TIMEOUT, grace=grace) for w in busy),
            return_exceptions=True,
        )
        for w, result in zip(busy, results, strict=True):
            if isinstance(result, dict):
                w.last_status = result
            elif isinstance(result, RequestError) and result.code != "bad_state":
                raise result

    async def stop(self, grace: float | None = None) -> ProcessStatus:
        """Every worker stops (drains within the grace); then the BPF object is unloaded."""
        async with self._lock:
            if self.state == "stopped":
                raise RequestError("bad_state", "already stopped")
            self.state = "stopping"
            try:
                await self._stop_workers(self.config.shutdown_grace if grace is None else grace)
            finally:
                for w in self.workers.values():
                    w.kernel_sockets = 0
                self.mode = None
                self.udp.stop()
                self._unload()
                self._stop_bypass()
                self.state = "stopped"
            log.info("service.stopped")
            return self.status_now()

    async def _switch(self, old: str | None) -> tuple[int, int]:
        """Every worker switches; the migration figures are summed."""
        replies = await self._each("restart", mode=self.mode, **self._maps())
        for w, r in replies:
            w.kernel_sockets = r["connections_by_path"]["kernel"]
        self._maybe_unload()
        return (
            sum(r["migration"]["moved"] for _, r in replies),
            sum(r["migration"]["stayed"] for _, r in replies),
        )

    async def apply_live(self, config: Config) -> None:
        """Send the live settings to every worker; a config that cannot be split stores nothing."""
        new = self.config.replace(**{k: getattr(config, k) for k in LIVE_KEYS})
        # Split first: a respawn splits self.config again, so it must only ever hold one that can.
        split = self._worker_config(new)
        self.config = new
        self.udp.apply(new)
        await self._each("apply_live", QUERY_TIMEOUT, config=split)

    # -- figures -----------------------------------------------------------------------------

    def status_now(self) -> Status:
        """status from what the workers said last (start, stop and restart replies)."""
        workers: list[tuple[int, Mapping[str, Any] | None]] = [
            (w.index, w.last_status) for w in self._sorted()
        ]
        return merge_status(self.base_status(), workers)

    def _sorted(self) -> list[WorkerProcess]:
        return [self.workers[i] for i in sorted(self.workers)]

    async def _ask(
        self, method: str, workers: list[WorkerProcess] | None = None
    ) -> list[tuple[int, Any]]:
        if workers is None:
            workers = self._sorted()
        results = await asyncio.gather(
            *(w.call(method, ANSWER_WAIT) for w in workers), return_exceptions=True
        )
        return [
            (w.index, None if isinstance(r, BaseException) else r)
            for w, r in zip(workers, results, strict=True)
        ]

    async def report_status(self) -> Status:
        """status: the supervisor's mode and BPF, every worker's connections."""
        answers = await self._ask("status")
        now = time.monotonic()
        merged: list[tuple[int, Mapping[str, Any] | None]] = []
        for index, st in answers:
            w = self.workers.get(index)
            if st is not None and w is not None:
                w.last_status = st
            elif w is not None:
                st = w.stale_status(now)
            merged.append((index, st))
        return merge_status(self.base_status(), merged)

    async def report_stats(self) -> Stats:
        """stats: the workers' counters added up, the kernel's counted once."""
        asked = await self._ask("stats")
        answers = [st for _, st in asked if st is not None]
        processes = [{"worker": "supervisor", **process_figures()}] + [
            {"worker": str(index), **st["process"]} for index, st in asked if st is not None
        ]
        own = {
            **self.bpf_figures(),
            "udp": self.udp.figures(),
            "rates": dict(self.rates),
            "process": sum_process(processes),
            "processes": processes,
            "workers": {
                "count": len(self.workers),
                "restarts": self.restarts,
                # Silent past ANSWER_WAIT: their figures are missing from this answer.
                "unresponsive": [index for index, st in asked if st is None],
            },
        }
        return merge_stats(answers, self._retired, own)

    async def sample(self) -> None:
        """The 1 s tick: every worker's counters, for the rates; unanswered ones are hung."""
        now = time.monotonic()
        generation = self._generation
        asked = self._sorted()
        total = dict(self._retired_counters)
        for w, (_, reply) in zip(asked, await self._ask("sample", asked), strict=True):
            if self.workers.get(w.index) is not w:
                continue  # replaced meanwhile
            if reply is None:
                w.kill_if_hung(now)
                continue
            w.counters, w.last_totals = reply["counters"], reply["totals"]
            if generation == self._generation:  # not from before a start, stop or restart
                w.kernel_sockets = reply["kernel_sockets"]
            for key, value in reply["counters"].items():
                total[key] = total.get(key, 0) + value
        total.update(self.bpf_counters())
        total.update(self.udp.counters())
        self.rates = self._rates.sample(total)
        METER.tick()
        if self.state == "serving" and generation == self._generation and not self._lock.locked():
            self._maybe_unload()

    # -- supervision -------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: start again every worker that exits."""
        while True:
            worker = await self._exited.get()
            if self._closing or self.workers.get(worker.index) is not worker:
                continue
            await self._replace(worker)

    def _ring_workers(self, cookies: list[int]) -> None:
        """The verdict rang the bell: every worker's guard looks at those that are its own."""
        for w in self.workers.values():
            w.channel.notify("ring", {"cookies": cookies})

    async def _replace(self, worker: WorkerProcess) -> None:
        if not worker.retired:  # once, even when starting its successor has to be retried
            worker.retired = True
            code = await worker.reap(10.0)
            self.restarts += 1
            retire(self._retired, worker.last_totals)
            for key, value in worker.counters.items():
                self._retired_counters[key] = self._retired_counters.get(key, 0) + value
            lost = (worker.last_totals or {}).get("connections", {}).get("active", 0)
            log.error(
                "worker.exited",
                index=worker.index,
                pid=worker.pid,
                returncode=code,
                connections_lost=lost,
            )
            if self.kernel is not None:
                # Its sockets' keys would stay in the activity set for ever.
                with contextlib.suppress(OSError):
                    self.kernel.maps.prune_active()
        await asyncio.sleep(worker.respawn_delay(self.restarts))
        async with self._lock:
            if self._closing:
                return
            try:
                fresh = await self._spawn(worker.index)
            except OSError as exc:
                log.error("worker.start_failed", index=worker.index, error=str(exc))
                self._exited.put_nowait(worker)  # try again, later
                return
            self.workers[worker.index] = fresh
            if self.state == "serving":
                await self._bring_up(fresh)

    async def _bring_up(self, worker: WorkerProcess) -> None:
        """A new worker joins the pool in the pool's mode."""
        try:
            await worker.call(
                "start", CALL_TIMEOUT, mode=self.mode, port=self.config.port, **self._maps()
            )
        except (RequestError, ChannelClosed, TimeoutError) as exc:
            log.error("worker.start_failed", index=worker.index, error=str(exc))
            worker.kill()

    async def aclose(self) -> None:
        """End every worker process (they have stopped serving by now), waiting without
        blocking the loop: 5 s for all to exit, then SIGKILL."""
        self._closing = True
        for w in self.workers.values():
            w.channel.close()  # the worker sees EOF and exits
        deadline = time.monotonic() + 5.0
        for w in self.workers.values():
            await w.reap(max(deadline - time.monotonic(), 0.01))
        self.udp.stop()
        self._unload()
        self._set_bypass(False)
