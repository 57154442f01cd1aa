"""The control protocol against a real daemon: every method, malformed input, access, watch."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import json
import os
import select
import socket
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from echoctl.client import ControlClient, ControlError
from echod import control, limits, protocol
from tests.integration.conftest import Echod
from tests.integration.echo_util import connect, roundtrip, wait_for

Factory = Callable[..., Echod]
NOBODY = 65534
ECHOCTL = str(Path(sys.executable).parent / "echoctl")


def still_serving(d: Echod) -> None:
    """The daemon echoes on TCP and answers on its control socket."""
    with connect(d.host, d.port) as sock:
        roundtrip(sock, os.urandom(4096))
    assert d.status()["state"] == "serving"


def raw_exchange(path: str, data: bytes, want: int, timeout: float = 10.0) -> list[Any]:
    """Send raw bytes; read until `want` frames arrive or the daemon closes."""
    frames: list[Any] = []
    unpacker = msgpack.Unpacker(raw=False)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed after an unframeable prefix; its reply may still be readable
        while len(frames) < want:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            unpacker.feed(chunk)
            frames.extend(unpacker)
    return frames


@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_every_method(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    with ControlClient(d.control) as c:
        hello = c.connect()
        assert hello["api_version"] == 1
        assert {"hello", "status", "stats", "watch", "start", "stop", "restart", "reload"} <= set(
            hello["methods"]
        )
        assert hello["pid"] == d.proc.pid
        assert hello["peer"] == {"uid": 0, "gid": 0, "pid": os.getpid(), "admin": True}
        st = c.call("status")
        assert st["state"] == "serving"
        assert st["mode"] == mode
        assert st["port"] == d.port
        assert st["control"]["clients"] >= 1
        assert st["bpf"]["attached"] is (mode == "kernel")
        stats = c.call("stats")
        assert {"connections", "user", "kernel", "rates", "process", "bpf_programs"} <= set(stats)
        assert c.call("stop")["state"] == "stopped"
        with pytest.raises(ControlError) as info:
            c.call("stop")
        assert info.value.code == "bad_state"
        started = c.call("start", {"mode": mode})
        assert started["state"] == "serving"
        assert started["mode"] == mode
        with pytest.raises(ControlError) as info:
            c.call("start")
        assert info.value.code == "bad_state"
        assert c.call("restart", {"mode": "user"})["mode"] == "user"
        assert c.call("restart", {"mode": mode})["mode"] == mode
        assert set(c.call("reload")) == {"applied", "needs_restart"}
        stream = c.subscribe("watch", {"interval": 0.2})
        snap = next(stream)
        assert snap["status"]["state"] == "serving"
        assert "process" in snap["stats"]
    still_serving(d)


def test_wrong_params_and_unknown_methods(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    cases = [
        ("frobnicate", {}, "unknown_method"),
        ("start", {"mode": "turbo"}, "invalid_params"),
        ("start", {"port": "80"}, "invalid_params"),
        ("start", {"port": 70000}, "invalid_params"),
        ("restart", {"mode": 3}, "invalid_params"),
        ("watch", {"interval": 0}, "invalid_params"),
        ("watch", {"interval": "fast"}, "invalid_params"),
        ("status", {"extra": 1}, "invalid_params"),
    ]
    with ControlClient(d.control) as c:
        for method, params, code in cases:
            with pytest.raises(ControlError) as info:
                c.call(method, params)
            assert info.value.code == code, method
        assert c.call("status")["state"] == "serving"
    still_serving(d)


def test_garbage_truncated_and_oversize(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    # 0xc1 is never valid MessagePack: one error reply (no msgid), then the daemon hangs up.
    replies = raw_exchange(d.control, b"\xc1\x00garbage", want=2)
    assert [r[:2] for r in replies] == [[1, None]]
    assert replies[0][2] == {"code": "invalid_request", "message": "undecodable frame: FormatError"}
    # Bytes that decode but are not requests get a reply each, and the connection stays.
    replies = raw_exchange(d.control, b"\x01\x02" + msgpack.packb([0, 5, "status", {}]), want=3)
    assert [r[2] and r[2]["code"] for r in replies] == ["invalid_request", "invalid_request", None]
    # A request that is malformed past its msgid is refused under that msgid.
    frames = [[0, 5, 7, {}], [0, 6, "status"], [0, 7, "status", {}]]
    replies = raw_exchange(d.control, b"".join(msgpack.packb(f) for f in frames), want=3)
    assert [(r[1], r[2] and r[2]["code"]) for r in replies] == [
        (5, "invalid_request"),
        (6, "invalid_request"),
        (7, None),
    ]
    # A truncated frame followed by a hang-up is simply dropped.
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(d.control)
        s.sendall(msgpack.packb([0, 1, "status", {}])[:5])
    # An oversize frame is refused.
    big = msgpack.packb([0, 1, "status", {"pad": "x" * 300_000}])
    replies = raw_exchange(d.control, big, want=1)
    assert replies[0][2]["code"] == "frame_too_large"
    still_serving(d)


def test_a_thousand_bad_frames(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    bad = [
        msgpack.packb([0, 1, "nope", {}]),
        msgpack.packb([0, 2, "start", {"port": "x"}]),
        msgpack.packb([0, 3, "watch", {"interval": -1}]),
        msgpack.packb("not a request"),
        msgpack.packb([0, 4]),
        msgpack.packb([0, 5, "status", [1, 2, 3]]),
    ]
    frames = [bad[i % len(bad)] for i in range(1000)]
    replies = raw_exchange(d.control, b"".join(frames), want=1000, timeout=30)
    assert len(replies) == 1000
    assert all(r[2] is not None for r in replies)
    # And 1,000 connections that each send one undecodable byte sequence.
    for _ in range(100):
        raw_exchange(d.control, b"\xc1", want=1)
    still_serving(d)
    assert d.status()["control"]["clients"] == 1


def test_watch_stream_and_no_leak(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with ControlClient(d.control) as c:
        t0 = time.monotonic()
        stream = c.subscribe("watch", {"interval": 0.1})
        first = next(stream)
        assert time.monotonic() - t0 < 1.0
        snaps = [first] + [next(stream) for _ in range(5)]
        times = [s["time"] for s in snaps]
        assert times == sorted(times)
        assert 0.3 < times[-1] - times[0] < 3.0
        assert d.status()["control"]["watchers"] == 1
    wait_for(lambda: d.status()["control"] == {"clients": 1, "watchers": 0}, what="watch to end")
    # Several watchers at once, then all gone.
    clients = [ControlClient(d.control) for _ in range(5)]
    for c in clients:
        next(c.subscribe("watch", {"interval": 0.1}))
    assert d.status()["control"]["watchers"] == 5
    for c in clients:
        c.close()
    wait_for(lambda: d.status()["control"]["watchers"] == 0, what="watchers to end")
    still_serving(d)


def test_shutdown_with_a_watcher_attached(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    c = ControlClient(d.control)
    stream = c.subscribe("watch", {"interval": 0.1})
    next(stream)
    assert d.stop() == 0
    codes = []
    for _ in range(200):
        try:
            next(stream)
        except ControlError as exc:
            codes.append(exc.code)
            break
    c.close()
    assert codes == ["disconnected"]
    assert not os.path.exists(d.control)


def test_second_daemon_on_same_socket_is_refused(echod_factory: Factory, tmp_path: Path) -> None:
    d = echod_factory(mode="user")
    other = echod_factory(mode="user", args=["--control", d.control], wait=False)
    assert other.proc.wait(15) != 0
    other.proc.returncode = 0  # reported; keep the factory's clean-exit check for `d`
    still_serving(d)


def test_daemon_that_may_not_probe_the_socket_leaves_it(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with reachable_by_others(d.control):
        # The live daemon's socket is root:root 0660, so nobody's probe connect gets EACCES.
        other = echod_factory(
            mode="user",
            args=["--control", d.control],
            wait=False,
            prefix=["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
        )
        assert other.proc.wait(15) != 0
    other.proc.returncode = 0  # reported; keep the factory's clean-exit check for `d`
    assert f"{d.control} exists and cannot be probed (Permission denied)" in other.log()
    assert "Traceback" not in other.log()
    still_serving(d)


@contextmanager
def reachable_by_others(path: str) -> Iterator[None]:
    """Let other uids traverse to `path` (pytest's temp dirs are 0700) for the test's duration."""
    changed: list[tuple[str, int]] = []
    parent = os.path.dirname(path)
    try:
        while parent not in ("/", ""):
            mode = stat.S_IMODE(os.stat(parent).st_mode)
            if not mode & 0o001:
                changed.append((parent, mode))
                os.chmod(parent, mode | 0o001)
            parent = os.path.dirname(parent)
        yield
    finally:
        for p, mode in changed:
            os.chmod(p, mode)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """Run echoctl as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", ECHOCTL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )


def test_unprivileged_client(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with reachable_by_others(d.control):
        # Default 0660 root:root: the kernel refuses the connect itself.
        assert stat.S_IMODE(os.stat(d.control).st_mode) == 0o660
        r = as_nobody("--control", d.control, "status")
        assert r.returncode == 4, r
        assert f"cannot connect to {d.control}: Permission denied" in r.stderr
        # An admin opens the socket to everyone: reading works, changing does not.
        os.chmod(d.control, 0o666)
        r = as_nobody("--control", d.control, "status", "--json")
        assert r.returncode == 0, r
        assert '"state": "serving"' in r.stdout
        for cmd in (["stats"], ["watch", "--count", "2", "--interval", "0.1"]):
            r = as_nobody("--control", d.control, *cmd)
            assert r.returncode == 0, r
        for cmd in (["stop"], ["start"], ["restart", "--mode", "user"], ["reload"]):
            r = as_nobody("--control", d.control, *cmd)
            assert r.returncode == 4, r
            assert "permission_denied" in r.stderr
        r = as_nobody("--control", d.control, "--json", "stop")
        assert r.returncode == 4
        assert '"code": "permission_denied"' in r.stdout
    still_serving(d)
    wait_for(lambda: '"uid": 65534' in d.log() and "control.denied" in d.log(), what="denial log")


def test_control_and_admin_group(echod_factory: Factory, tmp_path: Path) -> None:
    group = "adm"
    gid = grp.getgrnam(group).gr_gid
    conf = tmp_path / "echod.toml"
    conf.write_text(f'[control]\ngroup = "{group}"\nadmin_group = "{group}"\n')
    d = echod_factory(mode="user", args=["--config", str(conf)])
    st = os.stat(d.control)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)

    def member(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                f"--groups={gid}",
                ECHOCTL,
                "--control",
                d.control,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
        )

    with reachable_by_others(d.control):
        # Outside the group: cannot even connect.
        assert as_nobody("--control", d.control, "status").returncode == 4
        # A supplementary member of the admin group may change the daemon.
        r = member("stop")
        assert r.returncode == 0, r
        assert member("status").returncode == 3
        r = member("start", "--mode", "user")
        assert r.returncode == 0, r
    still_serving(d)


# -- control-plane availability (issue 12) and peer groups from the socket (issue 8) ---------

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


def log_records(d: Echod) -> list[dict[str, Any]]:
    """The daemon's JSON log records."""
    records = []
    for line in d.log().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


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
    assert float(seconds) < control.IDLE_TIMEOUT + 3
    wait_for(lambda: d.status()["control"]["clients"] == 1, what="idle slots to be freed")
    assert any(r.get("event") == "control.busy" and r.get("uid") == NOBODY for r in log_records(d))


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
        deadline = time.monotonic() + control.WRITE_TIMEOUT + 40
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
        assert control.WRITE_TIMEOUT - 2 < blocked < control.WRITE_TIMEOUT + 3, (name, blocked)
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
        return [r for r in log_records(d) if r.get("event") == "control.denied"]

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


@pytest.mark.timeout(120)
def test_control_answers_at_the_fd_limit(echod_factory: Factory) -> None:
    nofile = 300
    d = echod_factory(mode="user", prefix=["prlimit", f"--nofile={nofile}:{nofile}"])
    records = log_records(d)
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
        times = []
        with ControlClient(d.control) as c:
            c.connect()
            for _ in range(20):
                t0 = time.perf_counter()
                c.call("stats")
                times.append(time.perf_counter() - t0)
        # A round trip bounds the loop time the call took; the best of 20 leaves out the
        # 100 ms kernel-path guard and this machine's other load.
        assert min(times) < 0.005, sorted(times)
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


@pytest.mark.timeout(60)
def test_admin_group_from_the_socket_with_proc_hidden(
    echod_factory: Factory, tmp_path: Path
) -> None:
    gid = grp.getgrnam("adm").gr_gid
    # What ProtectProc=invisible does for the echod user: a private /proc with hidepid=invisible,
    # and a daemon without CAP_SYS_PTRACE, so other users' /proc/<pid> are not there for it.
    # (gid= names a group the daemon is not in: the default, 0, would exempt this root daemon.)
    prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        'mount -t proc -o hidepid=invisible,gid=65533 proc /proc && exec "$@"',
        "sh",
        "setpriv",
        "--bounding-set=-sys_ptrace",
        "--inh-caps=-sys_ptrace",
    ]
    conf = tmp_path / "echod.toml"
    conf.write_text('[control]\nadmin_group = "adm"\n')
    d = echod_factory(mode="user", args=["--config", str(conf)], prefix=prefix)
    mounts = Path(f"/proc/{d.proc.pid}/mounts").read_text().splitlines()
    assert any(m.split()[1] == "/proc" and "hidepid=invisible" in m for m in mounts), mounts

    def stop_as_nobody(*groups: int) -> subprocess.CompletedProcess[str]:
        ids = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *ids, ECHOCTL]
            + ["--control", d.control, "stop"],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        )

    with reachable_by_others(d.control):
        os.chmod(d.control, 0o666)
        for groups in ((), (gid + 1000,)):
            r = stop_as_nobody(*groups)
            assert r.returncode == 4, r
            assert "permission_denied" in r.stderr
        r = stop_as_nobody(gid + 1000, gid)
        assert r.returncode == 0, r
    assert d.status()["state"] == "stopped"
    assert d.call("start", {"mode": "user"})["state"] == "serving"
