"""The UDP kernel path's self-check (echod.kernel.udpcheck) on the real program: it passes
when the program echoes on lo, and says what failed when it does not."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from echod.kernel import udpcheck
from echod.kernel.udp import UdpKernelEcho
from tests.integration.conftest import require_bpf

LO = socket.if_nametoindex("lo")


@pytest.fixture
def echo() -> Iterator[UdpKernelEcho]:
    require_bpf()
    with UdpKernelEcho() as k:
        yield k


@pytest.mark.bpf
def test_the_check_passes_on_lo_and_counts_its_echoes(echo: UdpKernelEcho) -> None:
    echo.attach(LO)
    before = echo.counters()["echoed_packets"]
    assert echo.self_check(["127.0.0.1", "::1"]) is None
    assert echo.counters()["echoed_packets"] - before == 2 * len(udpcheck.CASES)
    assert echo.self_check(["0.0.0.0"]) is None  # a wildcard is checked on lo's address


@pytest.mark.bpf
def test_the_check_fails_when_the_program_does_not_echo(echo: UdpKernelEcho) -> None:
    # Loaded but attached to no device: nothing turns the datagrams around.
    failed = echo.self_check(["127.0.0.1"])
    assert failed == f"1 B to 127.0.0.1: no echo within {udpcheck.TIMEOUT:g} s"


@pytest.mark.bpf
def test_the_cases_say_which_passed_failed_and_did_not_run(echo: UdpKernelEcho) -> None:
    echo.attach(LO)
    result = udpcheck.check(echo, ["::1"])
    assert result.failed is None
    assert result.cases == {("::1", 1): "passed", ("::1", 1472): "passed"}
    echo.detach_all()  # attached nowhere: the first case fails, the rest are not run
    result = udpcheck.check(echo, ["127.0.0.1", "::1"])
    assert result.failed == f"1 B to 127.0.0.1: no echo within {udpcheck.TIMEOUT:g} s"
    assert result.cases == {
        ("127.0.0.1", 1): "failed",
        ("127.0.0.1", 1472): "not_run",
        ("::1", 1): "not_run",
        ("::1", 1472): "not_run",
    }


def test_only_loopback_addresses_are_checked() -> None:
    assert udpcheck.targets(["198.18.0.1", "127.0.0.2", "::", "0.0.0.0", "::1"]) == [
        "127.0.0.2",
        "::1",
        "127.0.0.1",
    ]
    assert udpcheck.targets(["198.18.0.1"]) == []


def test_a_check_without_a_loopback_address_checks_los_of_the_family() -> None:
    """`echoctl check` checks the program, not a listener: it always has an address to use."""
    assert udpcheck.check_targets(["127.0.0.2", "198.18.0.1"]) == ["127.0.0.2"]
    assert udpcheck.check_targets(["198.18.0.1"]) == ["127.0.0.1"]
    assert udpcheck.check_targets(["2001:db8::1", "198.18.0.1"]) == ["::1", "127.0.0.1"]
