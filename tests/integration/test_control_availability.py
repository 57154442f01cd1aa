"""Control-plane availability (issue 12): idle and stuck clients, refusals, fd limit, scale."""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import pytest

from echoctl.client import ControlClient
from echod.control import limits, protocol
from echod.control import server as control
from echod.control.connection import IDLE_TIMEOUT, WRITE_TIMEOUT
from echod.control.protocol import admin_socket_path
from tests.integration.conftest import Factory
from tests.integration.control_util import (
    ECHOCTL,
    NOBODY,
    reachable_by_others,
    still_serving,
    traced,
)
from tests.integration.echo_util import connect, wait_for

NOBODY_PREFIX = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


IDLE_CLIENTS = """
import socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    socks.append(s)
print("connected", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
closed = 0
for s in socks:
    s.settimeout(max(t0 + 30 - time.monotonic(), 0.01))
    try:
        while s.recv(4096):
            pass
        closed += 1
    except OSError:
        pass
print(closed, round(time.monotonic() - t0, 2), flush=True)
"""


DENIED_FLOOD = """
import socket, sys, msgpack
path, n, batch = sys.argv[1], int(sys.argv[2]), 500
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
s.connect(path)
unpacker = msgpack.Unpacker(raw=False)
codes = {}
for start in range(0, n, batch):
    s.sendall(b"".join(msgpack.packb([0, i, "stop", {}]) for i in range(start, start + batch)))
    got = 0
    while got < batch:
        unpacker.feed(s.recv(65536))
        for reply in unpacker:
            got += 1
            code = reply[2] and reply[2]["code"]
            codes[code] = codes.get(code, 0) + 1
print(codes.get("permission_denied", 0), flush=True)
"""


