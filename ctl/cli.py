"""`echoctl`: drive and watch an echod daemon over its control socket."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from echoctl import render, statusrender
from echoctl.benchcmd import bench, compare
from echoctl.checkcmd import check
from echoctl.client import ControlClient, ControlError, client_control_path
from echoctl.output import (
    EXIT_ERROR,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    control_failed,
    emit_json,
    error_object,
)
from echod.config.schema import MODES

# Starting and stopping wait for listeners, BPF attach and connection draining.
MUTATE_TIMEOUT = 60.0
# A day: nobody waits longer for a reply, and socket timeouts overflow past about 9.2e9 s.
MAX_TIMEOUT = 86400.0

F = TypeVar("F", bound=Callable[..., Any])

# The rule of echod.config.default_control_path and client_control_path, in words (UID is the
# caller's uid); test_ctl_help checks it against the path echoctl really uses.
CONTROL_HELP = (
    "Control socket [env ECHOD_CONTROL; default: /run/echod/control.sock as root, else "
    "$XDG_RUNTIME_DIR/echod/control.sock, or /tmp/echod-UID/echod/control.sock when "
    "XDG_RUNTIME_DIR is unset or empty; a user whose socket does not exist gets the system "
    "daemon's /run/echod/control.sock when that one exists]."
)


@dataclass
class Options:
    """Settings shared by every command; `ctx.obj` of the group (bench/compare read it too)."""

    control: str
    json: bool
    timeout: float


def json_option(f: F) -> F:
    """Add `-j/--json` to a command (it is accepted on the group as well)."""
    return click.option("-j", "--json", "as_json", is_flag=True, help="Print one JSON object.")(f)


def _options(ctx: click.Context, as_json: bool) -> Options:
    opts = ctx.find_object(Options)
    if opts is None:  # a command invoked without the group, as in some tests
        opts = Options(client_control_path(), False, 10.0)
    if as_json:
        opts.json = True
    return opts


class Seconds(click.FloatRange):
    """A FloatRange of seconds that also refuses NaN, which passes every bound check."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Convert and range-check `value`, then refuse NaN."""
        seconds = super().convert(value, param, ctx)
        if math.isnan(seconds):
            self.fail(f"{value!r} is not a number of seconds.", param, ctx)
        return seconds


def _call(
    opts: Options,
    command: str,
    method: str,
    params: dict[str, Any] | None = None,
    timeout: float | None = None,
) -> Any:
    try:
        with ControlClient(opts.control, timeout=timeout or opts.timeout) as client:
            return client.call(method, params)
    except ControlError as err:
        control_failed(err, command, opts.json)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--control",
    envvar="ECHOD_CONTROL",
    metavar="SOCK",
    help=CONTROL_HELP,
)
@click.option(
    "--timeout",
    type=Seconds(min=0, min_open=True, max=MAX_TIMEOUT),
    default=10.0,
    show_default=True,
    help="Seconds per reply.",
)
@json_option
@click.version_option(package_name="echod", prog_name="echoctl")
@click.pass_context
def cli(ctx: click.Context, control: str | None, timeout: float, as_json: bool) -> None:
    """Control, watch and benchmark an echod daemon."""
    ctx.obj = Options(control or client_control_path(), as_json, timeout)


@cli.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show state and mode; exit 0 when serving, 3 when stopped or not running."""
    opts = _options(ctx, as_json)
    result = _call(opts, "status", "status")
    if opts.json:
        emit_json(result)
    else:
        click.echo(statusrender.render_status(result))
    if result.get("state") != "serving":
        raise click.exceptions.Exit(EXIT_NOT_RUNNING)


@cli.command()
@json_option
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Show counters, rates, process figures and BPF program run times."""
    opts = _options(ctx, as_json)
    result = _call(opts, "stats", "stats")
    if opts.json:
        emit_json(result)
    else:
        # Whether the kernel keeps BPF run figures is in `status`; without it, show them as is.
        status = _call(opts, "stats", "status")
        enabled = (status.get("bpf") or {}).get("stats_enabled")
        click.echo(
            statusrender.render_stats(result, enabled if isinstance(enabled, bool) else None)
        )


@cli.command()
@click.option(
    "--interval",
    "-i",
    type=Seconds(0.1, 60.0),
    default=1.0,
    show_default=True,
    help="Seconds between updates.",
)
@click.option("--count", "-n", type=click.IntRange(min=1), help="Stop after N updates.")
@click.option(
    "--reconnect",
    is_flag=True,
    help="When the daemon goes away (a restart), wait for it and resume.",
)
@click.option("-j", "--json", "as_json", is_flag=True, help="Print one JSON object per line.")
@click.pass_context
def watch(
    ctx: click.Context, interval: float, count: int | None, reconnect: bool, as_json: bool
) -> None:
    """Stream live figures (a table on a terminal, one JSON object per line otherwise)."""
    opts = _options(ctx, as_json)
    lines = opts.json or not sys.stdout.isatty()
    shown = Shown()
    try:
        while True:
            try:
                _watch_once(opts, interval, count, lines, shown, reconnect)
                return
            except ControlError as err:
                if not reconnect or err.code not in RECONNECT_CODES:
                    control_failed(err, "watch", opts.json)
                click.echo(f"echoctl: watch: {err.message}; waiting for the daemon", err=True)
                _wait_for_daemon(opts, interval)
                click.echo("echoctl: watch: reconnected", err=True)
    except KeyboardInterrupt:
        # Ctrl-C is how a watch normally ends.
        pass
    except BrokenPipeError:
        # The reader went away (`echoctl watch | head -1`): as normal an end as Ctrl-C.
        _discard_stdout()


