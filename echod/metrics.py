"""Prometheus exposition of a daemon snapshot (metrics_http serves it on the event loop)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from echod.config.schema import EFFECTIVE_MODES
from echod.metrics_udp import udp_families

__all__ = ["SnapshotCollector", "make_registry", "render", "renderer"]

Snapshot = Mapping[str, Any]
SnapshotFn = Callable[[], Snapshot]

# The reasons service.py gives; each has a sample (0 until it happens).
REFUSAL_REASONS = ("max_connections", "allow", "per_ip", "fd_limit")
INSERT_FAILURE_REASONS = ("map_full", "peer_closed_before_accept")
# Per-process figures: (family, help, type, the figure's value); the worker label names the
# process ("supervisor", or a worker's index; "0" in one-process mode).
_Kind = type[CounterMetricFamily] | type[GaugeMetricFamily]
_PROCESS_FAMILIES: tuple[tuple[str, str, _Kind, Callable[[Mapping[str, Any]], float]], ...] = (
    (
        "echod_process_cpu_seconds",
        "CPU time (user + system) of each of the daemon's processes.",
        CounterMetricFamily,
        lambda p: float(p.get("cpu_user_s", 0)) + float(p.get("cpu_system_s", 0)),
    ),
    (
        "echod_process_resident_memory_bytes",
        "Resident memory of each of the daemon's processes.",
        GaugeMetricFamily,
        lambda p: float(p.get("rss_bytes", 0)),
    ),
    (
        "echod_process_open_fds",
        "Open file descriptors of each of the daemon's processes.",
        GaugeMetricFamily,
        lambda p: float(p.get("open_fds", 0)),
    ),
    (
        "echod_process_threads",
        "Threads of each of the daemon's processes.",
        GaugeMetricFamily,
        lambda p: float(p.get("threads", 0)),
    ),
)


class SnapshotCollector(Collector):
    """Turns one snapshot() call per scrape into echod_* metric families."""

    def __init__(self, snapshot: SnapshotFn) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        # An empty description stops the registry calling snapshot() at registration time,
        # before the daemon has anything to report.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        """Take a snapshot and yield every family that has a sample."""
        # A family without samples is only HELP and TYPE lines: leave it out altogether.
        return (family for family in self._families(self._snapshot()) if family.samples)

    @staticmethod
    def _families(snap: Snapshot) -> Iterator[Metric]:
        yield from _build_info(snap)
        yield from _mode(snap)
        yield from _connections(snap.get("connections") or {})
        yield from _traffic(snap.get("user") or {}, snap.get("kernel"), snap.get("bypass"))
        yield from _bypass(snap.get("bypass"), snap.get("bypass_status") or {})
        yield from udp_families(snap.get("udp"), snap.get("udp_status") or {})
        yield from _bpf_programs(snap.get("bpf_programs") or [])
        yield from _workers(snap.get("workers") or {})
        yield from _self_check(snap.get("self_check") or {})
        yield from _processes(snap.get("process") or {}, snap.get("processes") or [])


def _processes(total: Mapping[str, Any], parts: list[Mapping[str, Any]]) -> Iterator[Metric]:
    """The sum over the daemon's processes, and each process with a worker label.

    Sum and parts are separate families, so that sum() over a family never counts twice.
    """
    if total:
        yield CounterMetricFamily(
            "echod_daemon_cpu_seconds",
            "CPU time (user + system) of all the daemon's processes together.",
            value=float(total.get("cpu_user_s", 0)) + float(total.get("cpu_system_s", 0)),
        )
        for name, key, what in (
            ("resident_memory_bytes", "rss_bytes", "Resident memory"),
            ("open_fds", "open_fds", "Open file descriptors"),
            ("threads", "threads", "Threads"),
        ):
            yield GaugeMetricFamily(
                f"echod_daemon_{name}",
                f"{what} of all the daemon's processes together.",
                value=float(total.get(key, 0)),
            )
        yield GaugeMetricFamily(
            "echod_daemon_processes",
            "Processes of the daemon: the supervisor and its workers (1: a single process).",
            value=float(total.get("processes", 1)),
        )
    for name, text, kind, value in _PROCESS_FAMILIES:
        family = kind(name, text, labels=["worker"])
        for part in parts:
            family.add_metric([str(part.get("worker", ""))], value(part))
        yield family


def _self_check(paths: Mapping[str, Any]) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        "echod_self_check_passed",
        "The latest self-check of each echo path: 1 passed, 0 failed (a path not yet checked "
        "has no sample).",
        labels=["path"],
    )
    for path, entry in sorted(paths.items()):
        result = (entry or {}).get("result")
        if result in ("passed", "failed"):
            gauge.add_metric([path], 1.0 if result == "passed" else 0.0)
    yield gauge


def _workers(pool: Mapping[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "echod_workers", "Worker processes (1: a single process).", value=int(pool.get("count", 1))
    )
    yield CounterMetricFamily(
        "echod_worker_restarts",
        "Worker processes that exited and were started again (their connections were lost).",
        value=int(pool.get("restarts", 0)),
    )


def _build_info(snap: Snapshot) -> Iterator[Metric]:
    info = InfoMetricFamily("echod_build", "echod build information.")
    info.add_metric([], {"version": str(snap.get("version", "unknown"))})
    yield info


def _mode(snap: Snapshot) -> Iterator[Metric]:
    gauge = GaugeMetricFamily(
        "echod_mode", "Effective echo mode: 1 for the mode in use.", labels=["mode"]
    )
    for mode in EFFECTIVE_MODES:
        gauge.add_metric([mode], 1.0 if snap.get("mode") == mode else 0.0)
    yield gauge


def _connections(conns: Mapping[str, Any]) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "echod_connections_accepted",
        "TCP connections accepted and served.",
        value=int(conns.get("accepted", 0)),
    )
    refused = CounterMetricFamily(
        "echod_connections_refused",
        "TCP connections closed at accept, by reason.",
        labels=["reason"],
    )
    by_reason = dict.fromkeys(REFUSAL_REASONS, 0) | dict(conns.get("refused") or {})
    for reason, count in sorted(by_reason.items()):
        refused.add_metric([reason], int(count))
    yield refused
    yield GaugeMetricFamily(
        "echod_connections_active", "TCP connections open now.", value=int(conns.get("active", 0))
    )
    yield CounterMetricFamily(
        "echod_connections_closed", "TCP connections closed.", value=int(conns.get("closed", 0))
    )
    yield CounterMetricFamily(
        "echod_connections_aborted_backlog",
        "Kernel-path connections reset because the peer did not read its echo (bytes dropped).",
        value=int(conns.get("aborted_backlog", 0)),
    )
    failed = CounterMetricFamily(
        "echod_connections_insert_failed",
        "Kernel-mode connections that could not enter the sockhash and were echoed in user space.",
        labels=["reason"],
    )
    reasons = dict.fromkeys(INSERT_FAILURE_REASONS, 0) | dict(
        conns.get("insert_failed_reasons") or {}
    )
    for reason, count in sorted(reasons.items()):
        failed.add_metric([reason], int(count))
    yield failed


def _traffic(
    user: Mapping[str, Any], kernel: Mapping[str, Any] | None, bypass: Mapping[str, Any] | None
) -> Iterator[Metric]:
    echoed = CounterMetricFamily("echod_bytes", "Bytes echoed, by path.", labels=["path"])
    messages = CounterMetricFamily(
        "echod_messages",
        "Messages echoed, by path (for the kernel: packets redirected; for the short circuit: "
        "client sends handed to the server socket).",
        labels=["path"],
    )
    if bypass is not None:
        echoed.add_metric(["short_circuit"], int(bypass.get("short_bytes", 0)))
        messages.add_metric(["short_circuit"], int(bypass.get("short_msgs", 0)))
    echoed.add_metric(["user"], int(user.get("bytes", 0)))
    messages.add_metric(["user"], int(user.get("messages", 0)))
    if kernel is not None:
        echoed.add_metric(["kernel"], int(kernel.get("redirected_bytes", 0)))
        messages.add_metric(["kernel"], int(kernel.get("redirected_packets", 0)))
    yield echoed
    yield messages
    if kernel is None:
        # No BPF object is loaded (user mode): no kernel series rather than fake zeros.
        return
    packets = CounterMetricFamily(
        "echod_kernel_packets",
        "Packets seen by the sk_skb verdict: redirected (echoed) or passed to user space.",
        labels=["verdict"],
    )
    octets = CounterMetricFamily(
        "echod_kernel_bytes",
        "Bytes seen by the sk_skb verdict: redirected (echoed) or passed to user space.",
        labels=["verdict"],
    )
    for verdict in ("redirected", "passed"):
        packets.add_metric([verdict], int(kernel.get(f"{verdict}_packets", 0)))
        octets.add_metric([verdict], int(kernel.get(f"{verdict}_bytes", 0)))
    yield packets
    yield octets
    yield CounterMetricFamily(
        "echod_kernel_missed_packets",
        "Packets passed to user space because the redirect missed the sockhash (a socket leaving "
        'it); included in echod_kernel_packets_total{verdict="passed"}.',
        value=int(kernel.get("missed_packets", 0)),
    )
    yield CounterMetricFamily(
        "echod_kernel_missed_bytes",
        'Bytes of the missed packets; included in echod_kernel_bytes_total{verdict="passed"}.',
        value=int(kernel.get("missed_bytes", 0)),
    )
    yield CounterMetricFamily(
        "echod_kernel_empty_packets",
        "Zero-length skbs (a FIN's) seen by the verdict; not counted as requests.",
        value=int(kernel.get("empty_packets", 0)),
    )


def _bypass(counters: Mapping[str, Any] | None, status: Mapping[str, Any]) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "echod_bypass_enabled",
        "1 while the same-host bypass is attached (sock_ops + sk_msg).",
        value=1.0 if status.get("enabled") else 0.0,
    )
    if counters is None:
        return  # not attached: no bypass series rather than fake zeros
    sends = CounterMetricFamily(
        "echod_bypass_redirects",
        "Sends the sk_msg program handed to the other end: to its receive queue (ingress) or "
        "to the server socket's send queue (short_circuit).",
        labels=["path"],
    )
    octets = CounterMetricFamily(
        "echod_bypass_redirected_bytes", "Bytes of those sends.", labels=["path"]
    )
    for path, key in (("ingress", "ingress"), ("short_circuit", "short")):
        sends.add_metric([path], int(counters.get(f"{key}_msgs", 0)))
        octets.add_metric([path], int(counters.get(f"{key}_bytes", 0)))
    yield sends
    yield octets
    yield CounterMetricFamily(
        "echod_bypass_redirect_failures",
        "Sends of a bypassed connection whose peer had left the map (sent through TCP).",
        value=int(counters.get("redirect_failures", 0)),
    )
    conns = CounterMetricFamily(
        "echod_bypass_connections",
        "Connections to echod's listening addresses: bypassed, or left on TCP for good "
        "(another host, another cgroup, or a server end gone before the client could take it).",
        labels=["path"],
    )
    conns.add_metric(["bypassed"], int(counters.get("bypassed_conns", 0)))
    conns.add_metric(["tcp"], int(counters.get("tcp_conns", 0)))
    yield conns
    deferred = CounterMetricFamily(
        "echod_bypass_deferred_connections",
        "Client ends whose first send went through TCP because the bypass could not take it yet; "
        "outcome=late: those that took it later, once their echo had come back.",
        labels=["outcome"],
    )
    deferred.add_metric(["all"], int(counters.get("deferred_conns", 0)))
    deferred.add_metric(["late"], int(counters.get("late_bypassed_conns", 0)))
    yield deferred
    socks = CounterMetricFamily(
        "echod_bypass_sockets",
        "Socket ends the sock_ops program put in the bypass sockhash, by end.",
        labels=["end"],
    )
    socks.add_metric(["server"], int(counters.get("server_sockets", 0)))
    socks.add_metric(["client"], int(counters.get("client_sockets", 0)))
    yield socks
    yield CounterMetricFamily(
        "echod_bypass_insert_failures",
        "Socket ends the sock_ops program could not put in the sockhash (full, or no storage).",
        value=int(counters.get("insert_failures", 0)),
    )


def _bpf_programs(progs: list[Mapping[str, Any]]) -> Iterator[Metric]:
    runs = CounterMetricFamily(
        "echod_bpf_program_run_count",
        "Times each loaded BPF program ran (needs kernel.bpf_stats_enabled=1).",
        labels=["prog", "id"],
    )
    seconds = CounterMetricFamily(
        "echod_bpf_program_run_time_seconds",
        "Time spent in each loaded BPF program (needs kernel.bpf_stats_enabled=1).",
        labels=["prog", "id"],
    )
    for prog in progs:
        labels = [str(prog.get("name", "")), str(prog.get("id", ""))]
        runs.add_metric(labels, int(prog.get("run_cnt", 0)))
        seconds.add_metric(labels, int(prog.get("run_time_ns", 0)) / 1e9)
    yield runs
    yield seconds


def make_registry(snapshot: SnapshotFn, process: bool = True) -> CollectorRegistry:
    """Return a registry holding the snapshot collector (and process_* figures).

    process_* is prometheus_client's ProcessCollector: the process serving /metrics alone (the
    supervisor, with workers). echod_process_*{worker} and echod_daemon_* cover them all.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    if process:
        ProcessCollector(registry=registry)
    return registry


def render(snapshot: SnapshotFn, process: bool = False) -> str:
    """Return the text exposition for one snapshot (tests and `echoctl stats --prometheus`)."""
    return generate_latest(make_registry(snapshot, process)).decode()


def renderer(snapshot: SnapshotFn) -> Callable[[], bytes]:
    """What /metrics serves: the snapshot's families and process_*, rendered anew per call."""
    registry = make_registry(snapshot)
    return lambda: generate_latest(registry)
