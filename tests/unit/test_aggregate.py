"""Adding the workers' figures up: sums, the kernel once, and what exited workers counted."""

from __future__ import annotations

from typing import Any

from echod.figures import merge_stats, merge_status, retire, sum_process


def _stats(accepted: int, active: int, user_bytes: int, in_map: int) -> dict[str, Any]:
    return {
        "connections": {
            "accepted": accepted,
            "active": active,
            "closed": accepted - active,
            "refused": {"allow": 1, "per_ip": 0},
            "insert_failed_reasons": {"peer_closed_before_accept": 2},
        },
        "user": {"bytes": user_bytes, "messages": 3},
        "kernel_sockets": in_map,
        "process": {"rss_bytes": 1000, "open_fds": 10, "cpu_percent": 1.25},
    }


OWN = {
    "kernel": {"redirected_packets": 7},
    "bypass": {"short_msgs": 3},
    "bpf_programs": [{"id": 1}],
    "rates": {},
    "process": {},
    "processes": [],
    "workers": {"count": 2, "restarts": 0},
}


def test_workers_are_added_up_and_the_kernel_is_counted_once() -> None:
    merged = merge_stats([_stats(10, 4, 100, 4), _stats(6, 2, 50, 2)], {}, OWN)
    conns = merged["connections"]
    assert (conns["accepted"], conns["active"], conns["closed"]) == (16, 6, 10)
    assert conns["refused"] == {"allow": 2, "per_ip": 0}
    assert conns["insert_failed_reasons"] == {"peer_closed_before_accept": 4}
    assert merged["user"] == {"bytes": 150, "messages": 6}
    assert merged["kernel_sockets"] == 6
    assert merged["kernel"] == {"redirected_packets": 7}
    assert merged["bypass"] == {"short_msgs": 3}  # the supervisor's object, counted once


def test_what_an_exited_worker_counted_is_kept_but_its_connections_are_not_active() -> None:
    retired: dict[str, Any] = {}
    retire(retired, _stats(10, 4, 100, 4))
    merged = merge_stats([_stats(6, 2, 50, 2)], retired, OWN)
    assert merged["connections"]["accepted"] == 16
    assert merged["connections"]["closed"] == 10
    assert merged["connections"]["active"] == 2
    assert merged["user"]["bytes"] == 150
    retire(retired, None)  # a worker that never reported adds nothing
    assert merge_stats([], retired, OWN)["connections"]["accepted"] == 10


def test_process_figures_are_summed_over_every_process() -> None:
    total = sum_process([{"rss_bytes": 5, "cpu_percent": 0.25}, {"rss_bytes": 7, "open_fds": 3}])
    assert total["rss_bytes"] == 12
    assert total["open_fds"] == 3
    assert total["cpu_percent"] == 0.2  # rounded to one place (0.25 rounds half to even)
    assert total["processes"] == 2


def test_status_lists_each_worker_and_an_unresponsive_one() -> None:
    st = {
        "pid": 11,
        "state": "serving",
        "mode": "kernel",
        "listen": ["127.0.0.1:1"],
        "connections": 3,
        "connections_by_path": {"kernel": 2, "user": 1},
    }
    merged = merge_status({"pid": 10, "state": "serving"}, [(0, st), (1, None)])
    assert merged["pid"] == 10
    assert merged["connections"] == 3
    assert merged["connections_by_path"] == {"kernel": 2, "user": 1}
    assert merged["listen"] == ["127.0.0.1:1"]
    assert [w["state"] for w in merged["workers"]] == ["serving", "unresponsive"]
    assert merged["workers"][0]["pid"] == 11


UDP_USER = {
    "echoed_packets": 3,
    "echoed_bytes": 30,
    "dropped_loop": 1,
    "dropped_allow": 0,
    "dropped_rate": 2,
    "send_errors": 0,
}


def test_udp_user_counters_are_added_up_and_its_kernel_path_counted_once() -> None:
    workers = [{**_stats(1, 0, 0, 0), "udp": {"user": UDP_USER, "kernel": None}}] * 2
    own = {**OWN, "udp": {"user": None, "kernel": {"echoed_packets": 9}}}
    retired: dict[str, Any] = {}
    retire(retired, workers[0])  # one more worker that exited
    merged = merge_stats(workers, retired, own)
    assert merged["udp"] is not None
    assert merged["udp"]["user"] == {k: 3 * v for k, v in UDP_USER.items()}
    assert merged["udp"]["kernel"] == {"echoed_packets": 9}
    # No worker answered: the user path's counters are still all there.
    lone = merge_stats([], {}, own)["udp"]
    assert lone is not None
    assert lone["user"] == dict.fromkeys(UDP_USER, 0)


def test_udp_off_is_nil() -> None:
    merged = merge_stats([_stats(1, 0, 0, 0)], {}, {**OWN, "udp": None})
    assert merged["udp"] is None


def test_status_takes_udp_s_path_from_the_supervisor_and_its_sockets_from_a_worker() -> None:
    own_udp = {"enabled": True, "path": "user", "listen": [], "fallback_reason": "why"}
    worker_udp = {**own_udp, "listen": ["127.0.0.1:1"], "fallback_reason": None}
    st = {
        "pid": 11,
        "state": "serving",
        "mode": "kernel",
        "listen": ["127.0.0.1:1"],
        "connections": 0,
        "connections_by_path": {"kernel": 0, "user": 0},
        "udp": worker_udp,
    }
    merged = merge_status({"pid": 10, "udp": own_udp}, [(0, st), (1, None)])
    assert merged["udp"] == {**own_udp, "listen": ["127.0.0.1:1"]}