# Errors after which `watch --reconnect` waits for the daemon: it stopped, restarted or is busy.
RECONNECT_CODES = ("unreachable", "disconnected", "timeout", "busy")


@dataclass
class Shown:
    """Updates shown so far, over every connection of one `watch`."""

    n: int = 0


def _watch_once(
    opts: Options, interval: float, count: int | None, lines: bool, shown: Shown, reconnect: bool
) -> None:
    """Watch over one connection until `count` updates in all have been shown."""
    with ControlClient(opts.control, timeout=opts.timeout) as client:
        stream = client.subscribe("watch", {"interval": interval})
        if lines:
            _watch_lines(stream, count, shown)
        else:
            _watch_live(stream, count, interval, shown, reconnect)


def _wait_for_daemon(opts: Options, interval: float) -> None:
    """Poll until the control socket answers `status` again (Ctrl-C ends the wait)."""
    while True:
        try:
            with ControlClient(opts.control, timeout=opts.timeout) as client:
                client.call("status")
            return
        except (ControlError, OSError):
            time.sleep(interval)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _watch_lines(stream: Any, count: int | None, shown: Shown) -> None:
    for snapshot in stream:
        click.echo(json.dumps(snapshot, default=str, sort_keys=True))
        sys.stdout.flush()
        shown.n += 1
        if count is not None and shown.n >= count:
            return


def _watch_live(
    stream: Any, count: int | None, interval: float, shown: Shown, reconnect: bool
) -> None:
    from rich.live import Live

    prev: Mapping[str, Any] | None = None
    live: Live | None = None
    try:
        for snapshot in stream:
            shown.n += 1
            table = render.watch_table(snapshot, render.rates_between(prev, snapshot), interval)
            if live is None:
                live = Live(table, auto_refresh=False)
                live.start()
            else:
                live.update(table, refresh=True)
            prev = snapshot
            if count is not None and shown.n >= count:
                return
    except ControlError as err:
        if live is not None and reconnect and err.code in RECONNECT_CODES:
            # The frame of the daemon that went away is erased: the next one takes its place.
            live.transient = True
        raise
    finally:
        if live is not None:
            live.stop()


BYPASS_OPTION = click.option(
    "--bypass/--no-bypass",
    default=None,
    help="Same-host bypass on or off (default: as the daemon has it).",
)


@cli.command()
@click.option("--mode", type=click.Choice(MODES), help="Echo mode.")
@click.option("--port", type=click.IntRange(1, 65535), help="TCP port to listen on.")
@BYPASS_OPTION
@json_option
@click.pass_context
def start(
    ctx: click.Context, mode: str | None, port: int | None, bypass: bool | None, as_json: bool
) -> None:
    """Start serving (the daemon process keeps running when stopped)."""
    opts = _options(ctx, as_json)
    given = (("mode", mode), ("port", port), ("bypass", bypass))
    params = {k: v for k, v in given if v is not None}
    _report(opts, _call(opts, "start", "start", params, MUTATE_TIMEOUT))


@cli.command()
@json_option
@click.pass_context
def stop(ctx: click.Context, as_json: bool) -> None:
    """Stop serving: close listeners and connections, detach BPF."""
    opts = _options(ctx, as_json)
    _report(opts, _call(opts, "stop", "stop", None, MUTATE_TIMEOUT))


@cli.command()
@click.option("--mode", type=click.Choice(MODES), help="Echo mode.")
@BYPASS_OPTION
@json_option
@click.pass_context
def restart(ctx: click.Context, mode: str | None, bypass: bool | None, as_json: bool) -> None:
    """Switch mode or bypass live: connections migrate, none is closed."""
    opts = _options(ctx, as_json)
    params = {k: v for k, v in (("mode", mode), ("bypass", bypass)) if v is not None}
    _report(opts, _call(opts, "restart", "restart", params, MUTATE_TIMEOUT))


@cli.command()
@json_option
@click.pass_context
def reload(ctx: click.Context, as_json: bool) -> None:
    """Re-read the configuration file and apply what can change live."""
    opts = _options(ctx, as_json)
    result = _call(opts, "reload", "reload", None, MUTATE_TIMEOUT)
    if opts.json:
        emit_json(result)
    else:
        click.echo(statusrender.render_reload(result))


def _report(opts: Options, status: Mapping[str, Any]) -> None:
    if opts.json:
        emit_json(status)
    else:
        click.echo(statusrender.summary(status))


cli.add_command(bench)
cli.add_command(compare)
cli.add_command(check)


def main() -> None:
    """Console-script entry point: run the CLI and turn usage errors into exit status 2."""
    argv = sys.argv[1:]
    try:
        code = cli.main(args=argv, prog_name="echoctl", standalone_mode=False)
    except click.UsageError as exc:
        if "--json" in argv:
            emit_json(error_object("usage", exc.format_message()))
        else:
            exc.show()
        sys.exit(EXIT_USAGE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted!", err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
