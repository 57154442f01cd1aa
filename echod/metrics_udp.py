"""The echod_udp_* families of the Prometheus exposition (echod.metrics), from `stats.udp`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["UDP_DROP_REASONS", "udp_families"]

UDP_DROP_REASONS = ("loop", "allow", "rate")  # echod.service.udp.DROP_REASONS


def udp_families(figures: Mapping[str, Any] | None, status: Mapping[str, Any]) -> Iterator[Metric]:
    """echod_udp_*: whether UDP is on, the path in use, each path's counters (`stats.udp`)."""
    yield GaugeMetricFamily(
        "echod_udp_enabled",
        "1 when UDP echo is configured (udp = true).",
        value=1.0 if status.get("enabled") else 0.0,
    )
    if figures is None:
        return  # UDP is off: no UDP series rather than fake zeros
    in_use = GaugeMetricFamily(
        "echod_udp_path", "1 for the path that echoes UDP now.", labels=["path"]
    )
    datagrams = CounterMetricFamily(
        "echod_udp_datagrams", "UDP datagrams echoed, by path.", labels=["path"]
    )
    octets = CounterMetricFamily("echod_udp_bytes", "UDP bytes echoed, by path.", labels=["path"])
    dropped = CounterMetricFamily(
        "echod_udp_dropped",
        "UDP datagrams not answered: from a guard port (loop), outside allow, over the rate.",
        labels=["path", "reason"],
    )
    for path in ("user", "kernel"):
        if status.get("path") is not None:
            in_use.add_metric([path], 1.0 if status.get("path") == path else 0.0)
        counts = figures.get(path)
        if counts is None:
            continue
        datagrams.add_metric([path], int(counts.get("echoed_packets", 0)))
        octets.add_metric([path], int(counts.get("echoed_bytes", 0)))
        for reason in UDP_DROP_REASONS:
            dropped.add_metric([path, reason], int(counts.get(f"dropped_{reason}", 0)))
    yield from (in_use, datagrams, octets, dropped)
    user, kernel = figures.get("user"), figures.get("kernel")
    if user is not None:
        yield CounterMetricFamily(
            "echod_udp_send_errors",
            "UDP echoes the user path dropped because the send failed (send buffer full).",
            value=int(user.get("send_errors", 0)),
        )
    if kernel is not None:
        yield CounterMetricFamily(
            "echod_udp_kernel_passed",
            "UDP datagrams the kernel path passed on to the user path.",
            value=int(kernel.get("passed_packets", 0)),
        )
