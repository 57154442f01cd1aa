"""status and stats as a live daemon sends them have the shapes echod.control.replies types.

The TypedDicts are what mypy checks the builders against; this checks them against the wire,
so that a key added, dropped or renamed in either place fails here.
"""

from __future__ import annotations

from typing import Any

import pytest

from echod.control import replies
from tests.integration.conftest import Factory
from tests.integration.echo_util import connect, roundtrip


def conforms(value: dict[str, Any], shape: Any, where: str) -> None:
    keys = set(value)
    required, optional = set(shape.__required_keys__), set(shape.__optional_keys__)
    assert required <= keys, f"{where}: missing {sorted(required - keys)}"
    assert keys <= required | optional, f"{where}: not typed {sorted(keys - required - optional)}"


@pytest.mark.parametrize(
    ("mode", "args"),
    [("user", []), ("kernel", ["--bypass"]), ("kernel", ["--workers", "2", "--bypass"])],
    ids=["user", "kernel+bypass", "workers+kernel+bypass"],
)
def test_status_and_stats_have_their_typed_shapes(
    echod_factory: Factory, mode: str, args: list[str]
) -> None:
    d = echod_factory(mode=mode, args=args)
    with connect(d.host, d.port) as sock:
        roundtrip(sock, b"shape")
    status, stats = d.status(), d.stats()
    conforms(status, replies.Status, "status")
    assert "control" in status  # the server adds it to every status reply
    conforms(status["control"], replies.ControlFigures, "status.control")
    conforms(status["connections_by_path"], replies.ByPath, "status.connections_by_path")
    for entry in status["workers"]:
        conforms(entry, replies.WorkerEntry, "status.workers[]")
    conforms(stats, replies.Stats, "stats")
    conforms(stats["connections"], replies.ConnectionCounts, "stats.connections")
    conforms(stats["user"], replies.UserCounts, "stats.user")
    conforms(stats["workers"], replies.WorkerCounts, "stats.workers")
    conforms(status["udp"], replies.UdpStatus, "status.udp")
    assert stats["udp"] is None  # UDP is off unless configured
    assert (stats["kernel"] is None) == (mode == "user")


@pytest.mark.parametrize(
    ("mode", "args"),
    [("user", []), ("kernel", ["--workers", "2"])],
    ids=["user", "workers+kernel"],
)
def test_check_has_its_typed_shape(echod_factory: Factory, mode: str, args: list[str]) -> None:
    d = echod_factory(mode=mode, args=args)
    report = d.call("check", timeout=120)
    conforms(report, replies.CheckReport, "check")
    for case in report["cases"]:
        conforms(case, replies.CheckCase, "check.cases[]")
    conforms(report["udp"], replies.UdpCheck, "check.udp")
    assert report["udp"]["cases"], report["udp"]
    for case in report["udp"]["cases"]:
        conforms(case, replies.UdpCheckCase, "check.udp.cases[]")
