"""What a benchmark run is: the target, the load shape and its bounds, checked before it runs."""

from __future__ import annotations

from dataclasses import dataclass

from echoctl.bench.sizes import SizeRange
from echoctl.bench.udpwire import HSIZE as UDP_HEADER
from echoctl.sysstat import cpu_count

TCP_PATTERNS = ("pingpong", "stream", "crr")
PATTERNS = (*TCP_PATTERNS, "flood")  # flood: --udp only
UDP_PATTERNS = ("pingpong", "flood")
MAX_RUN_S = 3600.0  # a run by rounds still stops after this long
PROGRESS_NS = 1_000_000_000  # workers send running totals this often
STREAM_WINDOW = 1 << 20  # default bytes in flight per stream connection
STREAM_WINDOW_MSGS = 512  # and at most this many messages: each small send is its own skb
PACED_PER_WORKER = 25_000  # requests/s one paced worker is given by default
UDP_PACED_PER_WORKER = 200_000  # datagrams/s one paced --udp worker is given (it sends in batches)
UDP_WINDOW = 32  # datagrams in flight per flow: --udp flood and -q
UDP_MAX_WINDOW = 1 << 16
UDP_MAX_IN_FLIGHT = 1 << 22  # flows x window: a flow keeps 2 headers (48 B) per window slot
UDP_MAX_SIZE = 65_507  # the largest UDP payload over IPv4
UDP_MAX_FLOWS = 1 << 16  # a flow id is the worker's index and the flow's, 16 bits each


class BenchError(Exception):
    """The run could not be done (server unreachable, workers failed); the message is one line."""


