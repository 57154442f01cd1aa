"""echod.metrics: names, labels and values of the exposition, and the HTTP server thread."""

from __future__ import annotations

import threading
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echod import metrics


def _snapshot(**changes: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "mode": "kernel",
        "version": "0.1.0",
        "connections": {
            "accepted": 12,
            "refused": {"max_connections": 1, "allow": 2, "per_ip": 3},
            "active": 4,
            "closed": 8,
            "aborted_backlog": 6,
            "insert_failed": 3,
            "insert_failed_reasons": {"peer_closed_before_accept": 3},
        },
        "user": {"bytes": 100, "messages": 5},
        "kernel": {
            "redirected_packets": 70,
            "redirected_bytes": 7000,
            "passed_packets": 2,
            "passed_bytes": 64,
            "missed_packets": 1,
            "missed_bytes": 10,
            "empty_packets": 9,
        },
        "bpf_programs": [
            {"id": 41, "name": "echo_verdict", "run_cnt": 72, "run_time_ns": 1_500_000_000},
            {"id": 42, "name": "echo_sockops", "run_cnt": 12, "run_time_ns": 2_000},
        ],
        "workers": {"count": 2, "restarts": 1},
        "bypass": {
            "server_sockets": 5,
            "client_sockets": 6,
            "insert_failures": 1,
            "bypassed_conns": 4,
            "tcp_conns": 2,
            "ingress_msgs": 0,
            "ingress_bytes": 0,
            "short_msgs": 30,
            "short_bytes": 1920,
            "tcp_msgs": 3,
            "tcp_bytes": 300,
            "redirect_failures": 7,
        },
        "bypass_status": {"enabled": True},
    }
    snap.update(changes)
    return snap


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _types(text: str) -> dict[str, str]:
    return {family.name: family.type for family in text_string_to_metric_families(text)}


def test_families_and_types() -> None:
    types = _types(metrics.render(_snapshot))
    assert types == {
        # Info families are plain gauges in the Prometheus text format.
        "echod_build_info": "gauge",
        "echod_mode": "gauge",
        "echod_connections_accepted": "counter",
        "echod_connections_refused": "counter",
        "echod_connections_active": "gauge",
        "echod_connections_closed": "counter",
        "echod_connections_aborted_backlog": "counter",
        "echod_connections_insert_failed": "counter",
        "echod_bytes": "counter",
        "echod_messages": "counter",
        "echod_kernel_packets": "counter",
        "echod_kernel_bytes": "counter",
        "echod_kernel_missed_packets": "counter",
        "echod_kernel_missed_bytes": "counter",
        "echod_kernel_empty_packets": "counter",
        "echod_bypass_enabled": "gauge",
        "echod_bypass_redirects": "counter",
        "echod_bypass_redirected_bytes": "counter",
        "echod_bypass_redirect_failures": "counter",
        "echod_bypass_connections": "counter",
        "echod_bypass_deferred_connections": "counter",
        "echod_bypass_sockets": "counter",
        "echod_bypass_insert_failures": "counter",
        "echod_bpf_program_run_count": "counter",
        "echod_bpf_program_run_time_seconds": "counter",
        "echod_workers": "gauge",
        "echod_worker_restarts": "counter",
        "echod_self_check_passed": "gauge",
    }
    assert all(name.startswith("echod_") for name in types)


