"""The parent side of a run: fork the workers, start them together, gather their figures.

`run_bench` is the whole run. It splits the connections over worker processes (worker.py),
waits until every worker is connected, sets one start time for all, shows progress while they
run, and merges their `Done` records into the report (report.py). A worker that fails or dies
ends the run with BenchError; Ctrl-C once measuring has begun stops the workers and reports
what was measured until then.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from echoctl.bench.config import MAX_RUN_S, PROGRESS_NS, BenchConfig, BenchError
from echoctl.bench.histogram import Histogram
from echoctl.bench.messages import Done, Failed, Message, Ready, Result, Tick
from echoctl.bench.pathwatch import PathWatch, StatusProbe, path_of, udp_path_of
from echoctl.bench.progress import Progress, ProgressFn
from echoctl.bench.report import build_report
from echoctl.bench.target import resolve
from echoctl.bench.udpreport import build_udp_report, udp_delta
from echoctl.bench.worker import worker_main
from echoctl.client import ControlClient
from echoctl.interrupt import Interrupt
from echoctl.sysstat import cpu_count, machine_cpu

ServerProbe = Callable[[], dict[str, Any]]


@dataclass
class _Collected:
    results: dict[int, Result] = field(default_factory=dict)
    connect: Histogram = field(default_factory=Histogram)


def split(total: int, parts: int) -> list[int]:
    """Split `total` connections into `parts` near-equal shares."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_bench(
    cfg: BenchConfig,
    progress: ProgressFn | None = None,
    server_probe: ServerProbe | None = None,
    interrupt: Interrupt | None = None,
    status_probe: StatusProbe | None = None,
) -> dict[str, Any]:
    """Run one benchmark and return the report (the `--json` object).

    With `status_probe` (and `server_probe`), the daemon's path is polled while measuring, and
    the report's `server` says where it started, where it ended, and when it changed (with
    --udp: the path that echoes UDP, and each path's UDP counters moved during the run).

    With `interrupt`, a signal once measuring has begun stops the workers and the report covers
    what was measured until then, with `interrupted` naming the signal.
    """
    cfg.validate()
    family, sockaddr = resolve(cfg.host, cfg.port)
    nworkers = cfg.worker_count()
    shares = split(cfg.connections, nworkers)
    # fork, not spawn: spawn re-imports the caller's __main__, which breaks for `python -c` and
    # for scripts without a main guard. Workers touch nothing that another thread could hold.
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    go = ctx.Event()
    start_ns = ctx.RawValue("q", 0)
    stop_flag = ctx.RawValue("b", 0)
    procs = []
    for i, share in enumerate(shares):
        rate = cfg.qps * share / cfg.connections if cfg.qps else 0.0
        args = (cfg, i, share, rate, family, sockaddr, out, go, start_ns, stop_flag)
        procs.append(ctx.Process(target=worker_main, args=args, daemon=True, name=f"bench-{i}"))
    for p in procs:
        p.start()
    got = _Collected()
    lines = (
        Progress(nworkers, PROGRESS_NS / 1e9, cfg.pattern == "stream", progress, udp=cfg.udp)
        if progress
        else None
    )
    try:
        _await_ready(cfg, out, procs, got)
        server_before = server_probe() if server_probe else None
        start_ns.value = time.monotonic_ns() + 20_000_000
        measure_ns = start_ns.value + int(cfg.warmup * 1e9)
        _release(go)
        if interrupt is not None:
            interrupt.graceful(lambda: setattr(stop_flag, "value", 1))
        _sleep_until(measure_ns, stop_flag)
        machine_before = machine_cpu()
        if server_probe and cfg.warmup:
            server_before = server_probe()
        where = udp_path_of if cfg.udp else path_of
        watch = PathWatch(status_probe or dict, where(server_before), where=where)
        with watch if status_probe and server_probe else contextlib.nullcontext():
            _await_done(cfg, out, procs, got, lines)
        machine_after = machine_cpu()
        server_after = server_probe() if server_probe else None
        if server_after:
            watch.saw(server_after)
    except BaseException:
        stop_flag.value = 1
        _release(go)
        _reap(procs)
        raise
    _reap(procs)
    build = build_udp_report if cfg.udp else build_report
    report = build(cfg, list(got.results.values()), got.connect, nworkers)
    report["cpu"]["machine"] = {
        **machine_after.minus(machine_before).report(),
        "cpus": cpu_count(),
    }
    if server_probe:
        report["server"] = server_delta(server_before, server_after, watch.changes, cfg.udp)
    if interrupt is not None and interrupt.name:
        report["interrupted"] = interrupt.name
    return report


