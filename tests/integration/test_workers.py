"""`--workers N`: a supervisor and N worker processes behind one control socket."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import Echod, assert_unloaded, loaded_bpf_ids, spawn
from tests.integration.echo_util import connect, roundtrip, wait_for
from tests.integration.traffic import (
    DURATION,
    PingPong,
    Streamer,
    assert_never_reader_bounded,
    finish,
)

WORKERS = ["--workers", "2"]


def worker_pids(d: Echod) -> list[int]:
    """The workers' pids, as status lists them."""
    return [w["pid"] for w in d.status()["workers"]]


def all_serving(d: Echod, n: int = 2) -> bool:
    """Whether status lists n workers, every one serving."""
    workers = d.status()["workers"]
    return len(workers) == n and all(w["state"] == "serving" for w in workers)


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_status_lists_the_workers_and_adds_their_connections(
    echod_factory: Callable[..., Echod], mode: str
) -> None:
    d = echod_factory(mode=mode, args=WORKERS)
    st = d.status()
    assert st["mode"] == mode
    assert [w["index"] for w in st["workers"]] == [0, 1]
    children = {p.pid for p in psutil.Process(d.proc.pid).children()}
    assert set(worker_pids(d)) == children
    assert len(children) == 2
    assert all(w["state"] == "serving" and w["mode"] == mode for w in st["workers"])
    # The start's self-check echoed through the same BPF object: count from here.
    redirected = (d.stats()["kernel"] or {}).get("redirected_bytes", 0)
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect("127.0.0.1", d.port)) for _ in range(12)]
        for sock in socks:
            roundtrip(sock, os.urandom(100))
        st = d.status()
        assert st["connections"] == 12
        assert sum(w["connections"] for w in st["workers"]) == 12
        assert st["connections_by_path"][mode] == 12
        stats = d.stats()
        assert stats["connections"]["active"] == 12
        assert stats["connections"]["accepted"] == 12
        assert stats["process"]["processes"] == 3
        if mode == "kernel":
            # One BPF object for every worker: its counters are counted once.
            assert stats["kernel"]["redirected_bytes"] - redirected == 1200
            assert stats["kernel_sockets"] == 12
        else:
            assert stats["user"]["bytes"] == 1200


@pytest.mark.bpf
def test_kill_9_of_a_worker_the_rest_serve_and_a_new_one_comes_up(
    echod_factory: Callable[..., Echod],
) -> None:
    d = echod_factory(mode="kernel", args=WORKERS)
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connect("127.0.0.1", d.port)) for _ in range(16)]
        for sock in socks:
            roundtrip(sock, b"before")
        workers = d.status()["workers"]
        victim = max(workers, key=lambda w: w["connections"])
        survivors = d.status()["connections"] - victim["connections"]
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(
            lambda: victim["pid"] not in worker_pids(d) and all_serving(d),
            what="a new worker to serve",
        )
        # The victim's connections went with it; the other worker's still echo.
        alive = 0
        for sock in socks:
            try:
                roundtrip(sock, b"after")
                alive += 1
            except (ConnectionError, EOFError, TimeoutError):
                pass
        assert alive == survivors
        assert d.stats()["workers"]["restarts"] == 1
        # Totals never go back: what the dead worker had counted at the supervisor's last 1 s
        # sample is kept (figures.retire; test_aggregate.py checks it exactly).
        assert d.stats()["connections"]["accepted"] >= survivors
    # New connections reach both workers, the new one included.
    with contextlib.ExitStack() as stack:
        for _ in range(20):
            roundtrip(stack.enter_context(connect("127.0.0.1", d.port)), b"new")
        assert all(w["connections"] > 0 for w in d.status()["workers"])
    assert "worker.exited" in d.log()


