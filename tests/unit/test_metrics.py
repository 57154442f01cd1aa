"""echod.metrics: names, labels and values of the exposition; docs and HELP texts agree."""

from __future__ import annotations

import asyncio
import errno
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from echod import metrics
from echod.config.schema import Config
from echod.control import metrics_http
from echod.service import admission

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
# The per-process figures `stats` carries (the stats side's contract), for one process.
FIGURES = {
    "cpu_percent": 12.5,
    "cpu_user_s": 1.5,
    "cpu_system_s": 0.25,
    "rss_bytes": 40_000_000,
    "ctx_voluntary": 10,
    "ctx_involuntary": 2,
    "page_faults_minor": 100,
    "page_faults_major": 1,
    "open_fds": 30,
    "threads": 3,
}


def _snapshot(**changes: Any) -> dict[str, Any]:
    snap: dict[str, Any] = {
        "mode": "kernel",
        "version": "0.1.0",
        "connections": {
            "accepted": 12,
            "refused": {"max_connections": 1, "allow": 2, "per_ip": 3, "fd_limit": 5},
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
        "udp": {
            "user": {
                "echoed_packets": 11,
                "echoed_bytes": 1100,
                "dropped_loop": 1,
                "dropped_allow": 2,
                "dropped_rate": 3,
                "send_errors": 4,
            },
            "kernel": {
                "echoed_packets": 21,
                "echoed_bytes": 2100,
                "passed_packets": 5,
                "dropped_loop": 6,
                "dropped_allow": 0,
                "dropped_rate": 7,
            },
        },
        "udp_status": {"enabled": True, "path": "kernel"},
        "self_check": {"kernel": {"result": "passed"}, "user": {"result": "failed"}},
        "process": {
            **{k: v * 3 for k, v in FIGURES.items()},
            "cpu_user_s": 4.0,
            "cpu_system_s": 0.5,
            "processes": 3,
        },
        "processes": [
            {"worker": "supervisor", **FIGURES},
            {"worker": "0", **FIGURES, "cpu_user_s": 2.0, "rss_bytes": 41_000_000},
            {"worker": "1", **FIGURES, "cpu_user_s": 0.5, "open_fds": 31},
        ],
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
        "echod_udp_enabled": "gauge",
        "echod_udp_path": "gauge",
        "echod_udp_datagrams": "counter",
        "echod_udp_bytes": "counter",
        "echod_udp_dropped": "counter",
        "echod_udp_send_errors": "counter",
        "echod_udp_kernel_passed": "counter",
        "echod_bpf_program_run_count": "counter",
        "echod_bpf_program_run_time_seconds": "counter",
        "echod_workers": "gauge",
        "echod_worker_restarts": "counter",
        "echod_self_check_passed": "gauge",
        "echod_daemon_cpu_seconds": "counter",
        "echod_daemon_resident_memory_bytes": "gauge",
        "echod_daemon_open_fds": "gauge",
        "echod_daemon_threads": "gauge",
        "echod_daemon_processes": "gauge",
        "echod_process_cpu_seconds": "counter",
        "echod_process_resident_memory_bytes": "gauge",
        "echod_process_open_fds": "gauge",
        "echod_process_threads": "gauge",
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
    assert s[("echod_connections_refused_total", (("reason", "fd_limit"),))] == 5
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
    assert s[("echod_connections_insert_failed_total", (("reason", "map_full"),))] == 0
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


def test_process_sum_and_each_process() -> None:
    s = _samples(metrics.render(_snapshot))
    assert s[("echod_daemon_cpu_seconds_total", ())] == pytest.approx(4.5)
    assert s[("echod_daemon_resident_memory_bytes", ())] == 120_000_000
    assert s[("echod_daemon_open_fds", ())] == 90
    assert s[("echod_daemon_threads", ())] == 9
    assert s[("echod_daemon_processes", ())] == 3
    cpu = {k[1]: v for k, v in s.items() if k[0] == "echod_process_cpu_seconds_total"}
    assert cpu == {
        (("worker", "supervisor"),): pytest.approx(1.75),
        (("worker", "0"),): pytest.approx(2.25),
        (("worker", "1"),): pytest.approx(0.75),
    }
    assert s[("echod_process_resident_memory_bytes", (("worker", "0"),))] == 41_000_000
    assert s[("echod_process_open_fds", (("worker", "1"),))] == 31
    assert s[("echod_process_threads", (("worker", "supervisor"),))] == 3
    # Nothing of ours shares a family with prometheus_client's process collector.
    assert not any(name.startswith("process_") for name, _ in s)


def test_one_process_has_one_worker_series() -> None:
    snap = _snapshot(
        process={**FIGURES, "processes": 1}, processes=[{"worker": "0", **FIGURES}], workers=None
    )
    s = _samples(metrics.render(lambda: snap))
    assert s[("echod_daemon_processes", ())] == 1
    assert s[("echod_daemon_resident_memory_bytes", ())] == 40_000_000
    workers = {k[1] for k in s if k[0] == "echod_process_threads"}
    assert workers == {(("worker", "0"),)}


def _helped(text: str) -> set[str]:
    return set(re.findall(r"^# HELP (\S+) ", text, re.M))


def _sampled(text: str) -> set[str]:
    return set(re.findall(r"^(\w+)[{ ]", text, re.M))


def test_every_family_with_help_has_a_sample() -> None:
    """A HELP and TYPE without a sample (a family never filled) is left out, or filled."""
    for snap in (
        _snapshot(),
        _snapshot(connections={"insert_failed_reasons": {}}),
        _snapshot(self_check={}, processes=[]),
        {"mode": None, "version": "0.1.0"},
    ):
        text = metrics.render(lambda snap=snap: snap)
        assert _helped(text) <= _sampled(text)
    typical = metrics.render(_snapshot)
    assert "echod_connections_insert_failed_total" in _sampled(typical)


def test_insert_failures_have_a_zero_sample_per_known_reason() -> None:
    s = _samples(metrics.render(lambda: _snapshot(connections={"insert_failed_reasons": {}})))
    for reason in metrics.INSERT_FAILURE_REASONS:
        assert s[("echod_connections_insert_failed_total", (("reason", reason),))] == 0


def test_reasons_are_the_services() -> None:
    assert set(admission.REFUSAL_REASONS) == set(metrics.REFUSAL_REASONS)
    rules = admission.Admission(Config())
    assert set(rules.figures()) == set(metrics.REFUSAL_REASONS)
    named = {
        admission.insert_failure(OSError(code, "x"))
        for code in (errno.EOPNOTSUPP, errno.ENOSPC, errno.E2BIG, errno.ENOMEM)
    }
    assert named == set(metrics.INSERT_FAILURE_REASONS)


def test_metric_names_in_help_texts_exist() -> None:
    text = metrics.render(_snapshot)
    helps = "\n".join(re.findall(r"^# HELP \S+ (.*)$", text, re.M))
    cited = set(re.findall(r"\b(echod_\w+)", helps))
    assert cited
    assert cited <= _sampled(text)


def test_operations_doc_names_every_metric_and_only_those() -> None:
    doc = OPERATIONS.read_text()
    text = metrics.render(_snapshot, process=True)
    exposed = _sampled(text)
    cited = set(re.findall(r"\b((?:echod|process)_\w+)(?![\w*])", doc))
    assert cited - exposed == set(), "docs/operations.md names metrics that are not exposed"
    rows = set(re.findall(r"^\| `((?:echod|process)_\w+)", doc, re.M))
    ours = {name for name in _helped(text) if name.startswith("echod_")}
    assert ours - rows == set(), "metrics without a row in docs/operations.md"
    for reason in (*metrics.REFUSAL_REASONS, *metrics.INSERT_FAILURE_REASONS):
        assert f"`{reason}`" in doc


# -- the /metrics HTTP endpoint (metrics_http), on a loop of the test's own


@pytest.mark.parametrize(
    ("head", "status", "with_body"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*", 200, True),
        (b"GET / HTTP/1.0", 200, True),
        (b"GET /metrics?x=1 HTTP/1.1", 200, True),
        (b"HEAD /metrics HTTP/1.1\nHost: x", 200, False),
        (b"GET /nope HTTP/1.1", 404, True),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0", 405, True),
        (b"DELETE /metrics HTTP/1.1", 405, True),
        (b"GET /metrics HTTP/2.0", 505, True),
        (b"GET /metrics", 400, True),
        (b"\x16\x03\x01\x02\x00 garbage", 400, True),
        (b"GET /metrics HTTP/1.1\r\nno colon here", 400, True),
        (b"GET /metrics HTTP/1.1\r\n folded: line", 400, True),
        (b"GET  /metrics HTTP/1.1", 400, True),
    ],
)
def test_request_routing(head: bytes, status: int, with_body: bool) -> None:
    got_status, body, send_body = metrics_http.respond(head, lambda: b"FIGURES")
    assert (got_status, send_body) == (status, with_body)
    assert (body == b"FIGURES") == (status == 200)


def test_response_is_one_per_connection() -> None:
    raw = metrics_http.response(200, b"abc", send_body=False)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert body == b""
    assert b"Content-Length: 3\r\n" in head  # HEAD says what GET would send
    assert b"Connection: close" in head
    assert b"Content-Type: text/plain; version=" in head
    assert b"Allow: GET, HEAD" in metrics_http.response(405, b"x")


async def _exchange(port: int, request: bytes) -> bytes:
    """One request, and all the server sends until it closes (within 2 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    try:
        async with asyncio.timeout(2):
            return await reader.read()
    finally:
        writer.close()


def test_serves_on_the_loop_and_closes() -> None:
    threads: list[str] = []

    def snapshot() -> dict[str, Any]:
        threads.append(threading.current_thread().name)
        return _snapshot()

    async def main() -> tuple[bytes, bytes, int]:
        server = await metrics_http.start_metrics_server("127.0.0.1:0", metrics.renderer(snapshot))
        try:
            assert server.url == f"http://127.0.0.1:{server.port}/metrics"
            get = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await _exchange(server.port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
            await asyncio.sleep(0.05)
            return get, head, server.clients
        finally:
            await server.close()
            await server.close()  # idempotent

    get, head, clients = asyncio.run(main())
    status, _, rest = get.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK"
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in headers
    s = _samples(body.decode())
    assert s[("echod_connections_active", ())] == 4
    assert ("process_cpu_seconds_total", ()) in s
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert head.endswith(b"\r\n\r\n")
    assert clients == 0  # each connection closed after its one response
    assert threads
    assert set(threads) == {threading.main_thread().name}


def test_header_deadline_size_cap_and_client_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "HEADER_TIMEOUT", 0.3)

    async def main() -> None:
        server = await metrics_http.start_metrics_server("127.0.0.1:0", lambda: b"ok\n")
        try:
            # Over-long header: 431 at once, without waiting for the deadline.
            big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000
            assert (await _exchange(server.port, big)).startswith(b"HTTP/1.1 431 ")
            # Partial headers beyond the cap: the oldest are dropped, at most the cap stays.
            partial = []
            for _ in range(metrics_http.MAX_CLIENTS + 4):
                _, writer = conn = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(b"GET /metrics HTTP/1.1\r\n")
                partial.append(conn)
            await asyncio.sleep(0.05)
            assert server.clients == metrics_http.MAX_CLIENTS
            # A scraper still gets through, and the partial ones all end by the deadline.
            ok = await _exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert ok.endswith(b"\r\n\r\nok\n")
            for reader, writer in partial:
                assert await asyncio.wait_for(reader.read(), 2.0) == b""
                writer.close()
            assert server.clients == 0
        finally:
            await server.close()

    asyncio.run(main())


def test_bare_port_means_loopback_and_bad_address_is_refused() -> None:
    async def main() -> None:
        server = await metrics_http.start_metrics_server("0", lambda: b"")
        assert (server.host, server.port > 0) == ("127.0.0.1", True)
        await server.close()
        with pytest.raises(ValueError, match="not an IP address"):
            await metrics_http.start_metrics_server("localhost:9108", lambda: b"")

    asyncio.run(main())
