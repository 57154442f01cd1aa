"""Server lifecycle: startup → serve → shutdown, with signals, control socket and sd_notify."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

import structlog

from echod import __version__, logs, systemd
from echod.config.schema import LIVE_KEYS, RESTART_KEYS, Config, ConfigError
from echod.config.sources import resolve
from echod.control.limits import check_fd_budget
from echod.control.protocol import RequestError
from echod.control.replies import CheckReport, ProcessStatus, Stats, Status
from echod.control.server import ControlServer
from echod.service.lifecycle import Lifecycle
from echod.service.selfcheck import SelfCheck
from echod.service.service import Service
from echod.supervisor.pool import WorkerPool

log = structlog.get_logger("echod.daemon")

__all__ = ["LIVE_KEYS", "RESTART_KEYS", "Daemon", "describe"]

TICK = 1.0

# What the daemon drives: one in-process service (--workers 1), or a pool of worker processes.


class Daemon:
    """Runs the echo service (one process, or a worker pool) and its control socket.

    It is the control socket's target (protocol.ControlTarget): `reload` is its own, and the
    other methods are the service's.
    """

    def __init__(self, config: Config, flags: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self.flags = dict(flags or {})
        self.should_exit = asyncio.Event()
        self.service: Lifecycle | None = None
        self.metrics: Any = None
        self._snapshot: dict[str, Any] = {}
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[None]] = set()
        self._stop_grace: float | None = None  # None: the config's shutdown_grace

    @contextlib.contextmanager
    def signal_handlers(self) -> Iterator[None]:
        """Install SIGINT/SIGTERM (shutdown) and SIGHUP (reload) for the duration."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_exit_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_exit_signal(self, sig: signal.Signals) -> None:
        # First the event: nothing that happens while logging may keep the daemon from stopping.
        self.should_exit.set()
        log.info("daemon.signal", signal=sig.name)

    def _on_reload_signal(self) -> None:
        # The loop keeps only a weak reference to a task: hold it until it is done.
        task = asyncio.get_running_loop().create_task(self._reload_quietly())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def run(self) -> int:
        """Start, serve until asked to stop, shut down; returns the process exit code.

        One AsyncExitStack owns what start-up builds and unwinds it in reverse: metrics, then
        the service (stop and drain, then release), then the control socket. Control goes
        last so that `status` keeps answering while connections drain.
        """
        _raise_fd_limit()
        async with contextlib.AsyncExitStack() as stack:
            stack.enter_context(self.signal_handlers())
            # One interface (Lifecycle) for one process or a supervisor and its workers.
            service: Lifecycle
            if self.config.workers > 1:
                service = WorkerPool(self.config)
            else:
                service = Service(self.config)
            self.service = service
            service.checker = SelfCheck()
            control = ControlServer(
                self.config.control,
                self,
                group=self.config.control_group,
                admin_group=self.config.admin_group,
            )
            stack.push_async_callback(control.close)
            stack.push_async_callback(service.aclose)
            stack.push_async_callback(self._stop_service)
            try:
                await service.open()
                await service.start()
                # /metrics before the control socket: whoever sees `status` answer can scrape.
                stack.push_async_callback(self._stop_metrics)
                self.metrics = await self._start_metrics(self.config.metrics)
                await self._start_control(control)
                check_fd_budget(-(-self.config.max_connections // self.config.workers))
            except (RequestError, OSError) as exc:
                message = exc.message if isinstance(exc, RequestError) else describe(exc)
                log.error("daemon.start_failed", error=message)
                # One plain line as well, whatever the log format: the reason must be readable
                # on a terminal, in `systemctl status` and in a CI log alike.
                logs.write_line(f"echod: {message}")
                self._stop_grace = 0.1
                return 1
            systemd.ready(await self.summary())
            log.info(
                "daemon.ready",
                pid=os.getpid(),
                control=self.config.control,
                workers=self.config.workers,
            )
            async with asyncio.TaskGroup() as tasks:
                ticker = tasks.create_task(self._tick())
                background = tasks.create_task(service.run())
                await self.should_exit.wait()
                systemd.stopping()
                ticker.cancel()
                background.cancel()
            log.info("daemon.shutting_down")
        log.info("daemon.exited")
        return 0

    async def _stop_service(self) -> None:
        """Stop the service if it serves (configured grace; a short one after a failed start)."""
        assert self.service is not None
        if self.service.state != "stopped":
            with contextlib.suppress(RequestError):
                await self.service.stop(grace=self._stop_grace)

    async def _start_control(self, control: ControlServer) -> None:
        try:
            await control.start()
        except OSError as exc:
            text = exc.strerror or str(exc)
            raise OSError(exc.errno, f"control socket {self.config.control}: {text}") from exc

    async def summary(self) -> str:
        """One line for systemd's STATUS=."""
        assert self.service is not None
        st = await self.service.report_status()
        rates = self.service.rates
        rate = rates.get("user_messages_per_s", 0) + rates.get("kernel_redirected_packets_per_s", 0)
        return (
            f"{st['state']}, mode {st['mode']}, {st['connections']} connections, {rate:.0f} msg/s"
        )

    async def _tick(self) -> None:
        assert self.service is not None
        interval = systemd.watchdog_interval()
        last_watchdog = 0.0
        while True:
            await self.service.sample()
            if self.metrics is not None:
                self._snapshot = await self._take_snapshot()
            if systemd.managed():  # the summary asks every worker: only when someone reads it
                systemd.status(await self.summary())
            now = time.monotonic()
            if interval is not None and now - last_watchdog >= interval:
                systemd.watchdog()
                last_watchdog = now
            await asyncio.sleep(min(TICK, interval or TICK))

    async def _start_metrics(self, address: str | None) -> Any:
        """A metrics server on address (None: off); OSError names the address.

        It serves on this loop, from the snapshot the loop takes each tick (metrics_http says
        how each connection is bounded).
        """
        if not address:
            return None
        from echod import metrics
        from echod.control import metrics_http

        self._snapshot = await self._take_snapshot()
        try:
            render = metrics.renderer(self.metrics_snapshot)
            server = await metrics_http.start_metrics_server(address, render)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics address {address}: {describe(exc)}") from exc
        log.info("metrics.listening", address=address)
        return server

    async def _stop_metrics(self) -> None:
        if self.metrics is not None:
            metrics, self.metrics = self.metrics, None
            await metrics.close()

    def metrics_snapshot(self) -> dict[str, Any]:
        """What a Prometheus scrape reads: the last tick's figures.

        The tick takes the snapshot (asking every worker is a round trip), so a scrape answers
        at once from what it finds here and never waits on a worker.
        """
        return self._snapshot

    async def _take_snapshot(self) -> dict[str, Any]:
        assert self.service is not None
        stats = await self.service.report_stats()
        return {
            "mode": self.service.mode,
            "version": __version__,
            "connections": stats["connections"],
            "user": stats["user"],
            "kernel": stats["kernel"],
            "bypass": stats.get("bypass"),
            "bypass_status": self.service.base_status()["bypass"],
            "udp": stats["udp"],
            "udp_status": self.service.base_status()["udp"],
            "self_check": self.service.base_status()["self_check"],
            "bpf_programs": stats["bpf_programs"],
            "workers": stats.get("workers"),
            # The sum over the daemon's processes, and each process ({"worker": ..., figures}).
            "process": stats.get("process"),
            "processes": stats.get("processes", []),
        }

    # -- the control methods

    def _serving(self) -> Lifecycle:
        assert self.service is not None, "control methods are served only while running"
        return self.service

    async def status(self) -> Status:
        """Return the service's `status`."""
        return await self._serving().report_status()

    async def stats(self) -> Stats:
        """Return the service's `stats`."""
        return await self._serving().report_stats()

    async def start(
        self, mode: str | None = None, port: int | None = None, bypass: bool | None = None
    ) -> ProcessStatus:
        """Start serving (control `start`)."""
        return await self._serving().start(mode, port, bypass)

    async def stop(self) -> ProcessStatus:
        """Stop serving, with the configured grace (control `stop`)."""
        return await self._serving().stop()

    async def restart(self, mode: str | None = None, bypass: bool | None = None) -> dict[str, Any]:
        """Switch mode (or bypass) live (control `restart`)."""
        return await self._serving().restart(mode, bypass)

    async def check(self) -> CheckReport:
        """Run the self-check of every path, and of UDP's kernel path (control `check`)."""
        return await self._serving().check()

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file: apply what can change live, report what needs a restart."""
        assert self.service is not None
        async with self._reload_lock:
            systemd.reloading()
            try:
                # Reading the file and resolving host names may block: not on the event loop.
                new = await asyncio.to_thread(resolve, self.flags, self.config.config_file)
                return await self._apply(new)
            except (ConfigError, OSError) as exc:
                message = describe(exc) if isinstance(exc, OSError) else str(exc)
                log.error("config.reload_rejected", error=message)
                raise RequestError("invalid_config", message) from exc
            finally:
                systemd.ready(await self.summary())

    async def _apply(self, new: Config) -> dict[str, Any]:
        assert self.service is not None
        applied = [k for k in LIVE_KEYS if getattr(new, k) != getattr(self.config, k)]
        needs_restart = [k for k in RESTART_KEYS if getattr(new, k) != getattr(self.config, k)]
        if "metrics" in applied:
            # Bind the new address before anything is committed: a failure keeps the old state.
            await self._stop_metrics()
            try:
                self.metrics = await self._start_metrics(new.metrics)
            except OSError:
                self.metrics = await self._start_metrics(self.config.metrics)
                raise
        await self.service.apply_live(new)
        self.config = self.config.replace(**{k: getattr(new, k) for k in LIVE_KEYS})
        if "log_level" in applied or "log_format" in applied:
            logs.configure(new.log_level, new.log_format)
        log.info("config.reloaded", applied=applied, needs_restart=needs_restart)
        return {"applied": applied, "needs_restart": needs_restart}

    async def _reload_quietly(self) -> None:
        """SIGHUP's reload: a rejection is already logged; anything else is logged here."""
        try:
            await self.reload()
        except RequestError:
            pass
        except Exception:
            log.exception("config.reload_failed")


def describe(exc: OSError) -> str:
    """An OSError as one line without the "[Errno N]" prefix, naming its file if it has one."""
    text = exc.strerror or str(exc)
    if exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return text


def _raise_fd_limit() -> None:
    """Each connection holds a socket, and a user-path one a transport dup: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
