"""The shapes of the `status`, `stats` and `check` replies (docs/protocol.md), as TypedDicts.

The daemon builds them in a few layers, each typed here: what any service reports
(`BaseStatus`), what one process serving connections adds (`ProcessStatus`), and what the
daemon answers (`Status`: the workers' lines, the control socket's figures). `stats` has one
shape whoever serves; a pool adds its workers' parts up into the same shape (echod.figures).
Nested objects that only repeat what the kernel or psutil said (BPF programs and maps, the
self-check's entries, process figures) stay plain dicts: their fields are documented in
docs/protocol.md and come from one function each.

No `from __future__ import annotations` here: TypedDict reads NotRequired from evaluated
annotations only (Python 3.11), and tests compare these keys with the wire.
"""

from typing import Any, NotRequired, TypedDict

__all__ = [
    "BaseStatus",
    "BpfFigures",
    "ByPath",
    "CheckCase",
    "CheckReport",
    "ConnectionCounts",
    "ControlFigures",
    "ProcessStatus",
    "Stats",
    "Status",
    "Totals",
    "UdpCheck",
    "UdpCheckCase",
    "UdpCounts",
    "UdpFigures",
    "UdpStatus",
    "UserCounts",
    "WorkerCounts",
    "WorkerEntry",
]


class ByPath(TypedDict):
    """Open connections by the path that echoes them."""

    kernel: int
    user: int


class UdpStatus(TypedDict):
    """`status.udp`: UDP echo, configured or not, and the path that echoes it."""

    enabled: bool
    path: str | None  # "user" or "kernel" while serving
    listen: list[str]
    fallback_reason: str | None  # why kernel mode's UDP is echoed in user space
    kernel: dict[str, Any] | None  # the UDP kernel path's own description, while attached


class BaseStatus(TypedDict):
    """The fields of `status` that do not depend on who serves the connections."""

    state: str
    mode: str | None
    requested_mode: str | None
    fallback_reason: str | None
    port: int
    pid: int
    version: str
    uptime_s: float
    bpf: dict[str, Any]
    bypass: dict[str, Any]
    self_check: dict[str, Any]
    udp: UdpStatus


class ProcessStatus(BaseStatus):
    """One process's status: a worker's to its supervisor, or the single process's own."""

    listen: list[str]
    connections: int
    connections_by_path: ByPath
    stale: NotRequired[bool]  # a worker that did not answer in time: what it said last
    silent_s: NotRequired[float]


class WorkerEntry(TypedDict):
    """One worker's line in `status`."""

    index: int
    pid: int | None
    state: str
    mode: str | None
    connections: NotRequired[int]
    connections_by_path: NotRequired[ByPath]
    stale: NotRequired[bool]
    silent_s: NotRequired[float]


class ControlFigures(TypedDict):
    """The control socket's own figures."""

    clients: int
    watchers: int


class Status(ProcessStatus):
    """The daemon's `status` reply."""

    workers: list[WorkerEntry]
    control: NotRequired[ControlFigures]  # added by the control server


class ConnectionCounts(TypedDict):
    """`stats.connections`: counts since start (active: open now)."""

    accepted: int
    refused: dict[str, int]
    active: int
    closed: int
    insert_failed: int
    insert_failed_reasons: dict[str, int]
    aborted_backlog: int
    bypass_user: int


class UserCounts(TypedDict):
    """`stats.user`: what user space echoed."""

    bytes: int
    messages: int


class UdpCounts(TypedDict):
    """`stats.udp.user`: what the user path did with the datagrams it read."""

    echoed_packets: int
    echoed_bytes: int
    dropped_loop: int
    dropped_allow: int
    dropped_rate: int
    send_errors: int


class UdpFigures(TypedDict):
    """`stats.udp` (nil while UDP is off): counters by path; a path not in use is nil."""

    user: UdpCounts | None
    kernel: dict[str, int] | None


class WorkerCounts(TypedDict):
    """`stats.workers`: how many, how often one was started again, who did not answer."""

    count: int
    restarts: int
    unresponsive: NotRequired[list[int]]


class Totals(TypedDict):
    """The connection and user-path counts of `stats`: what each process counts itself."""

    connections: ConnectionCounts
    user: UserCounts
    udp: UdpFigures | None


class BpfFigures(TypedDict):
    """The parts of `stats` that the owner of the BPF objects reports."""

    kernel: dict[str, int] | None
    bypass: dict[str, int] | None
    bpf_programs: list[dict[str, Any]]


class Stats(Totals, BpfFigures):
    """The daemon's `stats` reply (and each worker's, in the same shape)."""

    kernel_sockets: int
    rates: dict[str, float]
    process: dict[str, Any]
    processes: list[dict[str, Any]]
    workers: WorkerCounts


class CheckCase(TypedDict):
    """One case of the TCP paths' self-check, as `check` lists them."""

    name: str
    title: str


class UdpCheckCase(TypedDict):
    """One case of the UDP kernel path's check: a datagram of `bytes` to `address`."""

    address: str
    bytes: int
    result: str  # "passed" | "failed" | "not_run"


class UdpCheck(TypedDict):
    """`check.udp`: the UDP kernel path's check, on a private copy of its program on lo."""

    result: str  # "passed" | "failed" | "not_run"
    reason: str | None  # what failed, or why it did not run; nil when passed
    cases: list[UdpCheckCase]
    ms: float
    checked_at: float | None  # Unix time; nil when never checked


class CheckReport(TypedDict):
    """The `check` reply, and what `echod --self-check` prints."""

    kernel: str  # uname -r
    cases: list[CheckCase]
    paths: dict[str, dict[str, Any]]  # path -> its entry, as in status.self_check
    udp: UdpCheck
    passed: bool  # no path, and not UDP's kernel path, failed
