"""The `echoctl bench` and `echoctl compare` commands (the lead registers them on the group)."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from echoctl.bench.config import BenchConfig, BenchError
from echoctl.bench.options import bench_config, bench_options, load_options
from echoctl.bench.pathwatch import control_status
from echoctl.bench.report import failures, progress_line, render_report
from echoctl.bench.runner import control_probe, run_bench
from echoctl.bench.target import control_target
from echoctl.bench.udpreport import render_udp_report, udp_failures
from echoctl.compare import CompareConfig
from echoctl.compare import run_compare as _run_compare
from echoctl.comparepaths import BYPASS_SUFFIX, CompareError
from echoctl.comparerender import plot, render_sweep, render_table
from echoctl.interrupt import (
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    Interrupt,
    Terminated,
    catching,
    exit_status,
)
from echoctl.output import EXIT_ERROR, emit_json, error_object, failed, usage


def _group_control(ctx: click.Context) -> str | None:
    """Return the group's --control when it points at an existing socket."""
    opts = ctx.find_object(object)
    path = getattr(opts, "control", None)
    return path if isinstance(path, str) and os.path.exists(path) else None


def _group_json(ctx: click.Context) -> bool:
    return bool(getattr(ctx.find_object(object), "json", False))


def _given(ctx: click.Context, name: str) -> bool:
    """Whether an option was set by the user rather than left at its default."""
    source = ctx.get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _csv(kind: type, text: str) -> tuple[Any, ...]:
    try:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(f"not a comma-separated list: {text}") from exc


def _progress(line: dict[str, Any]) -> None:
    click.echo(progress_line(line), err=True)


@click.command()
@bench_options
@click.pass_context
def bench(ctx: click.Context, **kw: Any) -> None:
    """Load an echo server (TCP, or UDP with --udp) and measure rate, latency, errors and CPU;
    exit 1 on any error."""
    as_json = kw["as_json"] or _group_json(ctx)
    progress = not as_json and sys.stderr.isatty()
    try:
        cfg = bench_config(kw, progress)
        cfg.validate()
        _check_udp(ctx, kw)
    except ValueError as exc:
        raise usage(str(exc), as_json) from exc
    try:
        with catching(Interrupt()) as interrupt:
            cfg, control = _bench_target(ctx, kw, cfg)
            probe = control_probe(control) if control else None
            status = control_status(control) if control else None
            show = _progress if progress else None
            report = run_bench(
                cfg, progress=show, server_probe=probe, interrupt=interrupt, status_probe=status
            )
    except ValueError as exc:
        raise usage(str(exc), as_json) from exc
    except BenchError as exc:
        raise failed("bench", str(exc), as_json) from None
    except KeyboardInterrupt:
        raise failed("bench", "interrupted", as_json, "interrupted", EXIT_INTERRUPTED) from None
    except Terminated:
        raise failed("bench", "terminated", as_json, "terminated", EXIT_TERMINATED) from None
    if as_json:
        emit_json(report)
    else:
        click.echo(render_udp_report(report) if cfg.udp else render_report(report))
    if interrupt.signum is not None:
        # What was measured until the signal is printed above, marked as interrupted.
        if not as_json:
            click.echo(f"echoctl: bench: interrupted by {interrupt.name}", err=True)
        raise click.exceptions.Exit(exit_status(interrupt.signum))
    reasons = udp_failures(report) if cfg.udp else failures(report)
    if reasons:
        if not as_json:
            click.echo(f"echoctl: bench: failed: {', '.join(reasons)}", err=True)
        raise click.exceptions.Exit(EXIT_ERROR)


def _check_udp(ctx: click.Context, kw: dict[str, Any], control: bool = False) -> None:
    """Refuse the options --udp has no use for, and the UDP ones without --udp; `control`:
    --control is the daemon to switch (compare), not one whose figures to show (bench)."""
    if not kw["udp"]:
        for name in ("udp_timeout", "max_loss"):
            if _given(ctx, name):
                raise ValueError(f"--{name.replace('_', '-')} needs --udp")
        return
    if _given(ctx, "stall_timeout"):
        raise ValueError("--stall-timeout is for TCP, not --udp")
    if not control and ctx.get_parameter_source("control") == ParameterSource.COMMANDLINE:
        # The daemon's figures are TCP's; bench --udp loads the --host and --port given, and
        # ignores an ECHOD_CONTROL in the environment.
        raise ValueError("--control is for TCP, not bench --udp (compare --udp takes it)")


def _bench_target(
    ctx: click.Context, kw: dict[str, Any], cfg: BenchConfig
) -> tuple[BenchConfig, str | None]:
    """With a control socket, load the daemon behind it; return the config and the socket."""
    control = None if cfg.udp else kw["control"] or _group_control(ctx)
    if not control:
        return cfg, None
    host = kw["host"] if _given(ctx, "host") else None
    port = kw["port"] if _given(ctx, "port") else None
    try:
        host, port = control_target(control, host, port)
    except BenchError as exc:
        if kw["control"]:
            raise
        # The group's socket, perhaps only the default path: the user asked for no figures.
        click.echo(f"echoctl: bench: no server figures: {exc}", err=True)
        return cfg, None
    return replace(cfg, host=host, port=port), control


