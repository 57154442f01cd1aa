"""The load-shape options shared by `echoctl bench` and `echoctl compare`, and their types."""

from __future__ import annotations

from typing import Any

import click

from echoctl.bench.config import PATTERNS, BenchConfig
from echoctl.bench.sizes import SizeRange, parse_bytes


class SizeRangeType(click.ParamType):
    """`SIZE` or `MIN-MAX` in bytes, with optional binary units (`1-1M`)."""

    name = "SIZE|MIN-MAX"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Return a SizeRange, or fail with a usage error."""
        if isinstance(value, SizeRange):
            return value
        try:
            return SizeRange.parse(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class ByteCount(click.ParamType):
    """A byte count with optional binary units (`64k`, `1M`)."""

    name = "BYTES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Return the count as an int, or fail with a usage error."""
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


BENCH_UDP = (
    "Load a UDP echo server (RFC 862) instead: -s byte datagrams on -c flows, each its own "
    "connected socket; --pattern pingpong or flood, or -q RATE. Every echo is checked; "
    "mismatches and duplicates exit 1."
)
COMPARE_UDP = (
    "Compare the UDP paths instead: user and kernel (TCX; the bypass is TCP's), with the load "
    "of bench --udp. The daemon must echo UDP (--udp, udp = true). Every echo is checked; "
    "mismatches, duplicates and loss above --max-loss exit 1."
)


def load_options(f: Any) -> Any:
    """Add the options of compare: the load shape, and --udp's (the UDP paths)."""
    return _load_options(udp_options(f, COMPARE_UDP))


def bench_options(f: Any) -> Any:
    """Add the options of bench: the load shape, and --udp's (a UDP echo server)."""
    return _load_options(udp_options(f, BENCH_UDP))


def _load_options(f: Any) -> Any:
    """Add the load-shape options shared by bench and compare, with what they mean with --udp."""
    options = [
        click.option(
            "--host",
            default="127.0.0.1",
            show_default=True,
            help="Server address (any host; with --control, the daemon's own address).",
        ),
        click.option(
            "--port",
            type=click.IntRange(1, 65535),
            default=8888,
            show_default=True,
            help="Server TCP port (UDP with --udp).",
        ),
        click.option(
            "-c",
            "--connections",
            type=click.IntRange(min=1),
            default=10,
            show_default=True,
            help="Connections, shared among the workers (--udp: flows, a socket each).",
        ),
        click.option(
            "-r",
            "--rounds",
            type=click.IntRange(min=1),
            default=10_000,
            show_default=True,
            help="Messages per connection, or datagrams per flow with --udp (ignored with "
            "--duration).",
        ),
        click.option(
            "-s",
            "--size",
            type=SizeRangeType(),
            default="64",
            show_default=True,
            help="Message size in bytes, or MIN-MAX to draw each message's size from that range "
            "(log-uniform; units k, M: 1-1M).",
        ),
        click.option(
            "--pipeline",
            type=click.IntRange(min=1),
            help="Messages in flight per connection [default: 1 for ping-pong, 512 for stream].",
        ),
        click.option(
            "--window",
            type=ByteCount(),
            help="Bytes in flight per connection [default: unbounded for ping-pong, 1M for "
            "stream]; with --udp, datagrams in flight per flow, for flood and -q [default: 32].",
        ),
        click.option(
            "--stall-timeout",
            type=click.FloatRange(min=0, min_open=True, max=3600),
            default=10.0,
            show_default=True,
            help="Seconds a connection owed bytes may go without any coming back before it "
            "counts as stalled (exit 1).",
        ),
        click.option(
            "--seed",
            type=click.IntRange(min=0),
            help="Seed for message sizes and stream bytes, to repeat a run exactly.",
        ),
        click.option(
            "-q",
            "--qps",
            type=click.FloatRange(min=0),
            default=0.0,
            help="Total req/s (--udp: datagrams/s) on a fixed schedule; 0 = as fast as possible.",
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
            type=click.Choice(PATTERNS),
            default="pingpong",
            show_default=True,
            help="Messages echoed in turn (see --pipeline); a byte stream filling the pipe both "
            "ways (see --window); or crr: connect, one message, close, again. With --udp: "
            "pingpong (one datagram in flight per flow) or flood (--window).",
        ),
        click.option(
            "--timeout",
            "io_timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=5.0,
            show_default=True,
            help="Seconds a connect or one blocking send may take before it counts as an error.",
        ),
        click.option(
            "--control",
            metavar="SOCK",
            envvar="ECHOD_CONTROL",
            help="Daemon control socket, for server figures [env ECHOD_CONTROL].",
        ),
        click.option("-j", "--json", "as_json", is_flag=True, help="Print one JSON object."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def udp_options(f: Any, udp_help: str) -> Any:
    """Add --udp (its help: `udp_help`) and the options that only --udp uses."""
    options = [
        click.option("--udp", is_flag=True, help=udp_help),
        click.option(
            "--udp-timeout",
            type=click.FloatRange(min=0, min_open=True, max=60),
            default=1.0,
            show_default=True,
            help="Seconds a datagram has to come back before it counts as lost (one that comes "
            "back later counts as late too).",
        ),
        click.option(
            "--max-loss",
            type=click.FloatRange(min=0, max=1),
            default=0.001,
            show_default=True,
            help="Fraction of the datagrams sent that may be lost before the run fails (exit 1).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def bench_config(kw: dict[str, Any], progress: bool) -> BenchConfig:
    """Return the BenchConfig for the parsed options `kw`."""
    sizes: SizeRange = kw["size"]
    return BenchConfig(
        host=kw["host"],
        port=kw["port"],
        connections=kw["connections"],
        rounds=kw["rounds"],
        size=sizes.low,
        size_max=0 if sizes.fixed else sizes.high,
        qps=kw["qps"],
        duration=kw["duration"],
        warmup=kw["warmup"],
        workers=kw["workers"],
        pattern=kw["pattern"],
        timeout=kw["io_timeout"],
        progress=progress,
        pipeline=kw["pipeline"] or 0,
        window=kw["window"] or 0,
        stall_timeout=kw["stall_timeout"],
        seed=kw["seed"],
        udp=kw.get("udp", False),
        udp_timeout=kw.get("udp_timeout", 1.0),
        max_loss=kw.get("max_loss", 0.001),
    )
