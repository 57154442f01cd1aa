"""The state and mode of an echo service: what start and restart do, whoever serves the bytes.

Both the in-process service (service.Service) and the supervisor of worker processes
(workers.WorkerPool) are one of these: they share the states, the mode chosen for `auto`, and
the rules of `start` and `restart`, and differ only in how they open, undo and switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog

from echod import __version__
from echod.config.schema import Config
from echod.control.protocol import RequestError
from echod.control.replies import BaseStatus, BpfFigures, CheckReport, ProcessStatus, Stats, Status
from echod.kernel.bypass import Bypass, bypass_status
from echod.kernel.echo import KernelEcho, bpf_status
from echod.service.paths import (
    NOT_CHECKED,
    Checker,
    Outcome,
    UdpOutcome,
    candidates,
    check_report,
    path_name,
    report,
)

if TYPE_CHECKING:
    from echod.service.udp import UdpService

log = structlog.get_logger("echod.service")


def _unavailable(what: str, exc: OSError) -> str:
    reason = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
    if exc.errno in (errno.EPERM, errno.EACCES):
        reason += f" ({what} needs root, or CAP_BPF and CAP_NET_ADMIN)"
    return reason


def resolve_listen(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and socket address echod binds for host:port (the first the resolver gives)."""
    family, _, _, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, addr


