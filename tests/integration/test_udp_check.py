"""`check` and `echod --self-check` check UDP's kernel path too: on a private copy of the real
program attached to lo for the check alone, which leaves nothing loaded after it and does not
disturb a copy that serves."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from echod.config.schema import Config
from echod.kernel.echo import default_object as tcp_object
from echod.kernel.udpcheck import CASES, TIMEOUT
from echod.service.selfcheck import check_udp
from tests.integration.conftest import BIN, Echod, Factory, require_bpf
from tests.integration.test_udp import client, exchange, start
from tests.integration.test_udp_kernel import assert_gone

pytestmark = pytest.mark.bpf

ADDRESSES = ("127.0.0.1", "::1")
ALL_PASSED = [
    {"address": a, "bytes": size, "result": "passed"} for a in ADDRESSES for size in CASES
]
NO_ECHO = f"1 B to 127.0.0.1: no echo within {TIMEOUT:g} s"
CHECK_TIMEOUT = 120


def udp_copies(log: str, private: bool = True) -> list[dict[str, Any]]:
    """The UDP objects a log shows loaded (the check's private copies, or the others): their
    ids, and when each was attached and closed (Unix time)."""
    copies: list[dict[str, Any]] = []
    for line in log.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not str(rec.get("event", "")).startswith("udp.") or bool(rec.get("private")) != private:
            continue
        at = datetime.fromisoformat(rec["timestamp"]).timestamp()
        if rec["event"] == "udp.loaded":
            copies.append({"prog_id": rec["prog_id"], "map_ids": rec["map_ids"], "link_ids": []})
        elif rec["event"] == "udp.attached":
            copies[-1]["link_ids"].append(rec["link_id"])
            copies[-1]["attached_at"] = at
        elif rec["event"] == "udp.closed":
            copies[-1]["closed_at"] = at
    return copies


def assert_checks_left_nothing(log: str, count: int) -> list[dict[str, Any]]:
    """The log shows `count` checks' private copies, each attached and closed, and none of
    their programs, maps or links is loaded any more."""
    copies = udp_copies(log)
    assert len(copies) == count, copies
    for copy in copies:
        assert copy["link_ids"], copy
        assert "closed_at" in copy, copy
        assert_gone(copy)
    return copies


def self_check(*args: str) -> tuple[int, dict[str, Any], str]:
    """Run `echod --self-check`: its exit status, its report and its log."""
    done = subprocess.run(
        [str(BIN / "echod"), "--self-check", "--log-level", "debug", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
    )
    return done.returncode, json.loads(done.stdout), done.stderr


def echoctl_check(d: Echod, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "echoctl"), "--control", d.control, "check", *args],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
    )


def test_echod_self_check_checks_udp_and_leaves_nothing() -> None:
    require_bpf()
    code, report, log = self_check()
    assert code == 0, report
    udp = report["udp"]
    assert udp["result"] == "passed", udp
    assert udp["reason"] is None
    assert udp["cases"] == ALL_PASSED
    assert report["passed"] is True
    assert_checks_left_nothing(log, 1)


def test_echod_self_check_names_the_udp_case_that_failed(faulty: Path) -> None:
    """An object that loses 1-byte datagrams: the first case fails, the rest do not run, and
    the check exits 1 although every TCP path passed."""
    require_bpf()
    code, report, log = self_check("--udp-object", str(faulty / "udp.bpf.o"))
    assert code == 1
    assert {e["result"] for e in report["paths"].values()} == {"passed"}
    udp = report["udp"]
    assert (udp["result"], udp["reason"]) == ("failed", NO_ECHO)
    assert [c["result"] for c in udp["cases"]] == ["failed", "not_run", "not_run", "not_run"]
    assert report["passed"] is False
    assert_checks_left_nothing(log, 1)


def test_a_udp_object_that_does_not_load_fails_with_why(tmp_path: Path) -> None:
    require_bpf()
    absent = str(tmp_path / "absent.bpf.o")
    outcome = check_udp(Config(udp_object=absent))
    assert outcome.result == "failed"
    assert outcome.reason == f"UDP kernel path unavailable: {absent}: BPF object not found"
    assert list(outcome.cases.values()) == ["not_run"] * len(ALL_PASSED)
    outcome = check_udp(Config(udp_object=str(tcp_object())))  # no udp_echo program in it
    assert outcome.result == "failed"
    assert outcome.reason == (
        "UDP kernel path unavailable: "
        "bpf_object__find_program_by_name(udp_echo): No such file or directory"
    )


def test_the_daemons_check_checks_udp_while_udp_is_off(echod_factory: Factory) -> None:
    require_bpf()
    d = echod_factory(mode="user")
    report = d.call("check", timeout=CHECK_TIMEOUT)
    assert report["udp"]["result"] == "passed", report["udp"]
    assert report["udp"]["cases"] == ALL_PASSED
    assert report["passed"] is True
    st = d.status()
    assert st["udp"]["enabled"] is False
    assert st["udp"]["kernel"] is None
    assert_checks_left_nothing(d.log(), 1)
    done = echoctl_check(d)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1,472 B to ::1" in done.stdout
    assert_checks_left_nothing(d.log(), 2)


class Pinger(threading.Thread):
    """Ping-pong datagrams to the daemon on both loopbacks until stopped (or 60 s): each must
    come back exactly. Records when each echo came back. Paced to stay under the rate guard
    (udp_rate_per_source, 2,000 a second from each address)."""

    SIZES = (1, 100, 1472, 9000)
    PAUSE = 0.0005  # seconds between exchanges: under 1,000 a second from each address
    WAIT = 2.0  # seconds for each echo: a busy host may stall the thread, never the kernel

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stop = threading.Event()
        self.echoed: list[float] = []
        self.wrong: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + 60
        socks = {host: client(host) for host in ADDRESSES}
        for host, sock in socks.items():
            sock.connect((host, self.port))  # only the daemon's answers reach it
            sock.settimeout(self.WAIT)
        try:
            i = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                host, size = ADDRESSES[i % 2], self.SIZES[i // 2 % len(self.SIZES)]
                payload = os.urandom(size)
                socks[host].send(payload)
                try:
                    reply = socks[host].recv(size + 1)
                except TimeoutError:
                    self.wrong.append(f"{size} B to {host}: lost")
                    return
                if reply != payload:
                    self.wrong.append(f"{size} B to {host}: {len(reply)} B back, differing")
                    return
                self.echoed.append(time.time())
                i += 1
                time.sleep(self.PAUSE)
        finally:
            for sock in socks.values():
                sock.close()

    def until(self, count: int) -> None:
        """Wait until `count` more echoes came back."""
        target = len(self.echoed) + count
        deadline = time.monotonic() + 10
        while len(self.echoed) < target and not self.wrong and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.echoed) >= target, self.wrong


def test_a_check_does_not_interrupt_udp_served_in_the_kernel(echod_factory: Factory) -> None:
    """Datagrams before, during and after a check are all echoed, exactly, by the serving
    program; its links stay; the check's copy goes."""
    d = start(echod_factory, mode="kernel")
    st = d.status()
    assert st["udp"]["path"] == "kernel", st["udp"]
    serving = st["udp"]["kernel"]
    before = d.stats()["udp"]
    pinger = Pinger(d.port)
    pinger.start()
    try:
        pinger.until(200)
        report = d.call("check", timeout=CHECK_TIMEOUT)
        pinger.until(200)
    finally:
        pinger.stop.set()
        pinger.join(10)
    assert not pinger.wrong, pinger.wrong[:5]
    assert report["udp"]["result"] == "passed", report["udp"]
    assert report["udp"]["cases"] == ALL_PASSED
    [copy] = assert_checks_left_nothing(d.log(), 1)
    during = [t for t in pinger.echoed if copy["attached_at"] <= t <= copy["closed_at"]]
    assert during, "no datagram was echoed while the check's copy was attached"
    after = d.stats()["udp"]
    echoed = after["kernel"]["echoed_packets"] - before["kernel"]["echoed_packets"]
    assert echoed == len(pinger.echoed)  # every one by the serving program, none counted twice
    assert after["user"]["echoed_packets"] == before["user"]["echoed_packets"]
    st = d.status()
    assert st["udp"]["path"] == "kernel"
    assert st["udp"]["kernel"]["link_ids"] == serving["link_ids"]
    assert st["udp"]["kernel"]["programs"] == serving["programs"]


def test_the_daemons_check_names_a_failing_udp_path(echod_factory: Factory, faulty: Path) -> None:
    """The object that loses 1-byte datagrams: UDP falls back to user space at start, `check`
    reports the case that failed, `echoctl check` exits 1, and UDP is still echoed."""
    d = start(echod_factory, "--udp-object", str(faulty / "udp.bpf.o"), mode="kernel")
    st = d.status()
    assert st["udp"]["path"] == "user"
    assert st["udp"]["fallback_reason"] == (
        f"UDP kernel path unavailable: it failed its self-check: {NO_ECHO}"
    )
    done = echoctl_check(d)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"udp: failed: {NO_ECHO}" in done.stdout
    done = echoctl_check(d, "--json")
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert (report["udp"]["result"], report["udp"]["reason"]) == ("failed", NO_ECHO)
    assert report["paths"]["kernel"]["result"] == "passed"
    assert_checks_left_nothing(d.log(), 2)
    for copy in udp_copies(d.log(), private=False):  # the one that failed at start
        assert_gone(copy)
    with client("127.0.0.1") as sock:
        assert exchange(sock, "127.0.0.1", d.port, b"x") == b"x"
