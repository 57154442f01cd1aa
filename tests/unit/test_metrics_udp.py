"""echod_udp_*: the UDP families of the exposition (echod.metrics_udp)."""

from __future__ import annotations

from echod import metrics
from tests.unit.test_metrics import _samples, _snapshot


def test_udp_series_by_path_and_reason() -> None:
    s = _samples(metrics.render(_snapshot))
    assert s[("echod_udp_enabled", ())] == 1
    assert s[("echod_udp_path", (("path", "kernel"),))] == 1
    assert s[("echod_udp_path", (("path", "user"),))] == 0
    assert s[("echod_udp_datagrams_total", (("path", "user"),))] == 11
    assert s[("echod_udp_bytes_total", (("path", "kernel"),))] == 2100
    assert s[("echod_udp_dropped_total", (("path", "user"), ("reason", "rate")))] == 3
    assert s[("echod_udp_dropped_total", (("path", "kernel"), ("reason", "loop")))] == 6
    assert s[("echod_udp_send_errors_total", ())] == 4
    assert s[("echod_udp_kernel_passed_total", ())] == 5


def test_udp_off_has_only_its_gauge_and_user_path_no_kernel_series() -> None:
    s = _samples(metrics.render(lambda: _snapshot(udp=None, udp_status={"enabled": False})))
    assert s[("echod_udp_enabled", ())] == 0
    assert not any(name.startswith("echod_udp_") and "enabled" not in name for name, _ in s)
    user_only = {"user": _snapshot()["udp"]["user"], "kernel": None}
    snap = _snapshot(udp=user_only, udp_status={"enabled": True, "path": "user"})
    s = _samples(metrics.render(lambda: snap))
    assert s[("echod_udp_path", (("path", "user"),))] == 1
    assert ("echod_udp_datagrams_total", (("path", "kernel"),)) not in s
    assert not any(name == "echod_udp_kernel_passed_total" for name, _ in s)


def test_udp_drop_reasons_are_the_guard_s() -> None:
    from echod.metrics_udp import UDP_DROP_REASONS
    from echod.service.udp import DROP_REASONS

    assert UDP_DROP_REASONS == DROP_REASONS