@dataclass(frozen=True)
class BenchConfig:
    """What to run: the target, the load shape and its bounds."""

    host: str = "127.0.0.1"
    port: int = 8888
    connections: int = 10
    rounds: int = 10_000
    size: int = 64
    size_max: int = 0  # 0: every message is `size` bytes; else drawn from size..size_max
    qps: float = 0.0
    duration: float | None = None
    warmup: float = 0.0
    workers: int = 0  # 0: one per CPU, never more than connections
    pattern: str = "pingpong"
    timeout: float = 5.0
    progress: bool = False
    pipeline: int = 0  # messages in flight per connection; 0: 1 for ping-pong, 512 for stream
    window: int = 0  # bytes in flight per connection; 0: no bound for ping-pong, 1 MiB stream
    stall_timeout: float = 10.0
    seed: int | None = None  # makes message sizes and stream bytes repeatable
    udp: bool = False  # datagrams to a UDP echo server (udp.py), on `connections` flows
    udp_timeout: float = 1.0  # seconds before a datagram not back counts as lost
    max_loss: float = 0.001  # the fraction of datagrams that may be lost before the run fails

    @property
    def sizes(self) -> SizeRange:
        """Return the message sizes as a range (one size when size_max is 0)."""
        return SizeRange(self.size, self.size_max or self.size)

    def uses_flow(self) -> bool:
        """Whether the run needs byte-checked streams rather than plain blocking ping-pong."""
        return (
            self.pattern == "stream" or self.pipeline > 1 or self.window > 0 or not self.sizes.fixed
        )

    def in_flight_messages(self) -> int:
        """Return the bound on messages in flight per connection."""
        if self.pipeline:
            return self.pipeline
        return STREAM_WINDOW_MSGS if self.pattern == "stream" else 1

    def in_flight_bytes(self) -> int:
        """Return the bound on bytes in flight per connection; 0 means none."""
        if self.window:
            return self.window
        return STREAM_WINDOW if self.pattern == "stream" else 0

    def udp_window(self) -> int:
        """Return the datagrams in flight per flow (--udp): 1 for ping-pong, else --window."""
        if self.pattern == "pingpong" and not self.qps:
            return 1
        return self.window or UDP_WINDOW

    def udp_pattern(self) -> str:
        """Return the --udp pattern's name: pingpong, rate (-q) or flood."""
        return "rate" if self.qps else self.pattern

    def validate(self) -> None:
        """Raise ValueError when the configuration makes no sense."""
        if self.udp:
            self._validate_udp()
            return
        if self.pattern == "flood":
            raise ValueError("--pattern flood needs --udp")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}")
        if self.connections < 1 or self.rounds < 1 or self.size < 1:
            raise ValueError("connections, rounds and size must be at least 1")
        if self.qps < 0 or self.warmup < 0 or self.workers < 0 or self.timeout <= 0:
            raise ValueError("qps, warmup and workers must be >= 0 and timeout > 0")
        if self.duration is not None and not 0 < self.duration <= MAX_RUN_S:
            raise ValueError(f"duration must be in (0, {MAX_RUN_S:g}] seconds")
        if self.qps and self.pattern != "pingpong":
            raise ValueError("--qps applies to ping-pong only")
        self.sizes  # noqa: B018 - validates the range
        if self.pattern == "crr" and (self.pipeline > 1 or self.window or not self.sizes.fixed):
            raise ValueError("--pattern crr sends one message per connection: one size, no window")
        if self.qps and self.uses_flow():
            raise ValueError("--qps needs one size, --pipeline 1 and no --window")
        if self.pipeline < 0 or self.window < 0 or not self.stall_timeout > 0:
            raise ValueError("pipeline and window must be >= 0 and stall-timeout > 0")
        if self.warmup and self.duration is None:
            # A run by rounds would spend its rounds in the warm-up and measure nothing.
            raise ValueError("--warmup needs --duration")

    def _validate_udp(self) -> None:
        if self.pattern not in UDP_PATTERNS:
            raise ValueError(f"--udp patterns are {' and '.join(UDP_PATTERNS)} (and -q RATE)")
        if not self.sizes.fixed or not UDP_HEADER <= self.size <= UDP_MAX_SIZE:
            raise ValueError(f"--udp sends one size, from {UDP_HEADER} to {UDP_MAX_SIZE} bytes")
        if not 1 <= self.connections <= UDP_MAX_FLOWS or self.rounds < 1:
            raise ValueError(f"--udp needs 1 to {UDP_MAX_FLOWS} flows and rounds >= 1")
        if self.pipeline:
            raise ValueError("--pipeline is for TCP; with --udp, --window sets datagrams in flight")
        if self.qps < 0 or self.warmup < 0 or self.workers < 0:
            raise ValueError("qps, warmup and workers must be >= 0")
        if self.duration is not None and not 0 < self.duration <= MAX_RUN_S:
            raise ValueError(f"duration must be in (0, {MAX_RUN_S:g}] seconds")
        if self.qps and self.pattern != "pingpong":
            raise ValueError("-q paces ping-pong: with --udp, --pattern flood is not paced")
        if self.window > 1 and self.pattern == "pingpong" and not self.qps:
            raise ValueError(
                "--udp ping-pong keeps one datagram in flight per flow: "
                "use --pattern flood --window N, or -q RATE"
            )
        if not 0 <= self.window <= UDP_MAX_WINDOW:
            raise ValueError(f"--window with --udp is 1 to {UDP_MAX_WINDOW} datagrams")
        if self.connections * self.udp_window() > UDP_MAX_IN_FLIGHT:
            raise ValueError(f"flows x window must be at most {UDP_MAX_IN_FLIGHT:,}")
        if not 0 < self.udp_timeout <= 60:
            raise ValueError("--udp-timeout must be in (0, 60] seconds")
        if not 0 <= self.max_loss <= 1:
            raise ValueError("--max-loss is a fraction from 0 to 1")
        if self.warmup and self.duration is None:
            raise ValueError("--warmup needs --duration")

    def rounds_limit(self) -> int:
        """Return the rounds per connection; a run by duration is bounded by time only."""
        return self.rounds if self.duration is None else 1 << 62

    def worker_count(self) -> int:
        """Return how many worker processes this run uses."""
        wanted = self.workers or cpu_count()
        if self.qps and not self.workers:
            # Paced workers sleep and spin to hit send times; two of them spinning on a small
            # machine delay each other's sends, so use no more workers than the rate needs.
            each = UDP_PACED_PER_WORKER if self.udp else PACED_PER_WORKER
            wanted = min(wanted, -(-int(self.qps) // each))
        return max(1, min(wanted, self.connections))
