"""/metrics of a real daemon: every process counted, every family with a sample."""

from __future__ import annotations

import re
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import Echod, Factory, free_port
from tests.integration.echo_util import wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
    return text


def samples(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def workers_ready(d: Echod, n: int) -> bool:
    workers = d.status().get("workers") or []
    return len(workers) == n and all(w["state"] == "serving" for w in workers)


def test_process_figures_cover_every_process(echod_factory: Factory) -> None:
    """With 2 workers, echod_daemon_* adds up 3 processes; process_* is the supervisor's."""
    port = free_port()
    d = echod_factory(mode="user", args=["--workers", "2", "--metrics", f"127.0.0.1:{port}"])
    wait_for(lambda: workers_ready(d, 2), what="2 serving workers")
    wait_for(
        lambda: samples(scrape_text(port)).get(("echod_daemon_processes", ())) == 3,
        what="a snapshot with 3 processes",
    )
    s = samples(scrape_text(port))
    supervisor_rss = s[("process_resident_memory_bytes", ())]
    total_rss = s[("echod_daemon_resident_memory_bytes", ())]
    # Each worker is a Python process of its own: the sum is well above the supervisor alone.
    assert total_rss > 2 * supervisor_rss
    assert s[("echod_daemon_open_fds", ())] > s[("process_open_fds", ())]
    assert s[("echod_daemon_cpu_seconds_total", ())] >= s[("process_cpu_seconds_total", ())]
    stats = d.stats()["process"]
    assert stats["processes"] == 3
    # The same figures as `stats` (RSS moves a little between the snapshot and the call).
    assert total_rss == pytest.approx(stats["rss_bytes"], rel=0.2)


def test_each_process_has_its_worker_series(echod_factory: Factory) -> None:
    port = free_port()
    d = echod_factory(mode="user", args=["--workers", "2", "--metrics", f"127.0.0.1:{port}"])
    wait_for(lambda: workers_ready(d, 2), what="2 serving workers")
    wait_for(
        lambda: (
            len(
                [
                    k
                    for k in samples(scrape_text(port))
                    if k[0] == "echod_process_resident_memory_bytes"
                ]
            )
            == 3
        ),
        what="3 per-process series",
    )
    s = samples(scrape_text(port))
    rss = {k[1]: v for k, v in s.items() if k[0] == "echod_process_resident_memory_bytes"}
    assert set(rss) == {(("worker", w),) for w in ("supervisor", "0", "1")}
    assert sum(rss.values()) == s[("echod_daemon_resident_memory_bytes", ())]
    fds = [v for k, v in s.items() if k[0] == "echod_process_open_fds"]
    assert sum(fds) == s[("echod_daemon_open_fds", ())]


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_every_family_has_a_sample(echod_factory: Factory, mode: str) -> None:
    port = free_port()
    d = echod_factory(mode=mode, args=["--metrics", f"127.0.0.1:{port}"])
    assert d.status()["mode"] == mode
    text = scrape_text(port)
    helped = set(re.findall(r"^# HELP (\S+) ", text, re.M))
    sampled = set(re.findall(r"^(\w+)[{ ]", text, re.M))
    assert helped - sampled == set()
    s = samples(text)
    assert s[("echod_connections_refused_total", (("reason", "fd_limit"),))] == 0
    failed = ("echod_connections_insert_failed_total", (("reason", "peer_closed_before_accept"),))
    assert s[failed] == 0
    assert s[("echod_daemon_processes", ())] == 1