def _sleep_until(when_ns: int, stop_flag: Any) -> None:
    while not stop_flag.value and (gap := when_ns - time.monotonic_ns()) > 0:
        time.sleep(min(gap / 1e9, 0.1))


def _release(go: Any) -> None:
    """go.set() with SIGINT and SIGTERM held off: a signal handler that raises inside it
    leaves the Event's semaphores half-updated, and the next set() then fails an assertion."""
    held = {signal.SIGINT, signal.SIGTERM}
    main = threading.current_thread() is threading.main_thread()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held) if main else None
    try:
        go.set()
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _reap(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


def _await_ready(cfg: BenchConfig, out: Any, procs: list[Any], got: _Collected) -> None:
    ready = 0
    deadline = time.monotonic() + cfg.timeout * max(1, cfg.connections // 100) + 30
    while ready < len(procs):
        message = _get(out, deadline, procs)
        if isinstance(message, Failed):
            raise BenchError(message.message)
        if isinstance(message, Ready):
            got.connect.merge_sparse(message.connect)
            ready += 1


def _await_done(
    cfg: BenchConfig, out: Any, procs: list[Any], got: _Collected, lines: Progress | None
) -> None:
    length = cfg.duration if cfg.duration is not None else MAX_RUN_S
    deadline = time.monotonic() + cfg.warmup + length + cfg.timeout + cfg.stall_timeout + 150
    while len(got.results) < len(procs):
        message = _get(out, deadline, procs)
        if isinstance(message, Failed):
            raise BenchError(message.message)
        if isinstance(message, Done):
            got.results[message.result.index] = message.result
        elif isinstance(message, Tick) and lines is not None:
            lines.add(message.index, message.sample)


def _get(out: Any, deadline: float, procs: list[Any]) -> Message:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError("bench workers did not finish in time")
        try:
            message: Message = out.get(timeout=min(left, 1.0))
            return message
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                text = f"bench worker {dead[0].name} died (exit {dead[0].exitcode})"
                raise BenchError(text) from None


def server_delta(
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    changes: list[dict[str, Any]] | None = None,
    udp: bool = False,
) -> dict[str, Any]:
    """Return the daemon's path (at the start, at the end, each change between) and its CPU and
    context-switch deltas between two probes; with `udp`, the UDP path and its counters'."""
    if not before or not after or "error" in before or "error" in after:
        return {"error": (after or before or {}).get("error", "no server figures")}
    where = udp_path_of if udp else path_of
    out: dict[str, Any] = {
        "path_start": where(before),
        "path_end": where(after),
        "path_changes": changes or [],
        "mode": after.get("mode"),
        "requested_mode": after.get("requested_mode"),
        "pid": after.get("pid"),
        # Probed while the bench connections were open, before any of them closed.
        "connections_by_path": before.get("connections_by_path"),
        "bypass": bool((after.get("bypass") or {}).get("enabled")),
    }
    if before.get("pid") != after.get("pid"):
        out["error"] = "the daemon restarted during the run"
        return out
    p0, p1 = before.get("process", {}), after.get("process", {})
    for key in ("cpu_user_s", "cpu_system_s", "ctx_voluntary", "ctx_involuntary"):
        if key in p0 and key in p1:
            delta = p1[key] - p0[key]
            out[key] = round(delta, 3) if isinstance(delta, float) else delta
    b0, b1 = before.get("bypass_counters") or {}, after.get("bypass_counters") or {}
    if b1:  # sends the bypass redirected during the run, and those it could not
        out["bypass_redirects"] = sum(
            b1.get(k, 0) - b0.get(k, 0) for k in ("short_msgs", "ingress_msgs")
        )
        out["bypass_failures"] = b1.get("redirect_failures", 0) - b0.get("redirect_failures", 0)
    if udp:
        out["udp"] = udp_delta(before.get("udp_counters"), after.get("udp_counters"))
    return out


def control_probe(path: str, timeout: float = 5.0) -> ServerProbe:
    """Return a probe that reads `status` and `stats` from the daemon's control socket."""

    def probe() -> dict[str, Any]:
        try:
            with ControlClient(path, timeout=timeout) as client:
                status = client.call("status")
                stats = client.call("stats")
        except Exception as exc:  # ControlError or OSError: report it; the bench still counts
            return {"error": f"control socket {path}: {exc}"}
        if not isinstance(stats, dict):
            stats = {}
        return {
            **status,
            "process": stats.get("process", {}),
            "bypass_counters": stats.get("bypass"),
            "udp_counters": stats.get("udp"),  # each path's, nil while UDP is off
        }

    return probe