@click.command()
@load_options
@click.option(
    "--modes",
    default="user,kernel",
    show_default=True,
    help="Paths, in run order: user, user+bypass, kernel, kernel+bypass (with --udp: user, "
    "kernel).",
)
@click.option(
    "--bypass",
    "with_bypass",
    is_flag=True,
    help="Add each mode's +bypass path after it: four paths, as in Intel's istio-tcpip-bypass "
    "experiment (sockmap between same-host sockets; TCP only).",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs per mode, alternated A B A B; the table shows medians.",
)
@click.option(
    "--sizes",
    default="",
    help="Comma-separated sizes for a sweep on one connection (--udp: one flow; ping-pong and "
    "flood).",
)
@click.option(
    "--sweep-duration",
    type=click.FloatRange(min=0, min_open=True, max=600),
    default=2.0,
    show_default=True,
    help="Seconds per sweep point.",
)
@click.option(
    "--spawn",
    is_flag=True,
    help="Start a private echod for the comparison, on --host and --port when given "
    "(default 127.0.0.1 and a free port); with --udp, it echoes UDP with no rate limit per "
    "source.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Draw the sweep to this PNG (needs --sizes).",
)
@click.pass_context
def compare(ctx: click.Context, **kw: Any) -> None:
    """Run the same load against each daemon path (TCP's, or UDP's with --udp) and report
    medians and the change in %; exit 1 on any error."""
    as_json = kw["as_json"] or _group_json(ctx)
    plot_path = kw["plot_path"]
    try:
        modes = _csv(str, kw["modes"])
        cfg = CompareConfig(
            bench=bench_config(kw, progress=False),
            modes=_with_bypass(modes) if kw["with_bypass"] else modes,
            repeat=kw["repeat"],
            sizes=_csv(int, kw["sizes"]),
            sweep_duration=kw["sweep_duration"],
            control=kw["control"] or (None if kw["spawn"] else _group_control(ctx)),
            spawn=kw["spawn"],
            host=kw["host"] if _given(ctx, "host") else None,
            port=kw["port"] if _given(ctx, "port") else None,
        )
        if plot_path and not cfg.sizes:
            raise ValueError("--plot draws the size sweep: give --sizes too")
        cfg.validate()
        _check_udp(ctx, kw, control=True)
        if plot_path:
            _check_plot_path(plot_path)
    except (ValueError, click.BadParameter) as exc:
        raise usage(str(exc), as_json) from exc

    def say(text: str) -> None:
        if not as_json:
            click.echo(text, err=True)

    try:
        with catching(Interrupt()) as interrupt:
            result = _run_compare(cfg, say, interrupt)
    except ValueError as exc:
        raise usage(str(exc), as_json) from exc
    except CompareError as exc:
        raise failed("compare", str(exc), as_json) from None
    except KeyboardInterrupt:
        raise failed("compare", "interrupted", as_json, "interrupted", EXIT_INTERRUPTED) from None
    except Terminated:
        raise failed("compare", "terminated", as_json, "terminated", EXIT_TERMINATED) from None
    if result.get("interrupted") and not result["runs"]:
        # Nothing finished: no table to show, as when a signal comes before any run.
        word = "terminated" if result["interrupted"] == "SIGTERM" else "interrupted"
        code = exit_status(interrupt.signum or EXIT_INTERRUPTED - 128)
        raise failed("compare", word, as_json, word, code) from None
    plot_error = None
    if plot_path and not result.get("interrupted"):  # a partial sweep is not drawn
        try:
            plot(result, plot_path)
        except (OSError, ImportError) as exc:
            plot_error = f"cannot draw {plot_path}: {exc}"
            # One JSON object even so: the results, with the failure where scripts look for it.
            result["error"] = error_object("plot_failed", plot_error)["error"]
    if as_json:
        emit_json(result)
    else:
        click.echo(render_table(result))
        if result["sweep"]:
            click.echo()
            click.echo(render_sweep(result))
        if plot_path and not plot_error:
            click.echo(f"\nfigure written to {plot_path}")
    if plot_error:
        click.echo(f"echoctl: compare: {plot_error}", err=True)
    if result.get("interrupted"):
        # The runs finished before the signal are printed above, marked as interrupted.
        if not as_json:
            click.echo(f"echoctl: compare: interrupted by {result['interrupted']}", err=True)
        raise click.exceptions.Exit(exit_status(interrupt.signum or EXIT_INTERRUPTED - 128))
    if result["failures"] and not as_json:
        click.echo(f"echoctl: compare: failed: {'; '.join(result['failures'])}", err=True)
    if plot_error or result["failures"]:
        raise click.exceptions.Exit(EXIT_ERROR)


def _with_bypass(modes: tuple[str, ...]) -> tuple[str, ...]:
    """Each mode followed by its +bypass path: user,kernel -> the four paths."""
    out: list[str] = []
    for m in modes:
        out += [m] if m.endswith(BYPASS_SUFFIX) else [m, m + BYPASS_SUFFIX]
    return tuple(dict.fromkeys(out))


def pip_command() -> str:
    """The pip of the environment echoctl runs in (/opt/echod/bin/pip when installed there)."""
    pip = Path(sys.executable).parent / "pip"
    return str(pip) if pip.exists() else f"{sys.executable} -m pip"


def _check_plot_path(path: str) -> None:
    """Refuse a --plot file that cannot be written, or no matplotlib, before any run starts."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"--plot needs matplotlib: {pip_command()} install 'matplotlib>=3.7'")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"--plot: cannot write {path}: {exc.strerror}") from exc
    if not existed:
        os.unlink(path)
