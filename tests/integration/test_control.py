"""The control protocol against a real daemon: every method, malformed input, access, watch."""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest

from echoctl.client import ControlClient, ControlError
from tests.integration.conftest import Echod
from tests.integration.echo_util import connect, roundtrip

Factory = Callable[..., Echod]
NOBODY = 65534
ECHOCTL = str(Path(sys.executable).parent / "echoctl")


def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll pred until true, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


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


def test_stalled_client_does_not_block_others(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with socket.socket(socket.AF_UNIX) as stalled:
        stalled.connect(d.control)
        stalled.sendall(msgpack.packb([0, 1, "status", {}])[:3])
        t0 = time.monotonic()
        assert d.status()["state"] == "serving"
        assert time.monotonic() - t0 < 2.0
        still_serving(d)


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
