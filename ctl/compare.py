"""Compare echod's paths: the same load against each in turn, medians over repeats.

A TCP path is a mode, with or without the same-host bypass: user, user+bypass, kernel and
kernel+bypass (the short circuit); with --udp the paths are UDP's, user and kernel (TCX).
Replaces the old benchmark.sh. Paths alternate (A B A B ...) so slow drift of a shared machine
lands on every path alike; each figure reported is the median of the repeats. What differs
between TCP and UDP (switching, the check that a run took its path, what fails it) is a
`Paths` (comparepaths.py, compareudp.py).
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from echoctl.bench.config import BenchConfig, BenchError
from echoctl.bench.pathwatch import StatusProbe, control_status
from echoctl.bench.report import plural
from echoctl.bench.runner import control_probe, run_bench
from echoctl.bench.target import status_target
from echoctl.comparefigures import change_pct, summarize, sweep_summary
from echoctl.comparepaths import (
    SWITCH_TIMEOUT,
    CompareError,
    Paths,
    TcpPaths,
    control_call,
    split_path,
)
from echoctl.compareudp import UdpPaths
from echoctl.interrupt import Interrupt
from echoctl.spawn import SpawnError, private_echod
from echoctl.sysstat import cpu_count
from echod.config.schema import EFFECTIVE_MODES

Say = Callable[[str], None]


@dataclass(frozen=True)
class CompareConfig:
    """What to compare: modes, repeats, the load (TCP, or UDP's with bench.udp), and an
    optional size sweep."""

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

    def paths(self) -> Paths:
        """Return what the paths compared are: TCP's, or UDP's with --udp."""
        return UdpPaths() if self.bench.udp else TcpPaths()

    def validate(self) -> None:
        """Raise ValueError when the configuration makes no sense."""
        self.paths().validate(self.modes, self.sizes)
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

    def run(
        self, b: BenchConfig, probe: Callable[[], dict[str, Any]], path: str, kind: Paths
    ) -> dict[str, Any]:
        """Bench `path`; return the report, or raise _Stopped when a signal cut it short (a
        run cut short is not counted)."""
        report = _bench(b, probe, path, self.interrupt, self.status, kind)
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
            args = cfg.paths().spawn_args
            with private_echod(mode, hosts, args, say=say, port=cfg.port) as daemon:
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
    cfg.paths().preflight(control)
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
    kind = cfg.paths()
    b = cfg.bench
    flows = plural(b.connections, "flow") if b.udp else f"{b.connections} conn"
    shape = f"{flows} x {b.size} B, {_length(b)}"
    for rep in range(cfg.repeat):
        for mode in cfg.modes:
            plan.check()
            kind.switch(control, mode)
            plan.step(f"{mode}: {shape}, repeat {rep + 1}")
            report = plan.run(b, probe, mode, kind)
            runs.append({"mode": mode, "repeat": rep + 1, "report": report})
            failed += [f"{mode} repeat {rep + 1}: {why}" for why in kind.failures(report)]
            for size in cfg.sizes:
                point = _sweep_point(cfg, mode, rep, size, probe, plan)
                sweep.append(point)
                for pattern in ("pingpong", kind.bulk):
                    failed += [
                        f"{mode} repeat {rep + 1}, sweep {size} B {pattern}: {why}"
                        for why in kind.failures(point[pattern])
                    ]


def _result(
    cfg: CompareConfig, runs: list[dict[str, Any]], sweep: list[dict[str, Any]], failed: list[str]
) -> dict[str, Any]:
    b, kind = cfg.bench, cfg.paths()
    summary = {
        m: summarize([r["report"] for r in runs if r["mode"] == m], b.udp) for m in cfg.modes
    }
    load: dict[str, Any] = {
        "connections": b.connections,
        "size": b.size,
        "duration_s": b.duration,
        "rounds": None if b.duration else b.rounds,
        "qps": b.qps,
        "pattern": b.udp_pattern() if b.udp else b.pattern,
    }
    if b.udp:
        load.update(window=b.udp_window(), udp_timeout_s=b.udp_timeout, max_loss=b.max_loss)
    return {
        "protocol": kind.protocol,
        "modes": list(cfg.modes),
        "repeat": cfg.repeat,
        "load": load,
        "machine": {"kernel": platform.release(), "cpus": cpu_count()},
        "summary": summary,
        "change_pct": change_pct(cfg.modes, summary),
        "runs": runs,
        "sweep": (
            sweep_summary(cfg.modes, cfg.sizes, cfg.sweep_duration, sweep, kind.bulk)
            if cfg.sizes
            else None
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
    kind: Paths | None = None,
) -> dict[str, Any]:
    """Run one bench on `path` and check that it took it (TCP's paths unless `kind`)."""
    try:
        report = run_bench(b, server_probe=probe, interrupt=interrupt, status_probe=status)
    except BenchError as exc:
        raise CompareError(f"{path}: {exc}") from exc
    if report.get("interrupted"):
        return report  # cut short: not counted, so not checked
    (kind or TcpPaths()).check(b, report, path)
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
    kind = cfg.paths()
    plan.check()
    plan.step(f"{mode}: sweep {size} B ping-pong, repeat {rep + 1}")
    # A UDP ping-pong keeps one datagram in flight: --window is the flood's.
    pingpong = replace(one, pattern="pingpong", window=0 if one.udp else one.window)
    ping = plan.run(pingpong, probe, mode, kind)
    plan.check()
    plan.step(f"{mode}: sweep {size} B {kind.bulk}, repeat {rep + 1}")
    bulk = plan.run(replace(one, pattern=kind.bulk), probe, mode, kind)
    return {"mode": mode, "repeat": rep + 1, "size": size, "pingpong": ping, kind.bulk: bulk}
