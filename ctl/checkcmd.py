"""`echoctl check`: the self-check of every echo path and of UDP's kernel path, from the daemon
or run here."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import click

from echoctl.client import ControlClient, ControlError, DaemonUnreachable, client_control_path
from echoctl.output import EXIT_ERROR, control_failed, emit_json, failed

PATH_ORDER = ("user", "user+bypass", "kernel", "kernel+bypass")
CHECK_TIMEOUT = 120.0  # four paths, each bounded by a few cases of at most 2 s
MARKS = {"passed": "ok", "failed": "FAILED", "not_run": "not run"}
UDP_TITLE = "UDP kernel path (TCX)"


def _local(objects: Mapping[str, str | None]) -> Any:
    """Run `echod --self-check` here (the same interpreter, so the same echod) and parse it;
    `objects` maps its flags (--bpf-object, ...) to their values."""
    argv = [sys.executable, "-m", "echod", "--self-check", "--log-level", "error"]
    for flag, value in objects.items():
        if value:
            argv += [flag, value]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CHECK_TIMEOUT)
    try:
        return json.loads(done.stdout)
    except ValueError:
        message = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise click.ClickException(f"echod --self-check failed: {message}") from None


def _mark(entry: Mapping[str, Any], case: str) -> str:
    cases = entry.get("cases") or {}
    if case not in cases:
        return "-"
    return MARKS.get(cases[case], cases[case])


def _outcome_line(name: str, entry: Mapping[str, Any], why: str) -> str | None:
    """The line under a table for an entry that did not pass: `NAME: failed: REASON` or
    `NAME: not run: WHY`; None for one that passed."""
    if entry.get("result") == "failed":
        return f"{name}: failed: {entry.get('reason')}"
    if entry.get("result") == "not_run" and entry.get(why):
        return f"{name}: not run: {entry.get(why)}"
    return None


def render_udp(entry: Mapping[str, Any]) -> str:
    """UDP's kernel path: one row per datagram and address, its result, and why it failed."""
    from echoctl.render import table

    rows = [
        [f"{c.get('bytes', 0):,} B to {c.get('address')}", MARKS.get(c["result"], c["result"])]
        for c in entry.get("cases") or []
    ]
    rows.append(["result", str(entry.get("result", "-")).upper()])
    line = _outcome_line("udp", entry, "reason")
    return table(["datagram", UDP_TITLE], rows) + ("" if line is None else "\n" + line)


def render_check(result: Mapping[str, Any]) -> str:
    """One table of case × path, a line per path that did not pass, then UDP's kernel path
    (absent from an older daemon's reply)."""
    from echoctl.render import table

    paths = result.get("paths") or {}
    cases = [(c["name"], c["title"]) for c in result.get("cases") or []]
    names = [p for p in PATH_ORDER if p in paths]
    rows = [[title, *(_mark(paths[p], case) for p in names)] for case, title in cases]
    rows.append(["result", *(str(paths[p].get("result", "-")).upper() for p in names)])
    lines = [f"kernel {result.get('kernel', '?')}", "", table(["case", *names], rows)]
    for name in names:
        line = _outcome_line(name, paths[name], "detail")
        if line is not None:
            lines.append(line)
    if result.get("udp"):
        lines += ["", render_udp(result["udp"])]
    return "\n".join(lines)


@click.command()
@click.option(
    "--local",
    is_flag=True,
    help="Run the check here instead of asking the daemon (needs root, or CAP_BPF and "
    "CAP_NET_ADMIN). Without a daemon to ask, the check runs here anyway.",
)
@click.option("--bpf-object", metavar="FILE", help="With --local: the echo object to check.")
@click.option("--bypass-object", metavar="FILE", help="With --local: the bypass object to check.")
@click.option("--bypass-cgroup", metavar="DIR", help="With --local: where to attach the bypass.")
@click.option("--udp-object", metavar="FILE", help="With --local: the UDP echo object to check.")
@click.option("-j", "--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def check(
    ctx: click.Context,
    local: bool,
    bpf_object: str | None,
    bypass_object: str | None,
    bypass_cgroup: str | None,
    udp_object: str | None,
    as_json: bool,
) -> None:
    """Check every echo path, TCP's and UDP's, on this kernel; exit 1 when one fails.

    Each TCP path (user, user+bypass, kernel, kernel+bypass) echoes a set of cases on a
    private listener, every byte checked. A running daemon runs them with the objects it
    serves with. UDP's kernel path (TCX) echoes 1 B and 1,472 B datagrams on each loopback
    address, on a private copy of its program attached to lo for the check alone (a copy
    that serves is not touched), whether or not the daemon serves UDP.

    Exit status: 0 when nothing failed (a path not run does not fail); 1 when a TCP path
    or UDP's kernel path failed (TCX missing counts as failed). An error from the daemon
    exits as for every command (1, or 4 for permission denied).
    """
    group = ctx.find_object(object)
    control = getattr(group, "control", None) or client_control_path()
    as_json = as_json or bool(getattr(group, "json", False))
    result: Any = None
    if not local:
        try:
            with ControlClient(control, timeout=CHECK_TIMEOUT) as client:
                result = client.call("check")
        except DaemonUnreachable as err:
            if err.code != "unreachable":
                control_failed(err, "check", as_json)
            click.echo(f"echoctl: check: no daemon at {control}: checking here", err=True)
        except ControlError as err:
            control_failed(err, "check", as_json)
    if result is None:
        try:
            result = _local(
                {
                    "--bpf-object": bpf_object,
                    "--bypass-object": bypass_object,
                    "--bypass-cgroup": bypass_cgroup,
                    "--udp-object": udp_object,
                }
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise failed("check", f"cannot run echod --self-check: {exc}", as_json) from None
    if as_json:
        emit_json(result)
    else:
        click.echo(render_check(result))
    if not result.get("passed", False):
        raise click.exceptions.Exit(EXIT_ERROR)