def test_values() -> None:
    s = _samples(metrics.render(_snapshot))
    assert s[("echod_build_info", (("version", "0.1.0"),))] == 1
    assert s[("echod_mode", (("mode", "kernel"),))] == 1
    assert s[("echod_mode", (("mode", "user"),))] == 0
    assert s[("echod_connections_accepted_total", ())] == 12
    assert s[("echod_connections_refused_total", (("reason", "max_connections"),))] == 1
    assert s[("echod_connections_refused_total", (("reason", "allow"),))] == 2
    assert s[("echod_connections_refused_total", (("reason", "per_ip"),))] == 3
    assert s[("echod_connections_active", ())] == 4
    assert s[("echod_connections_closed_total", ())] == 8
    assert s[("echod_bytes_total", (("path", "user"),))] == 100
    assert s[("echod_bytes_total", (("path", "kernel"),))] == 7000
    assert s[("echod_messages_total", (("path", "user"),))] == 5
    assert s[("echod_messages_total", (("path", "kernel"),))] == 70
    assert s[("echod_kernel_packets_total", (("verdict", "redirected"),))] == 70
    assert s[("echod_kernel_packets_total", (("verdict", "passed"),))] == 2
    assert s[("echod_kernel_bytes_total", (("verdict", "redirected"),))] == 7000
    assert s[("echod_kernel_bytes_total", (("verdict", "passed"),))] == 64
    assert s[("echod_kernel_missed_packets_total", ())] == 1
    assert s[("echod_kernel_missed_bytes_total", ())] == 10
    assert s[("echod_kernel_empty_packets_total", ())] == 9
    assert s[("echod_workers", ())] == 2
    assert s[("echod_worker_restarts_total", ())] == 1
    assert s[("echod_connections_aborted_backlog_total", ())] == 6
    failed = (("reason", "peer_closed_before_accept"),)
    assert s[("echod_connections_insert_failed_total", failed)] == 3
    verdict = (("id", "41"), ("prog", "echo_verdict"))
    assert s[("echod_bpf_program_run_count_total", verdict)] == 72
    assert s[("echod_bpf_program_run_time_seconds_total", verdict)] == pytest.approx(1.5)
    sockops = (("id", "42"), ("prog", "echo_sockops"))
    assert s[("echod_bpf_program_run_time_seconds_total", sockops)] == pytest.approx(2e-6)
    assert s[("echod_bypass_enabled", ())] == 1
    assert s[("echod_bytes_total", (("path", "short_circuit"),))] == 1920
    assert s[("echod_bypass_redirects_total", (("path", "short_circuit"),))] == 30
    assert s[("echod_bypass_redirects_total", (("path", "ingress"),))] == 0
    assert s[("echod_bypass_redirect_failures_total", ())] == 7
    assert s[("echod_bypass_connections_total", (("path", "bypassed"),))] == 4
    assert s[("echod_bypass_connections_total", (("path", "tcp"),))] == 2
    assert s[("echod_bypass_sockets_total", (("end", "client"),))] == 6
    assert s[("echod_bypass_insert_failures_total", ())] == 1


def test_bypass_off_has_only_its_gauge() -> None:
    s = _samples(metrics.render(lambda: _snapshot(bypass=None, bypass_status={})))
    assert s[("echod_bypass_enabled", ())] == 0
    assert not any(name.startswith("echod_bypass_") and "enabled" not in name for name, _ in s)
    assert ("echod_bytes_total", (("path", "short_circuit"),)) not in s


def test_user_mode_has_no_kernel_series() -> None:
    snap = _snapshot(mode="user", kernel=None, bpf_programs=[])
    s = _samples(metrics.render(lambda: snap))
    assert s[("echod_mode", (("mode", "user"),))] == 1
    assert s[("echod_mode", (("mode", "kernel"),))] == 0
    assert ("echod_bytes_total", (("path", "kernel"),)) not in s
    assert not any(name.startswith("echod_kernel_") for name, _ in s)
    assert not any(name.startswith("echod_bpf_") for name, _ in s)


def test_not_started_and_missing_sections() -> None:
    s = _samples(metrics.render(lambda: {"mode": None, "version": "0.1.0"}))
    assert s[("echod_mode", (("mode", "kernel"),))] == 0
    assert s[("echod_mode", (("mode", "user"),))] == 0
    assert s[("echod_connections_accepted_total", ())] == 0
    assert s[("echod_connections_refused_total", (("reason", "allow"),))] == 0


def test_every_scrape_takes_a_fresh_snapshot() -> None:
    calls = 0

    def snapshot() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return _snapshot(connections={"accepted": calls, "active": 0})

    registry = metrics.make_registry(snapshot, process=False)
    assert calls == 0  # registering must not call into the daemon
    assert registry.get_sample_value("echod_connections_accepted_total") == 1
    assert registry.get_sample_value("echod_connections_accepted_total") == 2


def test_http_server_serves_from_its_own_thread() -> None:
    threads: list[str] = []

    def snapshot() -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return _snapshot()

    server = metrics.start_metrics_server("127.0.0.1:0", snapshot)
    try:
        assert server.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(server.url, timeout=5) as response:
            assert response.status == 200
            body = response.read().decode()
    finally:
        server.close()
        server.close()  # idempotent
    s = _samples(body)
    assert s[("echod_connections_active", ())] == 4
    assert ("process_cpu_seconds_total", ()) in s
    assert threads
    assert threading.main_thread().name not in threads


def test_bare_port_means_loopback() -> None:
    server = metrics.start_metrics_server("0", _snapshot)
    try:
        assert server.host == "127.0.0.1"
        assert server.port > 0
    finally:
        server.close()


def test_bad_address_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        metrics.start_metrics_server("localhost:9108", _snapshot)
