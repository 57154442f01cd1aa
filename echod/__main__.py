"""`echod`: build a Config from flags, environment and file, then run the daemon."""

from __future__ import annotations

import sys

import click
import uvloop

from echod import __version__, logs
from echod.config import LOG_FORMATS, LOG_LEVELS, MODES, ConfigError, resolve


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML config file (default /etc/echod/echod.toml if present).",
)
@click.option("--mode", type=click.Choice(MODES), help="Echo mode (default auto).")
@click.option("--host", "hosts", multiple=True, help="Listen address; repeat for several.")
@click.option("--port", type=click.IntRange(1, 65535), help="Listen port (default 8888).")
@click.option("--control", help="Control socket path.")
@click.option("--max-connections", type=click.IntRange(1), help="Connection limit.")
@click.option(
    "--kernel-backlog-limit",
    type=click.IntRange(65536),
    help="Reset a kernel-mode connection whose unread echo exceeds this many bytes.",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS))
@click.option("--log-format", type=click.Choice(LOG_FORMATS))
@click.option("--metrics", help="Prometheus address host:port (default off).")
@click.option(
    "--bpf-object",
    type=click.Path(dir_okay=False),
    help="Load this BPF object instead of the packaged one.",
)
@click.version_option(__version__, prog_name="echod")
def cli(config_file: str | None, **flags: object) -> None:
    """Serve TCP echo in the kernel (BPF sockmap) or in user space (uvloop)."""
    try:
        config = resolve(flags, config_file)
    except ConfigError as exc:
        click.echo(f"echod: configuration error: {exc}", err=True)
        sys.exit(2)
    logs.configure(config.log_level, config.log_format)
    from echod.daemon import Daemon

    async def run() -> int:
        return await Daemon(config, flags).run()

    sys.exit(uvloop.run(run()))


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
