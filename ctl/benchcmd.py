"""The `echoctl bench` and `echoctl compare` commands (the lead registers them on the group)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from types import FrameType
from typing import Any

import click
from click.core import ParameterSource

from echoctl.bench import (
    BenchConfig,
    BenchError,
    control_probe,
    control_target,
    failures,
    run_bench,
)
from echoctl.compare import CompareConfig, CompareError, plot, render_sweep, render_table
from echoctl.compare import run_compare as _run_compare

EXIT_FAILED = 1  # the run finished but saw errors or mismatches, or could not run at all
EXIT_USAGE = 2
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """SIGTERM arrived: unwinding runs every finally, so workers and daemons are stopped."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into Terminated while the block runs; later ones are ignored, to let it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        # Cleanup is bounded (joins and stops have timeouts); a second SIGTERM must not cut it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(EXIT_TERMINATED)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _group_control(ctx: click.Context) -> str | None:
    """Return the group's --control when it points at an existing socket."""
    opts = ctx.find_object(object)
    path = getattr(opts, "control", None)
    return path if isinstance(path, str) and os.path.exists(path) else None


def _group_json(ctx: click.Context) -> bool:
    return bool(getattr(ctx.find_object(object), "json", False))


def _emit(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


def _error(code: str, message: str) -> dict[str, Any]:
    """Return the `--json` failure object, the same shape as the other commands' (cli.py)."""
    return {"error": {"code": code, "message": message}}


def _fail(
    command: str, message: str, as_json: bool, code: str = "failed", status: int = EXIT_FAILED
) -> click.exceptions.Exit:
    if as_json:
        _emit(_error(code, message))
    click.echo(f"echoctl: {command}: {message}", err=True)
    return click.exceptions.Exit(status)


def _usage(message: str, as_json: bool) -> click.UsageError:
    if as_json:
        _emit(_error("usage", message))
    return click.UsageError(message)


def _given(ctx: click.Context, name: str) -> bool:
    """Whether an option was set by the user rather than left at its default."""
    source = ctx.get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _csv(kind: type, text: str) -> tuple[Any, ...]:
    try:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise click.BadParameter(f"not a comma-separated list: {text}") from exc


def load_options(f: Any) -> Any:
    """Add the load-shape options shared by bench and compare."""
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Loopback address."),
        click.option("--port", type=click.IntRange(1, 65535), default=8888, show_default=True),
        click.option(
            "-c", "--connections", type=click.IntRange(min=1), default=10, show_default=True
        ),
        click.option(
            "-r",
            "--rounds",
            type=click.IntRange(min=1),
            default=10_000,
            show_default=True,
            help="Requests per connection (ignored with --duration).",
        ),
        click.option(
            "-s",
            "--size",
            type=click.IntRange(min=1),
            default=64,
            show_default=True,
            help="Message size in bytes.",
        ),
        click.option(
            "-q",
            "--qps",
            type=click.FloatRange(min=0),
            default=0.0,
            help="Total requests per second on a fixed schedule; 0 = as fast as possible.",
        ),
        click.option(
            "-d",
            "--duration",
            type=click.FloatRange(min=0, min_open=True, max=3600),
            help="Seconds to run; overrides --rounds.",
        ),
        click.option(
            "--warmup", type=click.FloatRange(min=0), default=0.0, help="Seconds not measured."
        ),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            default=0,
            help="Worker processes [default: one per CPU, at most one per connection].",
        ),
        click.option(
            "--pattern",
            type=click.Choice(["pingpong", "stream"]),
            default="pingpong",
            show_default=True,
            help="One message at a time, or a full pipe both ways.",
        ),
        click.option(
            "--timeout",
            "io_timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=5.0,
            show_default=True,
            help="Seconds one send/receive may block before it counts.",
        ),
        click.option(
            "--control",
            metavar="SOCK",
            envvar="ECHOD_CONTROL",
            help="Daemon control socket, for server figures [env ECHOD_CONTROL].",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _config(kw: dict[str, Any], progress: bool) -> BenchConfig:
    return BenchConfig(
        host=kw["host"],
        port=kw["port"],
        connections=kw["connections"],
        rounds=kw["rounds"],
        size=kw["size"],
        qps=kw["qps"],
        duration=kw["duration"],
        warmup=kw["warmup"],
        workers=kw["workers"],
        pattern=kw["pattern"],
        timeout=kw["io_timeout"],
        progress=progress,
    )


def _progress(line: dict[str, float]) -> None:
    click.echo(
        f"{line['elapsed_s']:6.1f} s  {line['qps']:>12,.0f} req/s  p99 {line['p99_us']:,.1f} µs",
        err=True,
    )


@click.command()
@load_options
@click.pass_context
def bench(ctx: click.Context, **kw: Any) -> None:
    """Load an echo server and measure rate, latency, errors and CPU; exit 1 on any error."""
    as_json = kw["as_json"] or _group_json(ctx)
    progress = not as_json and sys.stderr.isatty()
    try:
        cfg = _config(kw, progress)
        cfg.validate()
    except ValueError as exc:
        raise _usage(str(exc), as_json) from exc
    try:
        with sigterm_unwinds():
            cfg, control = _bench_target(ctx, kw, cfg)
            probe = control_probe(control) if control else None
            report = run_bench(cfg, progress=_progress if progress else None, server_probe=probe)
    except ValueError as exc:
        raise _usage(str(exc), as_json) from exc
    except BenchError as exc:
        raise _fail("bench", str(exc), as_json) from None
    except KeyboardInterrupt:
        raise _fail("bench", "interrupted", as_json, "interrupted") from None
    except Terminated:
        raise _fail("bench", "terminated", as_json, "terminated", EXIT_TERMINATED) from None
    if as_json:
        _emit(report)
    else:
        click.echo(render_report(report))
    reasons = failures(report)
    if reasons:
        if not as_json:
            click.echo(f"echoctl: bench: failed: {', '.join(reasons)}", err=True)
        raise click.exceptions.Exit(EXIT_FAILED)


def _bench_target(
    ctx: click.Context, kw: dict[str, Any], cfg: BenchConfig
) -> tuple[BenchConfig, str | None]:
    """With a control socket, load the daemon behind it; return the config and the socket."""
    control = kw["control"] or _group_control(ctx)
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


def _lat(summary: dict[str, float]) -> str:
    keys = (("avg", "avg"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9"))
    parts = [f"{label} {summary[key]:,.1f}" for key, label in keys]
    return "  ".join(parts) + f"  max {summary['max']:,.1f} µs"


def render_report(r: dict[str, Any]) -> str:
    """Return a bench report as a short aligned table with units."""
    rows = [
        (
            "load",
            f"{r['pattern']}, {r['connections']} conn x {r['size']} B, "
            f"{r['workers']} workers, {r['duration_s']:.2f} s measured",
        ),
        ("connections", f"{r['connections_alive']} of {r['connections']} open at the end"),
        ("requests", f"{r['requests']:,}"),
        (
            "rate",
            f"{r['qps']:,.0f} req/s"
            + (f" (target {r['target_qps']:,.0f})" if "target_qps" in r else ""),
        ),
    ]
    if r["pattern"] == "stream":
        rows.append(
            (
                "bandwidth",
                f"sent {r['mb_per_s_sent']:,.1f} MB/s, received {r['mb_per_s_received']:,.1f} MB/s",
            )
        )
    rows += [
        (
            "errors",
            f"{r['errors']} (short reads {r['short_reads']}, resets {r['resets']}, "
            f"timeouts {r['timeouts']}, other {r['other_errors']})",
        ),
        ("mismatches", str(r["mismatches"])),
        ("warm-up errors", str(r["warmup_errors"])),
        ("latency" + (" (corrected)" if "latency_raw_us" in r else ""), _lat(r["latency_us"])),
    ]
    if "latency_raw_us" in r:
        rows.append(("latency (raw)", _lat(r["latency_raw_us"])))
    rows.append(("connect", _lat(r["connect_us"])))
    client = r["cpu"]["client"]
    rows.append(("client CPU", f"user {client['user_s']:.2f} s, sys {client['system_s']:.2f} s"))
    m = r["cpu"]["machine"]
    total = m["total"] or 1.0
    kinds = ("user", "system", "softirq", "irq", "iowait", "steal", "idle")
    share = ", ".join(f"{k} {100 * m.get(k, 0.0) / total:.0f}%" for k in kinds if m.get(k))
    rows.append(("machine CPU", f"{share} ({m['cpus']} CPUs)"))
    if "server" in r:
        s = r["server"]
        if "error" in s and "mode" not in s:
            rows.append(("server", f"no figures: {s['error']}"))
        else:
            text = f"{s.get('mode')} mode"
            if "cpu_user_s" in s:
                text += f", CPU user {s['cpu_user_s']:.2f} s, sys {s['cpu_system_s']:.2f} s"
            if "ctx_voluntary" in s:
                text += (
                    f", ctx switches {s['ctx_voluntary']:,} voluntary, "
                    f"{s['ctx_involuntary']:,} involuntary"
                )
            if "error" in s:
                text += f" ({s['error']})"
            rows.append(("server", text))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


@click.command()
@load_options
@click.option("--modes", default="user,kernel", show_default=True, help="Modes, in run order.")
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs per mode, alternated A B A B; the table shows medians.",
)
@click.option("--sizes", default="", help="Comma-separated sizes for a 1-connection sweep.")
@click.option(
    "--sweep-duration",
    type=click.FloatRange(min=0, min_open=True, max=600),
    default=2.0,
    show_default=True,
    help="Seconds per sweep point.",
)
@click.option("--spawn", is_flag=True, help="Start a private echod for the comparison.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="Draw the sweep to this PNG (needs --sizes).",
)
@click.pass_context
def compare(ctx: click.Context, **kw: Any) -> None:
    """Run the same load against each daemon mode and report medians and the change in %."""
    as_json = kw["as_json"] or _group_json(ctx)
    plot_path = kw["plot_path"]
    try:
        cfg = CompareConfig(
            bench=_config(kw, progress=False),
            modes=_csv(str, kw["modes"]),
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
        if plot_path:
            _check_plot_path(plot_path)
    except (ValueError, click.BadParameter) as exc:
        raise _usage(str(exc), as_json) from exc

    def say(text: str) -> None:
        if not as_json:
            click.echo(text, err=True)

    try:
        with sigterm_unwinds():
            result = _run_compare(cfg, say)
    except ValueError as exc:
        raise _usage(str(exc), as_json) from exc
    except CompareError as exc:
        raise _fail("compare", str(exc), as_json) from None
    except KeyboardInterrupt:
        raise _fail("compare", "interrupted", as_json, "interrupted") from None
    except Terminated:
        raise _fail("compare", "terminated", as_json, "terminated", EXIT_TERMINATED) from None
    plot_error = None
    if plot_path:
        try:
            plot(result, plot_path)
        except (OSError, ImportError) as exc:
            plot_error = f"cannot draw {plot_path}: {exc}"
            # One JSON object even so: the results, with the failure where scripts look for it.
            result["error"] = _error("plot_failed", plot_error)["error"]
    if as_json:
        _emit(result)
    else:
        click.echo(render_table(result))
        if result["sweep"]:
            click.echo()
            click.echo(render_sweep(result))
        if plot_path and not plot_error:
            click.echo(f"\nfigure written to {plot_path}")
    if plot_error:
        click.echo(f"echoctl: compare: {plot_error}", err=True)
    if result["failures"] and not as_json:
        click.echo(f"echoctl: compare: failed: {'; '.join(result['failures'])}", err=True)
    if plot_error or result["failures"]:
        raise click.exceptions.Exit(EXIT_FAILED)


def _check_plot_path(path: str) -> None:
    """Refuse a --plot file that cannot be written, or no matplotlib, before any run starts."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise ValueError(f"--plot: cannot write {path}: {exc.strerror}") from exc
    if not existed:
        os.unlink(path)