def nobody_python(script: str, *args: str) -> subprocess.Popen[str]:
    """The test's Python running `script` as uid/gid 65534, no supplementary groups."""
    return subprocess.Popen(
        [*NOBODY_PREFIX, sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )


@pytest.mark.timeout(90)
def test_idle_unprivileged_clients_do_not_lock_root_out(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with reachable_by_others(d.control):
        os.chmod(d.control, 0o666)
        with nobody_python(IDLE_CLIENTS, d.control, "100") as child:
            assert child.stdout is not None
            assert child.stdin is not None
            assert child.stdout.readline().strip() == "connected"
            # All 100 were accepted before this connect: root still gets a slot at once.
            st = d.status()
            assert st["state"] == "serving"
            assert st["control"]["clients"] <= 1 + limits.MAX_CLIENTS_PER_UID
            r = subprocess.run(
                [ECHOCTL, "--control", d.control, "status"], capture_output=True, timeout=30
            )
            assert r.returncode == 0, r
            child.stdin.write("\n")
            child.stdin.flush()
            closed, seconds = child.stdout.readline().split()
            child.wait(10)
    # The refused ones were told `busy` at once; the idle ones closed after IDLE_TIMEOUT.
    assert int(closed) == 100
    assert float(seconds) < IDLE_TIMEOUT + 3
    wait_for(lambda: d.status()["control"]["clients"] == 1, what="idle slots to be freed")
    assert any(r.get("uid") == NOBODY for r in d.records("control.busy"))


def _queued(sock: socket.socket) -> int:
    buf = bytearray(4)
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return int.from_bytes(buf, "little")


@pytest.mark.timeout(120)
def test_clients_that_stop_reading_are_dropped(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    watcher, piper = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    with watcher, piper:
        watcher.connect(d.control)
        piper.connect(d.control)
        watcher.sendall(protocol.encode_request(1, "watch", {"interval": 0.1}))
        piper.sendall(b"".join(protocol.encode_request(i, "stats") for i in range(2000)))
        # Neither reads. Note when each one's receive queue stops growing (the daemon's writes
        # block from then on) and when the daemon hangs up.
        clients = {"watcher": watcher, "piper": piper}
        last: dict[str, tuple[int, float]] = {name: (-1, 0.0) for name in clients}
        dropped: dict[str, float] = {}
        deadline = time.monotonic() + WRITE_TIMEOUT + 40
        while len(dropped) < 2 and time.monotonic() < deadline:
            for name, sock in clients.items():
                if name in dropped:
                    continue
                now = time.monotonic()
                if select.select([sock], [], [], 0)[0] and _hung_up(sock):
                    dropped[name] = now
                elif (n := _queued(sock)) != last[name][0]:
                    last[name] = (n, now)
            time.sleep(0.05)
    assert set(dropped) == {"watcher", "piper"}, f"not dropped within the deadline: {last}"
    for name, at in dropped.items():
        blocked = at - last[name][1]
        assert WRITE_TIMEOUT - 2 < blocked < WRITE_TIMEOUT + 3, (name, blocked)
    # Their slots are free again, and the daemon still answers.
    wait_for(lambda: d.status()["control"] == {"clients": 1, "watchers": 0}, what="slots freed")
    still_serving(d)


def _hung_up(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


@pytest.mark.timeout(90)
def test_refusals_do_not_flood_the_log(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    calls = 5000
    before = len(d.log().splitlines())
    with reachable_by_others(d.control):
        os.chmod(d.control, 0o666)
        child = nobody_python(DENIED_FLOOD, d.control, str(calls))
        out, _ = child.communicate(timeout=60)
    assert int(out) == calls

    def denied() -> list[dict[str, Any]]:
        return d.records("control.denied")

    # Each refusal is either a line of its own or counted in a later line's `suppressed`.
    wait_for(
        lambda: (
            sum(1 for r in denied() if "method" in r)
            + sum(r.get("suppressed", 0) for r in denied())
            == calls
        ),
        timeout=control.LOG_PERIOD + 10,
        what="the suppressed count",
    )
    assert all(r["uid"] == NOBODY for r in denied())
    assert len(d.log().splitlines()) - before <= 40
    still_serving(d)


GARBAGE_FLOOD = """
import socket, sys, time
path, n = sys.argv[1], int(sys.argv[2])
done = 0
deadline = time.monotonic() + 30
while done < n and time.monotonic() < deadline:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(path)
    s.sendall(b"\\xc1" * 16)  # never valid MessagePack
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    s.close()
    done += 1
print(done, flush=True)
"""


@pytest.mark.timeout(90)
def test_dropped_garbage_does_not_flood_the_log(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    clients = 1000

    def logged() -> int:  # what the default level (info) would write
        return sum(1 for r in d.records() if r.get("level") != "debug")

    before = logged()
    with reachable_by_others(d.control):
        os.chmod(d.control, 0o666)
        child = nobody_python(GARBAGE_FLOOD, d.control, str(clients))
        out, _ = child.communicate(timeout=60)
    assert int(out) == clients

    def dropped() -> list[dict[str, Any]]:
        return d.records("control.dropped")

    wait_for(
        lambda: (
            sum(1 for r in dropped() if "code" in r)
            + sum(r.get("suppressed", 0) for r in dropped())
            == clients
        ),
        timeout=control.LOG_PERIOD + 10,
        what="every dropped client logged or counted",
    )
    assert all(r["uid"] == NOBODY for r in dropped())
    assert logged() - before <= 20
    still_serving(d)


@pytest.mark.timeout(120)
def test_control_answers_at_the_fd_limit(echod_factory: Factory) -> None:
    nofile = 300
    d = echod_factory(mode="user", prefix=["prlimit", f"--nofile={nofile}:{nofile}"])
    records = d.records()
    low = [r for r in records if r.get("event") == "daemon.fd_limit_low"]
    assert low
    assert low[0]["connections_possible"] == nofile - limits.FD_RESERVE
    fds = Path(f"/proc/{d.proc.pid}/fd")
    socks = []
    try:
        for _ in range(nofile):
            socks.append(connect(d.host, d.port))
        # The daemon has taken its share of them (without the reserve, it would reach EMFILE).
        wait_for(lambda: len(list(fds.iterdir())) >= nofile - limits.FD_RESERVE, what="accepts")
        for _ in range(3):
            r = subprocess.run(
                [ECHOCTL, "--control", d.control, "status", "--json"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert r.returncode == 0, r
            assert json.loads(r.stdout)["state"] == "serving"
        refused = d.stats()["connections"]["refused"]
        assert refused["fd_limit"] >= nofile - (nofile - limits.FD_RESERVE)
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: d.status()["connections"] == 0, what="connections to close")
    still_serving(d)


@pytest.mark.timeout(300)
def test_stats_is_cheap_at_19k_connections(echod_factory: Factory) -> None:
    n = 19_000
    d = echod_factory(mode="kernel", args=["--max-connections", "20000"])
    socks = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((d.host, d.port), timeout=10))
        wait_for(lambda: d.status()["connections"] == n, timeout=60, what="connections")
        assert d.stats()["kernel_sockets"] == n
        with ControlClient(d.control) as c:
            c.connect()
            with traced(d.proc.pid, "bpf,getdents64", d.log_path.parent / "strace") as calls:
                for _ in range(20):
                    c.call("stats")
        # Cheap means no walk over the connections: not of the sockhash (a BPF key lookup per
        # socket), nor of the fd directory. Some bpf calls (the counters) show the trace works.
        assert sum("bpf(" in line for line in calls) >= 20, calls
        assert sum("BPF_MAP_GET_NEXT_KEY" in line for line in calls) < n, calls[:5]
        assert not [line for line in calls if "getdents64(" in line and "/fd>" in line]
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: d.status()["connections"] == 0, timeout=60, what="connections to close")


def test_control_backlog_takes_a_burst_of_connects(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    socks = []
    try:
        # Non-blocking connects fail with EAGAIN once the listen backlog is full.
        for _ in range(500):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            socks.append(s)
            s.connect(d.control)
    finally:
        for s in socks:
            s.close()
    still_serving(d)


CONNECT_CHURN = """
import socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + seconds
n = 0
print("go", flush=True)
while time.monotonic() < deadline and n < 500_000:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    except OSError:
        pass
    s.close()
    n += 1
print(n, flush=True)
"""


@pytest.mark.timeout(120)
def test_root_status_is_answered_while_another_uid_churns_connections(
    echod_factory: Factory,
) -> None:
    """Admins have their own socket (0600), which other uids cannot connect to, let alone fill."""
    d = echod_factory(mode="user")
    admin = admin_socket_path(d.control)
    st = os.stat(admin)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, os.geteuid())
    with reachable_by_others(d.control):
        os.chmod(d.control, 0o666)
        churners = [nobody_python(CONNECT_CHURN, d.control, "12") for _ in range(4)]
        try:
            for c in churners:
                assert c.stdout is not None
                assert c.stdout.readline().strip() == "go"
            time.sleep(1)
            for _ in range(100):  # as `echoctl status` does: a new connection per call; busy raises
                with ControlClient(d.control) as client:
                    assert client.call("status")["state"] == "serving"
                time.sleep(0.05)
            counts = [int(c.communicate(timeout=30)[0]) for c in churners]
        finally:
            for c in churners:
                c.kill()
                c.wait()
        # The other uid cannot reach the admins' socket, and is served on the shared one.
        probe = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])"
        r = subprocess.run(
            [*NOBODY_PREFIX, sys.executable, "-c", probe, admin], capture_output=True, text=True
        )
        assert "PermissionError" in r.stderr, r
        r = subprocess.run(
            [*NOBODY_PREFIX, ECHOCTL, "--control", d.control, "status"],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        )
        assert r.returncode == 0, r
    assert sum(counts) > 10_000, counts  # the churn ran meanwhile