@pytest.mark.bpf
def test_mode_switches_across_workers_under_traffic(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="user", args=WORKERS)
    clients: list[PingPong | Streamer] = [PingPong(d.port, s) for s in (1, 64, 1500, 30000)]
    clients += [Streamer(d.port), Streamer(d.port)]
    for c in clients:
        c.start()
    wait_for(lambda: d.status()["connections"] == len(clients), what="the clients to connect")
    n = len(clients)
    st = d.call("restart", {"mode": "kernel"})
    assert st["migration"] == {"moved": n, "stayed": 0}
    assert all(w["mode"] == "kernel" for w in st["workers"])
    time.sleep(DURATION / 3)
    st = d.call("restart", {"mode": "user"})
    assert st["migration"] == {"moved": 0, "stayed": n}
    with connect("::1", d.port) as late:
        roundtrip(late, os.urandom(3000))  # a new connection takes the user path
    time.sleep(DURATION / 3)
    st = d.call("restart", {"mode": "kernel"})
    assert st["connections_by_path"] == {"kernel": n, "user": 0}
    time.sleep(DURATION / 3)
    finish(clients)


@pytest.mark.bpf
def test_stop_with_workers_leaves_nothing_behind(echod_factory: Callable[..., Echod]) -> None:
    before_progs, before_maps = loaded_bpf_ids(ours=True)
    d = echod_factory(mode="kernel", args=WORKERS)
    pids = worker_pids(d)
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"x" * 1000)
    st = d.call("stop")
    assert st["state"] == "stopped"
    assert st["connections"] == 0
    assert_unloaded(*d.bpf_ids)
    assert all(w["state"] == "stopped" for w in st["workers"])
    fds = d.stats()["process"]["open_fds"]
    d.call("start", {"mode": "kernel"})
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"again")
    d.call("stop")
    wait_for(lambda: d.stats()["process"]["open_fds"] <= fds, what="fds back to their count")
    assert d.stop() == 0
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    progs, maps = loaded_bpf_ids(ours=True)
    assert progs <= before_progs
    assert maps <= before_maps


def test_workers_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    d = spawn(tmp_path, "user", WORKERS)
    pids = worker_pids(d)
    os.kill(d.proc.pid, signal.SIGKILL)
    d.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(psutil.pid_exists(p) for p in pids), "a worker outlived its supervisor"


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_peer_that_never_reads_is_bounded_with_workers(
    echod_factory: Callable[..., Echod], mode: str
) -> None:
    """The supervisor passes the verdict's rings to the workers: the bound holds as in one."""
    assert_never_reader_bounded(echod_factory(mode=mode, args=WORKERS))


@pytest.mark.bpf
def test_a_switch_while_a_worker_is_down_reaches_it_when_it_comes_back(
    echod_factory: Callable[..., Echod],
) -> None:
    d = echod_factory(mode="kernel", args=WORKERS)
    victim = d.status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: any(w["state"] == "unresponsive" for w in d.status()["workers"]),
        what="the supervisor to see the worker gone",
    )
    st = d.call("restart", {"mode": "user"})  # the others switch; the dead one is not asked
    assert st["mode"] == "user"
    wait_for(lambda: victim not in worker_pids(d) and all_serving(d), what="the new worker")
    assert all(w["mode"] == "user" for w in d.status()["workers"])
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, os.urandom(2000))


@pytest.mark.timeout(90)
def test_a_stopped_worker_is_reported_stale_at_once_then_replaced(
    echod_factory: Callable[..., Echod],
) -> None:
    from echod.supervisor.pool import ANSWER_WAIT
    from echod.supervisor.process import WORKER_HANG

    d = echod_factory(mode="user", args=WORKERS)
    stopped, other = worker_pids(d)
    os.kill(stopped, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # a tick or so of silence
        for _ in range(3):
            t0 = time.monotonic()
            st = d.status()
            took = time.monotonic() - t0
            # It does not wait out a long query timeout for the silent worker.
            assert took < ANSWER_WAIT + 1.5, took
            entry = next(w for w in st["workers"] if w["pid"] == stopped)
            assert entry["stale"] is True, entry
            assert entry["silent_s"] >= 1, entry
            assert entry["state"] == "serving"  # what it said last
            assert not any(w.get("stale") for w in st["workers"] if w["pid"] == other)
            stats = d.stats()
            assert stats["workers"]["unresponsive"] == [entry["index"]]
        # Silent for WORKER_HANG: killed and started again.
        wait_for(
            lambda: stopped not in worker_pids(d) and all_serving(d),
            timeout=WORKER_HANG + 10,
            what="the stopped worker to be replaced",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stopped, signal.SIGCONT)
    assert d.stats()["workers"]["restarts"] == 1
    assert other in worker_pids(d)
    assert any('"worker.hung"' in line for line in d.log().splitlines())
