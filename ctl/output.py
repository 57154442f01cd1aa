"""How every echoctl command ends: its exit status, its `--json` object and its error line.

Exit statuses follow the LSB init-script conventions (docs/protocol.md, "Exit codes"); a run
ended by a signal exits 128 + the signal (echoctl.interrupt). A command that fails with
`--json` still prints one JSON object, `{"error": {"code": ..., "message": ...}}`, and says
the same on stderr for a person.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import click

from echoctl.client import ControlError, DaemonUnreachable

EXIT_OK = 0
EXIT_ERROR = 1  # also: a bench or compare run that finished but saw errors or mismatches
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4


def emit_json(obj: Any) -> None:
    """Print `obj` as one JSON object on one line, keys sorted."""
    click.echo(json.dumps(obj, default=str, sort_keys=True))


def error_object(code: str, message: str) -> dict[str, Any]:
    """Return the `--json` failure object every command prints."""
    return {"error": {"code": code, "message": message}}


def failed(
    command: str, message: str, as_json: bool, code: str = "failed", status: int = EXIT_ERROR
) -> click.exceptions.Exit:
    """Report a failed command; return the exit to raise."""
    if as_json:
        emit_json(error_object(code, message))
    click.echo(f"echoctl: {command}: {message}", err=True)
    return click.exceptions.Exit(status)


def usage(message: str, as_json: bool) -> click.UsageError:
    """Return a usage error to raise (exit 2), printing its JSON object first under `--json`."""
    if as_json:
        emit_json(error_object("usage", message))
    return click.UsageError(message)


def control_exit_code(err: ControlError, command: str) -> int:
    """Map an error from the daemon, or from reaching it, to the exit status of `command`."""
    if err.code == "permission_denied":
        return EXIT_PERMISSION
    if err.code in ("invalid_params", "usage"):
        return EXIT_USAGE
    if command == "status" and err.code in ("unreachable", "disconnected"):
        return EXIT_NOT_RUNNING
    return EXIT_ERROR


def control_failed(err: ControlError, command: str, as_json: bool) -> NoReturn:
    """Report an error from the daemon and exit with its status."""
    if as_json:
        emit_json(error_object(err.code, err.message))
    elif isinstance(err, DaemonUnreachable):
        hint = " (is echod running?)" if err.code == "unreachable" else ""
        click.echo(f"echoctl: {err.message}{hint}", err=True)
    else:
        click.echo(f"echoctl: {command}: {err.message} [{err.code}]", err=True)
    raise click.exceptions.Exit(control_exit_code(err, command))
