"""The paths `echoctl compare` measures: putting the daemon on one, and telling that a run took it.

compare.py runs a comparison the same way whatever the protocol; what differs lives in a
`Paths`: TCP's here (a mode, with or without the same-host bypass), UDP's in compareudp.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from echoctl.bench.config import BenchConfig
from echoctl.bench.report import failures
from echoctl.client import ControlClient
from echod.config.schema import EFFECTIVE_MODES

SWITCH_TIMEOUT = 60.0
BYPASS_SUFFIX = "+bypass"
# What --modes may name: each effective mode, alone or with the bypass.
PATHS = tuple(p for m in reversed(EFFECTIVE_MODES) for p in (m, m + BYPASS_SUFFIX))


class CompareError(Exception):
    """The comparison could not be done; the message is one line."""


class Paths(Protocol):
    """What differs between comparing TCP's paths and UDP's."""

    protocol: str  # "tcp" or "udp"
    bulk: str  # the pattern of the size sweep's bandwidth points: stream or flood
    spawn_args: tuple[str, ...]  # what a private echod needs to serve these paths

    def validate(self, modes: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        """Raise ValueError for a path or sweep size these paths cannot measure."""

    def preflight(self, control: str) -> None:
        """Raise CompareError when the daemon cannot serve these paths at all."""

    def switch(self, control: str, path: str) -> dict[str, Any]:
        """Put the daemon on `path`; return its `status` once it serves there."""

    def check(self, b: BenchConfig, report: dict[str, Any], path: str) -> None:
        """Raise CompareError unless the run's report shows that it took `path`."""

    def failures(self, report: dict[str, Any]) -> list[str]:
        """Return why a finished run counts as failed (the comparison exits 1)."""


def control_call(
    path: str, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    """Call one control method; every failure becomes a one-line CompareError."""
    try:
        with ControlClient(path, timeout=timeout) as client:
            return client.call(method, params)
    except Exception as exc:  # ControlError, OSError
        raise CompareError(f"control {method} on {path}: {exc}") from exc


def split_path(path: str) -> tuple[str, bool]:
    """A path's mode, and whether the bypass is on: "kernel+bypass" -> ("kernel", True)."""
    mode = path.removesuffix(BYPASS_SUFFIX)
    return mode, mode != path


def restart_into(
    control: str, params: dict[str, Any], check: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Restart the daemon with `params`; once it serves, `check` its status and return it."""
    control_call(control, "restart", params, timeout=SWITCH_TIMEOUT)
    deadline = time.monotonic() + SWITCH_TIMEOUT
    while True:
        status: dict[str, Any] = control_call(control, "status")
        if status.get("state") == "serving":
            check(status)
            return status
        if time.monotonic() > deadline:
            raise CompareError(f"daemon not serving after restart: state {status.get('state')}")
        time.sleep(0.1)


def check_mode(status: dict[str, Any], mode: str) -> None:
    """Raise CompareError unless the daemon runs `mode`, with the reason it gave if not."""
    if status.get("mode") != mode:
        reason = status.get("fallback_reason") or "no reason given"
        raise CompareError(f"asked for {mode} mode, daemon runs {status.get('mode')}: {reason}")


def check_run(server: dict[str, Any], path: str, mode: str) -> None:
    """Raise CompareError unless the daemon's figures show it in `mode` for the whole run."""
    if "error" in server:
        # Without the daemon's figures nothing shows which mode was measured.
        raise CompareError(f"{path}: {server['error']}")
    if server.get("mode") != mode:
        raise CompareError(f"the daemon left {mode} mode during the run ({server.get('mode')})")
    for change in server.get("path_changes") or []:
        raise CompareError(
            f"{path}: the daemon went from {change['from']} to {change['to']} during the run "
            f"(between {change['after_s']:g} and {change['by_s']:g} s)"
        )


class TcpPaths:
    """TCP's paths: user, user+bypass, kernel and kernel+bypass (the short circuit)."""

    protocol = "tcp"
    bulk = "stream"
    spawn_args: tuple[str, ...] = ()

    def validate(self, modes: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        """Raise ValueError for a path that is not one of PATHS."""
        if not modes or any(m not in PATHS for m in modes):
            raise ValueError(f"modes must be a list of {', '.join(PATHS)}")

    def preflight(self, control: str) -> None:
        """Every daemon serves TCP: nothing to check."""

    def switch(self, control: str, path: str) -> dict[str, Any]:
        """Restart the daemon onto `path`, then check that `status` shows that mode and bypass."""
        mode, bypass = split_path(path)

        def check(status: dict[str, Any]) -> None:
            check_mode(status, mode)
            if bool((status.get("bypass") or {}).get("enabled")) != bypass:
                raise CompareError(f"asked for {path}, the daemon's bypass is not so")

        return restart_into(control, {"mode": mode, "bypass": bypass}, check)

    def check(self, b: BenchConfig, report: dict[str, Any], path: str) -> None:
        """The mode held, the bypass carried sends, and the connections were on the path."""
        mode, bypass = split_path(path)
        server = report["server"]
        check_run(server, path, mode)
        if bypass and not server.get("bypass_redirects"):
            raise CompareError(
                f"{path}: no send took the bypass (is the load generator outside bypass_cgroup, "
                "or on another host?)"
            )
        on_path = (server.get("connections_by_path") or {}).get(mode)
        # Other clients may add to the count, so this can only catch too few, never too many.
        # Churn holds no connection open to count: every one is new, so it takes the mode's path.
        if b.pattern != "crr" and isinstance(on_path, int) and on_path < b.connections:
            raise CompareError(
                f"{mode} mode: only {on_path} of {b.connections} bench connections were on the "
                f"{mode} path"
            )

    def failures(self, report: dict[str, Any]) -> list[str]:
        """Errors and mismatches, as `bench` counts them."""
        return failures(report)
