"""What a worker process sends its parent over the queue: one typed record per kind of message.

A worker sends `Ready` once its connections are open, `Tick` each second when progress is on,
and then exactly one of `Done` (its figures) or `Failed` (one line saying why). Every record
names the worker by its index (`Done` through its result). They travel pickled through a
multiprocessing queue, so they hold only plain data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from echoctl.bench.progress import Sample

Sparse = dict[str, object]  # a histogram in the form Histogram.to_sparse returns


@dataclass
class Counters:
    """One worker's outcome counts while measuring; the report sums them over workers."""

    requests: int = 0
    mismatches: int = 0
    short_reads: int = 0
    resets: int = 0
    timeouts: int = 0
    other_errors: int = 0
    stalled: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_verified: int = 0
    # --udp: datagrams sent while measuring, and what became of them (udpflow.py)
    datagrams_sent: int = 0
    lost: int = 0
    late: int = 0
    duplicates: int = 0
    reordered: int = 0


@dataclass(frozen=True)
class Result:
    """One worker's figures at the end of the run."""

    index: int  # the worker's
    counters: Counters
    elapsed_ns: int
    hist: Sparse
    raw_hist: Sparse | None  # latency from the actual send; paced runs only
    cpu_user_s: float
    cpu_system_s: float
    warmup_errors: int
    connections_alive: int
    notes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class Ready:
    """The worker's connections are open; `connect` holds their connect times."""

    index: int
    connect: Sparse


@dataclass(frozen=True)
class Tick:
    """Running totals for the progress lines, `sample.tick` whole seconds into measuring."""

    index: int
    sample: Sample


@dataclass(frozen=True)
class Done:
    """The worker finished: its figures. Exactly one Done or Failed ends every worker."""

    result: Result


@dataclass(frozen=True)
class Failed:
    """The worker could not run (connect failed, or an unexpected error); `message` is one line."""

    index: int
    message: str


# What comes out of the queue; the runner tells them apart with isinstance.
Message = Ready | Tick | Done | Failed
