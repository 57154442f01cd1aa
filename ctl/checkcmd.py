"""`echoctl check`: the self-check of every echo path, from the daemon or run here."""

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


def _local(bpf_object: str | None, bypass_object: str | None, cgroup: str | None) -> Any:
    """Run `echod --self-check` here (the same interpreter, so the same echod) and parse it."""
    argv = [sys.executable, "-m", "echod", "--self-check", "--log-level", "error"]
    for flag, value in (
        ("--bpf-object", bpf_object),
        ("--bypass-object", bypass_object),
        ("--bypass-cgroup", cgroup),
    ):
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
    return {"passed": "ok", "failed": "FAILED", "not_run": "not run"}.get(cases[case], cases[case])


def render_check(result: Mapping[str, Any]) -> str:
    """One table of case × path, then a line per path that did not pass."""
    from echoctl.render import table

    paths = result.get("paths") or {}
    cases = [(c["name"], c["title"]) for c in result.get("cases") or []]
    names = [p for p in PATH_ORDER if p in paths]
    rows = [[title, *(_mark(paths[p], case) for p in names)] for case, title in cases]
    rows.append(["result", *(str(paths[p].get("result", "-")).upper() for p in names)])
    lines = [f"kernel {result.get('kernel', '?')}", "", table(["case", *names], rows)]
    for name in names:
        entry = paths[name]
        if entry.get("result") == "failed":
            lines.append(f"{name}: failed: {entry.get('reason')}")
        elif entry.get("result") == "not_run" and entry.get("detail"):
            lines.append(f"{name}: not run: {entry.get('detail')}")
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
@click.option("-j", "--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_context
def check(
    ctx: click.Context,
    local: bool,
    bpf_object: str | None,
    bypass_object: str | None,
    bypass_cgroup: str | None,
    as_json: bool,
) -> None:
    """Check every echo path on this kernel; exit 1 when one fails.

    Each path (user, user+bypass, kernel, kernel+bypass) echoes a set of cases on a private
    listener, every byte checked. A running daemon runs them with the objects it serves with.
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
            result = _local(bpf_object, bypass_object, bypass_cgroup)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise failed("check", f"cannot run echod --self-check: {exc}", as_json) from None
    if as_json:
        emit_json(result)
    else:
        click.echo(render_check(result))
    if not result.get("passed", False):
        raise click.exceptions.Exit(EXIT_ERROR)
