"""Human output of UDP echo: the status, stats and watch rows, only while it is on."""

from __future__ import annotations

from typing import Any

from echoctl import render, statusrender

UDP_STATUS = {
    "enabled": True,
    "path": "user",
    "listen": ["127.0.0.1:8888", "[::1]:8888"],
    "fallback_reason": "UDP kernel path unavailable: no UDP kernel path in this build",
    "kernel": None,
}
UDP_USER = {
    "echoed_packets": 1500,
    "echoed_bytes": 2048,
    "dropped_loop": 1,
    "dropped_allow": 2,
    "dropped_rate": 3,
    "send_errors": 4,
}


def test_udp_rows_only_while_udp_is_on() -> None:
    status = {"state": "serving", "mode": "kernel", "udp": UDP_STATUS}
    text = statusrender.render_status(status)
    assert (
        "udp          user path on 127.0.0.1:8888, [::1]:8888 "
        "(UDP kernel path unavailable: no UDP kernel path in this build)"
    ) in text
    off = {**UDP_STATUS, "enabled": False, "path": None, "listen": []}
    assert "udp" not in statusrender.render_status({**status, "udp": off})
    stats = {"udp": {"user": UDP_USER, "kernel": None}}
    text = statusrender.render_stats(stats)
    line = next(line for line in text.splitlines() if line.startswith("udp (user) "))
    assert line.removeprefix("udp (user)").strip() == (
        "1.5k datagrams, 2.0 KiB echoed; dropped: loop 1, allow 2, rate 3; 4 send errors"
    )
    assert "udp (kernel)" not in text
    assert "udp" not in statusrender.render_stats({"udp": None})


def test_watch_shows_udp_datagrams_per_second_while_udp_is_on() -> None:
    def snap(t: float, echoed: int) -> dict[str, Any]:
        kernel = {"echoed_packets": echoed, "dropped_rate": 5}
        return {
            "time": t,
            "status": {"state": "serving", "udp": {**UDP_STATUS, "path": "kernel"}},
            "stats": {"udp": {"user": {**UDP_USER, "echoed_packets": echoed}, "kernel": kernel}},
        }

    prev, cur = snap(1.0, 100), snap(2.0, 600)
    rows = dict(render.watch_rows(cur, render.rates_between(prev, cur)))
    assert rows["udp"] == "1.0k datagrams/s (kernel path), dropped 11"
    labels = [label for label, _ in render.watch_rows(cur, render.Rates())]
    assert labels.index("udp") == labels.index("bypass") + 1
    plain = {"time": 2.0, "status": {"state": "serving"}, "stats": {}}
    assert "udp" not in dict(render.watch_rows(plain, render.Rates()))