class Lifecycle:
    """stopped → starting → serving → stopping → stopped, and live mode switches.

    A subclass provides `_load_kernel`, `_open`, `_abort_start`, `_switch` and `status_now`.
    """

    def __init__(self, config: Config, udp: UdpService) -> None:
        self.config = config
        self.udp = udp  # UDP echo: the sockets of a process that serves, the kernel path's slot
        self.state = "stopped"
        self.requested_mode = config.mode
        self.mode: str | None = None
        self.fallback_reason: str | None = None
        self.kernel: KernelEcho | None = None  # the BPF object, when this process owns it
        self.bypass_requested = config.bypass
        self.bypass: Bypass | None = None  # the bypass object, when this process owns it
        self._bypass_stack = contextlib.ExitStack()  # holds it while attached
        self.started_at = time.monotonic()
        self._lock = asyncio.Lock()
        # Runs the self-check before a path serves; the daemon's service has one, a worker
        # or the self-check's own private service none.
        self.rates: dict[str, float] = {}  # per second, over the last tick (sample)
        self.checker: Checker | None = None
        self.checks: dict[str, Outcome] = {}  # path -> its latest self-check
        self.udp_check: UdpOutcome = NOT_CHECKED  # the UDP kernel path's, at the last `check`
        self.log: Any = log  # the self-check's private service logs its comings and goings less

    def base_status(self) -> BaseStatus:
        """The fields of `status` that do not depend on who serves the connections."""
        return {
            "state": self.state,
            "mode": self.mode,
            "requested_mode": self.requested_mode,
            "fallback_reason": self.fallback_reason,
            "port": self.config.port,
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "bpf": bpf_status(self.kernel),
            "bypass": bypass_status(self.bypass, self.bypass_requested),
            "self_check": report(self.checks),
            "udp": self.udp.status(),
        }

    def _attach_bypass(self, want: bool) -> None:
        """Attach or detach the bypass object (OSError when it cannot be attached)."""
        if want and self.bypass is None:
            bypass = Bypass(self.config.bypass_cgroup, self.config.bypass_object)
            self.bypass = self._bypass_stack.enter_context(bypass)
            self._bypass_attached(self.bypass)
        elif not want and self.bypass is not None:
            self._bypass_stack.close()
            self.bypass = None
            self._bypass_detached()

    def _bypass_detached(self) -> None:
        """The bypass object was detached (the in-process service lets go of its paths)."""

    def _bypass_attached(self, bypass: Bypass) -> None:
        """A bypass object was just attached (the in-process service reads its paths)."""

    def _set_bypass(self, want: bool) -> None:
        """Attach or detach the bypass as asked, then make it follow the listeners and mode.

        Raises RequestError("not_supported") when it cannot be attached: the bypass is asked
        for explicitly, so it never falls back quietly.
        """
        try:
            self._attach_bypass(want)
        except OSError as exc:
            reason = _unavailable("the bypass", exc)
            raise RequestError("not_supported", f"bypass unavailable: {reason}") from exc
        self._follow()

    def _follow(self) -> None:
        """The bypass watches echod's listening addresses, in the mode's way."""
        if self.bypass is not None and self.mode is not None:
            self.bypass.follow(self.endpoints(), self.mode)

    def endpoints(self) -> list[tuple[str, int]]:
        """The addresses echod listens on, as (numeric host, port)."""
        port = self.config.port
        return [(resolve_listen(h, port)[1][0], port) for h in self.config.hosts]

    async def _self_check(self, mode: str, bypass: bool) -> Outcome | None:
        """Check the path on the loaded objects; None when this service checks nothing."""
        if self.checker is None:
            return None
        outcome = await self.checker.path(
            self.config, mode, self.bypass if bypass else None, self.kernel
        )
        self.checks[outcome.path] = outcome
        return outcome

    async def _enter(self, requested: str, want_bypass: bool) -> None:
        """Take the first path that loads, attaches and passes its self-check (paths.candidates).

        Sets mode, fallback_reason and the bypass; the listeners are the caller's. Raises
        RequestError: not_supported when the path asked for cannot be loaded or attached,
        self_check_failed when it (or, for auto, every candidate) failed a case.
        """
        options = candidates(requested, want_bypass)
        skipped: list[str] = []
        for mode, bypass in options:
            name = path_name(mode, bypass)
            if mode == "kernel":
                try:
                    self._load_kernel()
                except OSError as exc:
                    reason = _unavailable("kernel mode", exc)
                    if requested == "kernel":
                        raise RequestError(
                            "not_supported", f"kernel mode unavailable: {reason}"
                        ) from exc
                    log.warning("service.fallback", path=name, reason=reason)
                    skipped.append(f"kernel mode unavailable: {reason}")
                    continue
            attached_now = bypass and self.bypass is None
            if bypass:
                try:
                    self._attach_bypass(True)
                except OSError as exc:
                    reason = _unavailable("the bypass", exc)
                    raise RequestError("not_supported", f"bypass unavailable: {reason}") from exc
            outcome = await self._self_check(mode, bypass)
            if outcome is None or outcome.result != "failed":
                self.mode = mode
                self.fallback_reason = "; ".join(skipped) or None
                self._attach_bypass(bypass)
                self._follow()
                if mode != "kernel":
                    self._maybe_unload()  # a kernel path that failed leaves nothing loaded
                if skipped:
                    log.warning(
                        "service.fallback_to_user" if mode == "user" else "service.fallback",
                        path=name,
                        reason=self.fallback_reason,
                    )
                return
            reason = f"the {name} path failed its self-check: {outcome.reason}"
            log.error("service.path_refused", path=name, case=outcome.case, detail=outcome.detail)
            if attached_now:
                self._attach_bypass(False)
            if len(options) == 1:
                raise RequestError("self_check_failed", reason)
            skipped.append(reason)
        raise RequestError("self_check_failed", "no path passed: " + "; ".join(skipped))

    def bpf_counters(self) -> dict[str, int]:
        """The flat counters of the BPF objects this process owns (for the rates)."""
        out: dict[str, int] = {}
        if self.kernel is not None:
            out.update({f"kernel_{k}": v for k, v in self.kernel.counters().items()})
        if self.bypass is not None:
            out.update({f"bypass_{k}": v for k, v in self.bypass.counters().items()})
        return out

    def bpf_figures(self) -> BpfFigures:
        """stats' kernel, bypass and bpf_programs: the objects this process owns."""
        programs = self.kernel.programs() if self.kernel is not None else []
        if self.bypass is not None:
            programs += self.bypass.programs()
        if self.udp.kernel is not None:
            programs += self.udp.kernel.programs()
        return {
            "kernel": self.kernel.counters() if self.kernel is not None else None,
            "bypass": self.bypass.counters() if self.bypass is not None else None,
            "bpf_programs": programs,
        }

    def _load_kernel(self) -> None:
        """Make kernel mode possible (OSError when the BPF object cannot be had)."""
        raise NotImplementedError

    async def _open(self) -> None:
        """Start serving in self.mode (RequestError, e.g. listen_failed, when it cannot)."""
        raise NotImplementedError

    async def _abort_start(self) -> None:
        """Undo whatever a failed start did."""
        raise NotImplementedError

    async def _switch(self, old: str | None) -> tuple[int, int]:
        """Move connections after a mode change from old; returns (moved, stayed)."""
        raise NotImplementedError

    def status_now(self) -> ProcessStatus:
        """The status, from what is known now."""
        raise NotImplementedError

    def _maybe_unload(self) -> None:
        """Unload the BPF object when nothing uses it any more."""
        raise NotImplementedError

    # -- what the daemon drives: one interface for the in-process service and the pool -------

    async def open(self) -> None:
        """Before the first start (the pool starts its worker processes here)."""

    async def aclose(self) -> None:
        """After the last stop: release what is held for the service's whole life."""
        raise NotImplementedError

    async def stop(self, grace: float | None = None) -> ProcessStatus:
        """Stop serving: connections drain within the grace; returns the status."""
        raise NotImplementedError

    async def run(self) -> None:
        """Background work while the daemon runs, until cancelled."""
        raise NotImplementedError

    async def sample(self) -> None:
        """The daemon's 1 s tick: rates (and the pool's look at its workers)."""
        raise NotImplementedError

    async def report_status(self) -> Status:
        """`status` as the daemon answers it."""
        raise NotImplementedError

    async def report_stats(self) -> Stats:
        """`stats` as the daemon answers it."""
        raise NotImplementedError

    async def apply_live(self, config: Config) -> None:
        """Take the settings that can change while serving."""
        raise NotImplementedError

    async def check(self) -> CheckReport:
        """Run the self-check of every path, and UDP's kernel path's, now (control `check`);
        returns paths.check_report().

        What is not loaded is loaded for the time of the check; the serving state is left as
        it was (UDP's kernel path is checked on a private copy, whether UDP is on or not). A
        service without a checker (a worker) has nothing to run.
        """
        async with self._lock:
            if self.checker is not None:
                outcomes = await self.checker.every_path(self.config, self.kernel, self.bypass)
                self.checks.update(outcomes)
                self.udp_check = await self.checker.udp(self.config)
            return check_report(self.checks, self.udp_check)

    async def start(
        self, mode: str | None = None, port: int | None = None, bypass: bool | None = None
    ) -> ProcessStatus:
        """Open the listeners and enter the requested mode (and bypass); returns the status."""
        async with self._lock:
            if self.state != "stopped":
                raise RequestError("bad_state", f"already {self.state}")
            previous = (self.config, self.requested_mode, self.bypass_requested)
            if port is not None:
                self.config = self.config.replace(port=port)
            self.requested_mode = mode or self.requested_mode
            if bypass is not None:
                self.bypass_requested = bypass
            self.state = "starting"
            try:
                # The bypass before the listeners: a client that connects at once takes it too.
                await self._enter(self.requested_mode, self.bypass_requested)
                await self._open()
                self._start_udp()
            except BaseException:
                self.udp.stop()
                await self._abort_start()
                self._set_bypass(False)
                self.state = "stopped"
                self.mode = None
                self.config, self.requested_mode, self.bypass_requested = previous
                raise
            self.state = "serving"
            st = self.status_now()
            self.log.info(
                "service.serving",
                mode=self.mode,
                listen=st["listen"],
                fallback_reason=self.fallback_reason,
                bypass=self.bypass is not None,
            )
            return st

    def _start_udp(self) -> None:
        """UDP echo, when configured: its sockets, and in kernel mode its kernel path."""
        try:
            self.udp.start(self.config, self.mode)
        except OSError as exc:
            raise RequestError("listen_failed", exc.strerror or str(exc)) from exc

    def _stop_bypass(self) -> None:
        """At stop: detach the bypass (bypass_requested stays, for the next start)."""
        self._set_bypass(False)

    async def restart(self, mode: str | None = None, bypass: bool | None = None) -> dict[str, Any]:
        """Switch mode (and bypass) live; no connection is closed, no byte lost or repeated.

        To kernel: user-path connections move into the sockhash (see migrate.to_kernel).
        To user: new connections are echoed in user space, while kernel-path connections keep
        the kernel path until they close. The reply's "migration" says how many moved and how
        many stayed on their path.

        Bypass on or off, or a mode change with it on, affects new connections only: one in
        the bypass keeps its path until it closes, and one on TCP stays on TCP.
        """
        async with self._lock:
            if self.state != "serving":
                raise RequestError("bad_state", f"cannot restart while {self.state}")
            target = mode or self.requested_mode
            want = self.bypass_requested if bypass is None else bypass
            old, previous = self.mode, (self.requested_mode, self.fallback_reason)
            try:
                await self._enter(target, want)
            except RequestError:
                self.mode = old
                self.requested_mode, self.fallback_reason = previous
                self._follow()
                self._maybe_unload()
                raise
            self.requested_mode, self.bypass_requested = target, want
            moved, stayed = await self._switch(old)
            self.udp.follow(self.config, self.mode)
            self.log.info(
                "service.mode_switched",
                old=old,
                new=self.mode,
                moved=moved,
                stayed=stayed,
                fallback_reason=self.fallback_reason,
                bypass=self.bypass is not None,
            )
            return {**self.status_now(), "migration": {"moved": moved, "stayed": stayed}}
