"""`echod`: build a Config from flags, environment and file, then run the daemon."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click
import uvloop

from echod import __version__, logs
from echod.config.schema import SCHEMA, Config, ConfigError
from echod.config.sources import resolve

# Exit status for a configuration error; the systemd unit does not restart on it.
EXIT_CONFIG = 2


def _setting_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """One option per setting that has a flag, in schema order.

    Values stay text here: click checks nothing, so that flags go through the same validators
    (and the same one-line messages) as the file and the environment.
    """
    for setting in reversed(SCHEMA):
        if setting.flag is None:
            continue
        if setting.type == "bool":  # --bypass / --no-bypass; None when neither is given
            negative = "--no-" + setting.flag.removeprefix("--")
            command = click.option(
                f"{setting.flag}/{negative}", setting.key, default=None, help=setting.help
            )(command)
            continue
        many = setting.type.startswith("list")
        command = click.option(
            setting.flag,
            setting.key,
            multiple=many,
            default=None,
            help=setting.help,
            metavar=setting.metavar,
        )(command)
    return command


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    help="TOML config file (default /etc/echod/echod.toml if present).",
)
@click.option(
    "--self-check",
    "self_check",
    is_flag=True,
    help="Check every echo path, and UDP's kernel path, on this kernel, print the result as "
    "JSON, and exit (1 when one fails).",
)
@_setting_options
@click.version_option(__version__, prog_name="echod")
def cli(config_file: str | None, self_check: bool, **flags: Any) -> None:
    """Serve TCP echo in the kernel (BPF sockmap) or in user space (uvloop)."""
    try:
        config = resolve(flags, config_file)
    except ConfigError as exc:
        logs.write_line(f"echod: configuration error: {exc}")
        sys.exit(EXIT_CONFIG)
    logs.configure(config.log_level, config.log_format)
    if self_check:
        sys.exit(uvloop.run(_self_check(config)))
    from echod.daemon import Daemon

    async def run() -> int:
        return await Daemon(config, flags).run()

    sys.exit(uvloop.run(run()))


async def _self_check(config: Config) -> int:
    """`echod --self-check`: the four paths on a private listener and UDP's kernel path on a
    private copy (whether or not `udp` is set: it is the kernel that is checked), then the
    report on stdout."""
    import json

    from echod.service.paths import check_report
    from echod.service.selfcheck import SelfCheck

    checker = SelfCheck()
    outcomes = await checker.every_path(config, None, None)
    result = check_report(outcomes, await checker.udp(config))
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return 0 if result["passed"] else 1


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
