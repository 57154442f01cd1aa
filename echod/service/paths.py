"""The four echo paths, the order auto tries them in, a path's self-check result, and the UDP
kernel path's.

The self-check itself (echod.service.selfcheck) runs a private service; this module is what the
lifecycle, the status and echoctl need to know of it, with nothing heavy imported.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from echod.control.replies import CheckReport, UdpCheck

if TYPE_CHECKING:
    from echod.config.schema import Config
    from echod.kernel.bypass import Bypass
    from echod.kernel.echo import KernelEcho

PATHS = ("user", "user+bypass", "kernel", "kernel+bypass")

# name -> what it checks, as the report names it; in the order the cases run.
CASES = {
    "early_1b": "send 1 B right after connect",
    "early_64k": "send 64 KiB right after connect",
    "paused": "send after a pause",
    "bulk_1m": "1 MiB in one write",
    "pipelined": "1,000 small writes pipelined",
    "half_close": "half-close: the echo, then EOF",
    "reset": "reset mid-message leaves nothing behind",
    "kernel_echo": "echoed in the kernel, not in user space",
    "bypass_taken": "a connection takes the bypass",
    "pre_attach": "a connection from before the attach stays on TCP",
}


def path_name(mode: str, bypass: bool) -> str:
    """'kernel', 'kernel+bypass', 'user' or 'user+bypass'."""
    return mode + ("+bypass" if bypass else "")


def candidates(requested: str, bypass: bool) -> list[tuple[str, bool]]:
    """The paths to try, best first: an explicit mode is one path; auto falls back.

    With the bypass asked for, auto tries kernel with it, kernel without it, then user with
    it and without it: a path whose self-check fails gives way to the next.
    """
    if requested != "auto":
        return [(requested, bypass)]
    if not bypass:
        return [("kernel", False), ("user", False)]
    return [("kernel", True), ("kernel", False), ("user", True), ("user", False)]


@dataclass
class Outcome:
    """One path's result: passed, failed (with the first case that failed), or not run."""

    path: str
    result: str  # "passed" | "failed" | "not_run"
    case: str | None = None
    detail: str | None = None
    ms: float = 0.0
    cases: dict[str, str] = field(default_factory=dict)  # case -> passed | failed | not_run
    at: float = field(default_factory=time.time)

    @property
    def reason(self) -> str:
        """One line: what failed and what it saw."""
        if self.case is None:
            return self.detail or self.result
        return f"{CASES.get(self.case, self.case)}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        """What `status`, `check` and `echod --self-check` report for the path."""
        return {
            "result": self.result,
            "case": self.case,
            "detail": self.detail,
            "reason": None if self.result == "passed" else self.reason,
            "ms": round(self.ms, 1),
            "cases": dict(self.cases),
            "checked_at": round(self.at, 3),
        }


@dataclass
class UdpOutcome:
    """The UDP kernel path's check: passed, failed (with what failed) or not run (with why)."""

    result: str  # "passed" | "failed" | "not_run"
    reason: str | None = None
    cases: dict[tuple[str, int], str] = field(default_factory=dict)  # (address, bytes) -> result
    ms: float = 0.0
    at: float | None = field(default_factory=time.time)

    def to_dict(self) -> UdpCheck:
        """What `check` and `echod --self-check` report as `udp`."""
        return {
            "result": self.result,
            "reason": None if self.result == "passed" else self.reason,
            "cases": [
                {"address": address, "bytes": size, "result": result}
                for (address, size), result in self.cases.items()
            ],
            "ms": round(self.ms, 1),
            "checked_at": None if self.at is None else round(self.at, 3),
        }


NOT_CHECKED = UdpOutcome("not_run", "not checked", at=None)


def report(outcomes: dict[str, Outcome]) -> dict[str, Any]:
    """Every path's entry, "not_run" for the ones not checked (status and `check`)."""
    return {
        name: outcomes[name].to_dict() if name in outcomes else {"result": "not_run"}
        for name in PATHS
    }


def check_report(outcomes: dict[str, Outcome], udp: UdpOutcome = NOT_CHECKED) -> CheckReport:
    """What `check` and `echod --self-check` print: the kernel, the cases, every path, UDP's
    kernel path; passed unless one of them failed."""
    failed = any(o.result == "failed" for o in outcomes.values()) or udp.result == "failed"
    return {
        "kernel": os.uname().release,
        "cases": [{"name": name, "title": title} for name, title in CASES.items()],
        "paths": report(outcomes),
        "udp": udp.to_dict(),
        "passed": not failed,
    }


class Checker(Protocol):
    """Runs the self-check (service.selfcheck.SelfCheck); the daemon gives one to its service."""

    async def path(
        self, config: Config, mode: str, bypass: Bypass | None, kernel: KernelEcho | None
    ) -> Outcome:
        """Check one path on these loaded objects."""
        ...

    async def every_path(
        self, config: Config, kernel: KernelEcho | None, bypass: Bypass | None
    ) -> dict[str, Outcome]:
        """Check all four paths, loading for the time of the check what is not loaded."""
        ...

    async def udp(self, config: Config) -> UdpOutcome:
        """Check the UDP kernel path on a private copy of its program, attached to lo."""
        ...
