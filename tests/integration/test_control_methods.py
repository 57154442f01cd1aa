"""The control protocol against a real daemon: every method, malformed input, watch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import msgpack
import pytest

from echoctl.client import ControlClient, ControlError
from tests.integration.conftest import Factory
from tests.integration.control_util import still_serving
from tests.integration.echo_util import wait_for
from tests.util import first_watch_notification


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
    # The current state comes at once, not after the first interval.
    assert first_watch_notification(d.control)["status"]["control"]["watchers"] == 1
    wait_for(lambda: d.status()["control"]["watchers"] == 0, what="the first watch to end")
    with ControlClient(d.control) as c:
        stream = c.subscribe("watch", {"interval": 0.1})
        snaps = [next(stream) for _ in range(6)]
        times = [s["time"] for s in snaps]
        # Paced by the interval (the daemon's own clock; load can only widen the gaps).
        assert all(b - a >= 0.05 for a, b in zip(times, times[1:], strict=False)), times
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
