"""The state and mode of an echo service: what start and restart do, whoever serves the bytes.

Both the in-process service (service.Service) and the supervisor of worker processes
(workers.WorkerPool) are one of these: they share the states, the mode chosen for `auto`, and
the rules of `start` and `restart`, and differ only in how they open, undo and switch.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections.abc import Callable
from typing import Any

import structlog

from echod import __version__
from echod.bypass import Bypass, bypass_status
from echod.config import Config
from echod.protocol import RequestError
from echod.sockmap import KernelEcho, bpf_status

log = structlog.get_logger("echod.service")


def _unavailable(what: str, exc: OSError) -> str:
    reason = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
    if exc.errno in (errno.EPERM, errno.EACCES):
        reason += f" ({what} needs root, or CAP_BPF and CAP_NET_ADMIN)"
    return reason


def choose_mode(requested: str, load: Callable[[], None]) -> tuple[str, str | None]:
    """The mode to serve in and why it is not the one asked for: (mode, fallback reason).

    `load` loads and attaches the BPF object (OSError when it cannot). `auto` falls back to
    user mode with the reason; `kernel` raises RequestError("not_supported") instead.
    """
    if requested == "user":
        return "user", None
    try:
        load()
    except OSError as exc:
        reason = _unavailable("kernel mode", exc)
        if requested == "kernel":
            raise RequestError("not_supported", f"kernel mode unavailable: {reason}") from exc
        log.warning("service.fallback_to_user", reason=reason)
        return "user", reason
    return "kernel", None


class Lifecycle:
    """stopped → starting → serving → stopping → stopped, and live mode switches.

    A subclass provides `_load_kernel`, `_open`, `_abort_start`, `_switch` and `status_now`.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.state = "stopped"
        self.requested_mode = config.mode
        self.mode: str | None = None
        self.fallback_reason: str | None = None
        self.kernel: KernelEcho | None = None  # the BPF object, when this process owns it
        self.bypass_requested = config.bypass
        self.bypass: Bypass | None = None  # the bypass object, when this process owns it
        self.started_at = time.monotonic()
        self._lock = asyncio.Lock()

    def base_status(self) -> dict[str, Any]:
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
        }

    def _set_bypass(self, want: bool) -> None:
        """Attach or detach the bypass as asked, then make it follow the port and the mode.

        Raises RequestError("not_supported") when it cannot be attached: the bypass is asked
        for explicitly, so it never falls back quietly.
        """
        if want and self.bypass is None:
            try:
                self.bypass = Bypass(self.config.bypass_cgroup).__enter__()
            except OSError as exc:
                reason = _unavailable("the bypass", exc)
                raise RequestError("not_supported", f"bypass unavailable: {reason}") from exc
            self._bypass_attached(self.bypass)
        elif not want and self.bypass is not None:
            self.bypass.close()
            self.bypass = None
        if self.bypass is not None and self.mode is not None:
            self.bypass.follow(self.config.port, self.mode)

    def _bypass_attached(self, bypass: Bypass) -> None:
        """A bypass object was just attached (the in-process service reads its paths)."""

    def bpf_counters(self) -> dict[str, int]:
        """The flat counters of the BPF objects this process owns (for the rates)."""
        out: dict[str, int] = {}
        if self.kernel is not None:
            out.update({f"kernel_{k}": v for k, v in self.kernel.counters().items()})
        if self.bypass is not None:
            out.update({f"bypass_{k}": v for k, v in self.bypass.counters().items()})
        return out

    def bpf_figures(self) -> dict[str, Any]:
        """stats' kernel, bypass and bpf_programs: the objects this process owns."""
        programs = self.kernel.programs() if self.kernel is not None else []
        if self.bypass is not None:
            programs += self.bypass.programs()
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

    def status_now(self) -> dict[str, Any]:
        """The status, from what is known now."""
        raise NotImplementedError

    async def start(
        self, mode: str | None = None, port: int | None = None, bypass: bool | None = None
    ) -> dict[str, Any]:
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
                self.mode, self.fallback_reason = choose_mode(
                    self.requested_mode, self._load_kernel
                )
                # Before the listeners: a client that connects at once is bypassed too.
                self._set_bypass(self.bypass_requested)
                await self._open()
            except BaseException:
                await self._abort_start()
                self._set_bypass(False)
                self.state = "stopped"
                self.mode = None
                self.config, self.requested_mode, self.bypass_requested = previous
                raise
            self.state = "serving"
            st = self.status_now()
            log.info(
                "service.serving",
                mode=self.mode,
                listen=st["listen"],
                fallback_reason=self.fallback_reason,
                bypass=self.bypass is not None,
            )
            return st

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
                self.mode, self.fallback_reason = choose_mode(target, self._load_kernel)
                self._set_bypass(want)
            except RequestError:
                self.mode = old
                self.requested_mode, self.fallback_reason = previous
                if self.bypass is not None and old is not None:
                    self.bypass.follow(self.config.port, old)
                raise
            self.requested_mode, self.bypass_requested = target, want
            moved, stayed = await self._switch(old)
            log.info(
                "service.mode_switched",
                old=old,
                new=self.mode,
                moved=moved,
                stayed=stayed,
                fallback_reason=self.fallback_reason,
                bypass=self.bypass is not None,
            )
            return {**self.status_now(), "migration": {"moved": moved, "stayed": stayed}}
