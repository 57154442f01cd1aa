"""Compare echod's paths: the same load against each in turn, medians over repeats.

A path is a mode, with or without the same-host bypass: user, user+bypass, kernel and
kernel+bypass (the short circuit). Replaces the old benchmark.sh. Paths alternate (A B A B
...) so slow drift of a shared machine lands on every path alike; each figure reported is the
median of the repeats.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from echoctl.bench.config import BenchConfig, BenchError
from echoctl.bench.pathwatch import StatusProbe, control_status
from echoctl.bench.report import failures
from echoctl.bench.runner import control_probe, run_bench
from echoctl.bench.target import status_target
from echoctl.client import ControlClient
from echoctl.comparefigures import change_pct, summarize, sweep_summary
from echoctl.interrupt import Interrupt
from echoctl.spawn import SpawnError, private_echod
from echoctl.sysstat import cpu_count
from echod.config.schema import EFFECTIVE_MODES

SWITCH_TIMEOUT = 60.0
BYPASS_SUFFIX = "+bypass"
# What --modes may name: each effective mode, alone or with the bypass.
PATHS = tuple(p for m in reversed(EFFECTIVE_MODES) for p in (m, m + BYPASS_SUFFIX))

Say = Callable[[str], None]


class CompareError(Exception):
    """The comparison could not be done; the message is one line."""


@dataclass(frozen=True)
class CompareConfig:
    """What to compare: modes, repeats, the load, and an optional size sweep."""

    bench: BenchConfig
    modes: tuple[str, ...] = tuple(reversed(EFFECTIVE_MODES))  # user first, then kernel
    repeat: int = 3
    sizes: tuple[int, ...] = ()
    sweep_duration: float = 2.0
    control: str | None = None
    spawn: bool = False
    # Explicit target; None: where the --control daemon listens (with spawn: 127.0.0.1, a free
    # port).
    host: str | None = None
    port: int | None = None

    def validate(self) -> None:
        """Raise ValueError when the configuration makes no sense."""
        if not self.modes or any(m not in PATHS for m in self.modes):
            raise ValueError(f"modes must be a list of {', '.join(PATHS)}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError("each mode may appear once")
        if self.repeat < 1:
            raise ValueError("repeat must be at least 1")
        if any(s < 1 for s in self.sizes):
            raise ValueError("sizes must be at least 1 byte")
        if not self.spawn and not self.control:
            raise ValueError("give --control SOCK (or ECHOD_CONTROL), or --spawn")
        self.bench.validate()


# ---------------------------------------------------------------------------------------------
# The daemon: a private one, or the one behind --control; switching its mode


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


def switch_mode(control: str, path: str) -> dict[str, Any]:
    """Restart the daemon onto `path`, then check that `status` shows that mode and bypass."""
    mode, bypass = split_path(path)
    control_call(control, "restart", {"mode": mode, "bypass": bypass}, timeout=SWITCH_TIMEOUT)
    deadline = time.monotonic() + SWITCH_TIMEOUT
    while True:
        status: dict[str, Any] = control_call(control, "status")
        if status.get("state") == "serving":
            if status.get("mode") != mode:
                reason = status.get("fallback_reason") or "no reason given"
                raise CompareError(
                    f"asked for {mode} mode, daemon runs {status.get('mode')}: {reason}"
                )
            if bool((status.get("bypass") or {}).get("enabled")) != bypass:
                raise CompareError(f"asked for {path}, the daemon's bypass is not so")
            return status
        if time.monotonic() > deadline:
            raise CompareError(f"daemon not serving after restart: state {status.get('state')}")
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class _Plan:
    total: int
    done: int = 0
    say: Say = field(default=lambda _: None)
    interrupt: Interrupt | None = None
    status: StatusProbe | None = None

    def step(self, what: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {what}")

    def check(self) -> None:
        """Raise _Stopped once a signal has asked the comparison to end."""
        if self.interrupt is not None and self.interrupt.signum is not None:
            raise _Stopped

    def run(self, b: BenchConfig, probe: Callable[[], dict[str, Any]], path: str) -> dict[str, Any]:
        """Bench `path`; return the report, or raise _Stopped when a signal cut it short (a
        run cut short is not counted)."""
        report = _bench(b, probe, path, self.interrupt, self.status)
        if report.get("interrupted"):
            raise _Stopped
        return report


def _asked(status: dict[str, Any]) -> tuple[Any, bool]:
    """What a daemon is asking for: its requested mode, and whether the bypass."""
    return status.get("requested_mode"), bool((status.get("bypass") or {}).get("requested"))


def restore_mode(control: str, asked: tuple[str, bool], say: Say) -> None:
    """Ask the daemon for its mode and bypass again if the comparison left them otherwise."""
    if _asked(control_call(control, "status")) == asked:
        return
    mode, bypass = asked
    say(f"restoring {mode} mode, bypass {'on' if bypass else 'off'}")
    params = {"mode": mode, "bypass": bypass}
    control_call(control, "restart", params, timeout=SWITCH_TIMEOUT)


def run_compare(cfg: CompareConfig, say: Say, interrupt: Interrupt | None = None) -> dict[str, Any]:
    """Run the whole comparison and return its result (the `--json` object).

    With `interrupt`, a first signal once a run measures ends the comparison after that step:
    the result covers the runs finished before it, with `interrupted` naming the signal.
    """
    cfg.validate()
    if cfg.spawn:
        try:
            hosts = (cfg.host,) if cfg.host else ("127.0.0.1",)
            mode = split_path(cfg.modes[0])[0]
            with private_echod(mode, hosts, say=say, port=cfg.port) as daemon:
                bench = replace(cfg.bench, host=daemon.host, port=daemon.port)
                return _run(replace(cfg, bench=bench), daemon.control, say, interrupt)
        except SpawnError as exc:
            raise CompareError(str(exc)) from exc
    control = cfg.control
    assert control is not None
    status = control_call(control, "status")
    try:
        host, port = status_target(status, control, cfg.host, cfg.port)
    except BenchError as exc:
        raise CompareError(str(exc)) from exc
    cfg = replace(cfg, bench=replace(cfg.bench, host=host, port=port))
    original = _asked(status)
    if not isinstance(original[0], str):
        return _run(cfg, control, say, interrupt)
    # Someone else's daemon: leave it asking for the mode it was asking for before.
    try:
        result = _run(cfg, control, say, interrupt)
    except BaseException:
        try:
            restore_mode(control, original, say)
        except CompareError as exc:
            say(f"could not restore {original[0]} mode: {exc}")
        raise
    restore_mode(control, original, say)
    return result


class _Stopped(Exception):
    """A signal asked the comparison to end; what finished before it is reported."""


def _run(
    cfg: CompareConfig, control: str, say: Say, interrupt: Interrupt | None = None
) -> dict[str, Any]:
    per_run = 1 + 2 * len(cfg.sizes)
    total = cfg.repeat * len(cfg.modes) * per_run
    plan = _Plan(total, say=say, interrupt=interrupt, status=control_status(control))
    probe = control_probe(control)
    runs: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    failed: list[str] = []
    try:
        _runs(cfg, control, plan, probe, runs, sweep, failed)
    except _Stopped:
        pass
    result = _result(cfg, runs, sweep, failed)
    if interrupt is not None and interrupt.name:
        result["interrupted"] = interrupt.name
    return result


def _runs(
    cfg: CompareConfig,
    control: str,
    plan: _Plan,
    probe: Callable[[], dict[str, Any]],
    runs: list[dict[str, Any]],
    sweep: list[dict[str, Any]],
    failed: list[str],
) -> None:
    """Every run and sweep point, appended as each finishes; _Stopped ends them early."""
    for rep in range(cfg.repeat):
        for mode in cfg.modes:
            plan.check()
            switch_mode(control, mode)
            b = cfg.bench
            plan.step(f"{mode}: {b.connections} conn x {b.size} B, {_length(b)}, repeat {rep + 1}")
            report = plan.run(b, probe, mode)
            runs.append({"mode": mode, "repeat": rep + 1, "report": report})
            failed += [f"{mode} repeat {rep + 1}: {why}" for why in failures(report)]
            for size in cfg.sizes:
                point = _sweep_point(cfg, mode, rep, size, probe, plan)
                sweep.append(point)
                for pattern in ("pingpong", "stream"):
                    failed += [
                        f"{mode} repeat {rep + 1}, sweep {size} B {pattern}: {why}"
                        for why in failures(point[pattern])
                    ]


def _result(
    cfg: CompareConfig, runs: list[dict[str, Any]], sweep: list[dict[str, Any]], failed: list[str]
) -> dict[str, Any]:
    summary = {m: summarize([r["report"] for r in runs if r["mode"] == m]) for m in cfg.modes}
    return {
        "modes": list(cfg.modes),
        "repeat": cfg.repeat,
        "load": {
            "connections": cfg.bench.connections,
            "size": cfg.bench.size,
            "duration_s": cfg.bench.duration,
            "rounds": None if cfg.bench.duration else cfg.bench.rounds,
            "qps": cfg.bench.qps,
            "pattern": cfg.bench.pattern,
        },
        "machine": {"kernel": platform.release(), "cpus": cpu_count()},
        "summary": summary,
        "change_pct": change_pct(cfg.modes, summary),
        "runs": runs,
        "sweep": (
            sweep_summary(cfg.modes, cfg.sizes, cfg.sweep_duration, sweep) if cfg.sizes else None
        ),
        "failures": failed,
    }


def _length(b: BenchConfig) -> str:
    return f"{b.duration:g} s" if b.duration else f"{b.rounds} rounds"


def _bench(
    b: BenchConfig,
    probe: Callable[[], dict[str, Any]],
    path: str,
    interrupt: Interrupt | None = None,
    status: StatusProbe | None = None,
) -> dict[str, Any]:
    mode = split_path(path)[0]
    try:
        report = run_bench(b, server_probe=probe, interrupt=interrupt, status_probe=status)
    except BenchError as exc:
        raise CompareError(f"{path}: {exc}") from exc
    if report.get("interrupted"):
        return report  # cut short: not counted, so not checked
    server = report["server"]
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
    if split_path(path)[1] and not server.get("bypass_redirects"):
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
    return report


def _sweep_point(
    cfg: CompareConfig,
    mode: str,
    rep: int,
    size: int,
    probe: Callable[[], dict[str, Any]],
    plan: _Plan,
) -> dict[str, Any]:
    one = replace(
        cfg.bench,
        connections=1,
        workers=1,
        size=size,
        size_max=0,
        qps=0.0,
        duration=cfg.sweep_duration,
        warmup=0.0,
        progress=False,
    )
    plan.check()
    plan.step(f"{mode}: sweep {size} B ping-pong, repeat {rep + 1}")
    ping = plan.run(replace(one, pattern="pingpong"), probe, mode)
    plan.check()
    plan.step(f"{mode}: sweep {size} B stream, repeat {rep + 1}")
    stream = plan.run(replace(one, pattern="stream"), probe, mode)
    return {"mode": mode, "repeat": rep + 1, "size": size, "pingpong": ping, "stream": stream}
