"""The control server over a real Unix socket, driving a small in-test fake target.

tests/integration uses the real daemon.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvloop

from echoctl.client import ControlClient, ControlError
from echod.control import connection, protocol
from echod.control.protocol import RequestError
from echod.control.server import ControlServer
from tests.util import first_watch_notification, wait_for


class FakeTarget:
    """Just enough of the service for the control server to drive."""

    def __init__(self) -> None:
        self.state = "serving"
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.state, "mode": "user" if self.state == "serving" else None}

    async def status(self) -> dict[str, Any]:
        return self.snapshot()

    async def stats(self) -> dict[str, Any]:
        return {"connections": {"active": 0}, "user": {"bytes": 0, "messages": 0}}

    async def start(
        self, mode: str | None = None, port: int | None = None, bypass: bool | None = None
    ) -> dict[str, Any]:
        self.calls.append(("start", {"mode": mode, "port": port}))
        if self.state == "serving":
            raise RequestError("bad_state", "already serving")
        self.state = "serving"
        return self.snapshot()

    async def stop(self) -> dict[str, Any]:
        self.calls.append(("stop", {}))
        self.state = "stopped"
        return self.snapshot()

    async def restart(self, mode: str | None = None, bypass: bool | None = None) -> dict[str, Any]:
        self.calls.append(("restart", {"mode": mode}))
        return self.snapshot()

    async def reload(self) -> dict[str, Any]:
        raise ValueError("boom")


class Running:
    """A ControlServer on a uvloop in a background thread."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.target = FakeTarget()
        self.loop = uvloop.new_event_loop()
        self.server = ControlServer(self.path, self.target)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)

    def counts(self) -> tuple[int, int]:
        async def get() -> tuple[int, int]:
            return self.server.active_clients, self.server.active_watchers

        return self.run(get())

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[Running]:
    running = Running(tmp_path / "run" / "control.sock")
    try:
        yield running
    finally:
        running.stop()
    assert not os.path.exists(running.path)


def _drain_until_closed(s: socket.socket) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False)
    while data := s.recv(65536):
        unpacker.feed(data)
    return list(unpacker)


def test_socket_file_mode(srv: Running) -> None:
    st = os.stat(srv.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_hello_and_calls(srv: Running) -> None:
    with ControlClient(srv.path) as c:
        hello = c.connect()
        assert hello["api_version"] == 1
        assert set(hello["methods"]) == set(protocol.METHODS)
        assert hello["pid"] == os.getpid()
        assert hello["peer"]["uid"] == os.geteuid()
        assert hello["peer"]["admin"] is True
        status = c.call("status")
        assert status["state"] == "serving"
        assert status["control"] == {"clients": 1, "watchers": 0}
        with pytest.raises(ControlError) as info:
            c.call("start", {"mode": "user"})
        assert info.value.code == "bad_state"
        assert c.call("stop")["state"] == "stopped"
        assert c.call("start", {"mode": "kernel", "port": 9}) == {
            "state": "serving",
            "mode": "user",
        }
        with pytest.raises(ControlError) as info:
            c.call("reload")
        assert info.value.code == "internal"
        # The connection survives every error above.
        assert c.call("stats")["user"]["bytes"] == 0
    assert srv.target.calls[2] == ("start", {"mode": "kernel", "port": 9})


def test_error_replies_keep_connection(srv: Running) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(srv.path)
        unpacker = msgpack.Unpacker(raw=False)
        frames = [
            [0, 1, "nope", {}],
            [0, 2, "start", {"port": "x"}],
            [0, 3, "watch", {"interval": 0}],
            7,
            [9, 9, 9],
            [0, 5, 7, {}],
            [0, 6, "status"],
            [0, 4, "status", []],
        ]
        s.sendall(b"".join(msgpack.packb(f) for f in frames))
        replies = []
        while len(replies) < len(frames):
            unpacker.feed(s.recv(65536))
            replies.extend(unpacker)
    codes = [r[2] and r[2]["code"] for r in replies]
    assert codes == [
        "unknown_method",
        "invalid_params",
        "invalid_params",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        "invalid_request",
        None,
    ]
    # A readable msgid is carried even when the rest of the request is not.
    assert [r[1] for r in replies] == [1, 2, 3, None, None, 5, 6, 4]


def test_undecodable_bytes_get_error_then_close(srv: Running) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(srv.path)
        s.sendall(b"\xc1garbage")  # 0xc1 is never valid MessagePack
        replies = _drain_until_closed(s)
    assert replies == [
        [1, None, {"code": "invalid_request", "message": "undecodable frame: FormatError"}, None]
    ]
    with ControlClient(srv.path) as c:
        assert c.call("status")["state"] == "serving"


def test_oversize_frame(srv: Running) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(srv.path)
        big = msgpack.packb([0, 1, "status", {"pad": "x" * (4 * protocol.MAX_FRAME)}])
        try:
            s.sendall(big)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before it has read everything
        replies = _drain_until_closed(s)
    assert replies[0][2]["code"] == "frame_too_large"


def test_frame_just_over_cap_is_refused_but_connection_stays(srv: Running) -> None:
    # Fits the unpacker's buffer (cap + one read) yet is over the cap: refused by its size.
    frame = msgpack.packb([0, 1, "status", {"pad": "x" * protocol.MAX_FRAME}])
    assert protocol.MAX_FRAME < len(frame) < protocol.MAX_FRAME + 100
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(srv.path)
        s.sendall(frame + msgpack.packb([0, 2, "status", {}]))
        unpacker = msgpack.Unpacker(raw=False)
        replies: list[Any] = []
        while len(replies) < 2:
            unpacker.feed(s.recv(65536))
            replies.extend(unpacker)
    assert [r[1] for r in replies] == [1, 2]
    assert replies[0][2]["code"] == "frame_too_large"
    assert replies[1][2] is None


def test_partial_frame_times_out(srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "PARTIAL_FRAME_TIMEOUT", 0.3)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(srv.path)
        s.sendall(protocol.encode_request(1, "status")[:3])
        replies = _drain_until_closed(s)
    assert replies[0][2]["code"] == "invalid_request"
    assert "timed out" in replies[0][2]["message"]


def test_partial_frame_deadline_is_for_the_whole_frame(
    srv: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "PARTIAL_FRAME_TIMEOUT", 1.0)
    frame = protocol.encode_request(2, "status")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(srv.path)
        s.sendall(protocol.encode_request(1, "hello"))
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(s.recv(65536))
        assert next(unpacker)[1] == 1
        # One byte every 0.3 s: each would renew a per-read timeout, and the frame would be
        # whole after 3.3 s; the deadline counts from its first byte, so the frame is cut
        # before its last byte although no gap came near the timeout.
        sent = 0
        for byte in frame:
            s.sendall(bytes([byte]))
            sent += 1
            ready, _, _ = select.select([s], [], [], 0.3)
            if ready:
                break
        assert sent < len(frame), "the frame was not cut"
        replies = _drain_until_closed(s)
    assert replies[0][2]["message"] == "incomplete frame timed out"


def test_idle_connection_is_closed(srv: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "IDLE_TIMEOUT", 0.5)
    # A client that has sent a request may then stay quiet. It connects first, so by the time
    # the idle clients below are cut it has been quiet for longer than their deadline.
    with ControlClient(srv.path) as quiet:
        quiet.connect()
        with socket.socket(socket.AF_UNIX) as idle, socket.socket(socket.AF_UNIX) as partial:
            idle.settimeout(5)
            partial.settimeout(5)
            idle.connect(srv.path)
            partial.connect(srv.path)
            partial.sendall(protocol.encode_request(1, "status")[:3])
            wait_for(lambda: srv.counts() == (3, 0), what="three clients")
            assert _drain_until_closed(idle)[0][2] == {
                "code": "invalid_request",
                "message": "no request within 0.5 s of connecting",
            }
            # A first frame left incomplete is cut by the same deadline.
            assert _drain_until_closed(partial)[0][2]["message"] == "incomplete frame timed out"
        wait_for(lambda: srv.counts() == (1, 0), what="the idle clients to be closed")
        assert quiet.call("status")["state"] == "serving"


def test_stalled_client_does_not_block_others(srv: Running) -> None:
    with socket.socket(socket.AF_UNIX) as stalled:
        stalled.connect(srv.path)
        stalled.sendall(b"\x94\x00")  # half a request, then nothing
        with ControlClient(srv.path, timeout=2) as c:
            assert c.call("status")["state"] == "serving"


def test_watch_stream_and_cleanup(srv: Running) -> None:
    # The current state comes at once, not after the first interval.
    first = first_watch_notification(srv.path)
    assert set(first) == {"time", "status", "stats"}
    assert first["status"]["control"]["watchers"] == 1
    wait_for(lambda: srv.counts() == (0, 0), what="the first watcher to be closed")
    with ControlClient(srv.path) as c:
        stream = c.subscribe("watch", {"interval": 0.1})
        first = next(stream)
        snaps = [next(stream) for _ in range(3)]
        assert all(b["time"] > a["time"] for a, b in zip([first, *snaps], snaps, strict=False))
        assert srv.counts() == (1, 1)
    wait_for(lambda: srv.counts() == (0, 0), what="clients to be closed")


def test_second_watch_on_same_connection_is_refused(srv: Running) -> None:
    with ControlClient(srv.path) as c:
        c.subscribe("watch", {"interval": 1})
        with pytest.raises(ControlError) as info:
            c.call("watch", {})
        assert info.value.code == "bad_state"
        # Other requests still work while the stream runs.
        assert c.call("status")["state"] == "serving"


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # closed, the file stays and nothing listens
    running = Running(path)
    try:
        with ControlClient(running.path) as c:
            assert c.call("status")["state"] == "serving"
    finally:
        running.stop()


def test_refuses_to_start_over_a_live_daemon(srv: Running) -> None:
    other = ControlServer(srv.path, FakeTarget())
    with pytest.raises(OSError, match="another daemon answers"):
        srv.run(other.start())
    # The live daemon's socket is untouched.
    with ControlClient(srv.path) as c:
        assert c.call("status")["state"] == "serving"


def test_refuses_over_a_live_daemon_with_a_full_backlog(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    with socket.socket(socket.AF_UNIX) as live, socket.socket(socket.AF_UNIX) as queued:
        live.bind(path)
        live.listen(0)
        queued.connect(path)  # fills the backlog: the probe's connect gets EAGAIN
        server = ControlServer(path, FakeTarget())
        with pytest.raises(OSError, match="another daemon answers"):
            uvloop.run(server.start())
        assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_refuses_a_socket_it_may_not_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))

    def denied(self: socket.socket, address: Any) -> None:
        # What a non-root daemon gets for another user's 0660 socket (root bypasses the mode).
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    server = ControlServer(str(path), FakeTarget())
    with pytest.raises(
        OSError, match=r"cannot be probed \(Permission denied\); not removing"
    ) as info:
        uvloop.run(server.start())
    assert info.value.errno == 13
    assert str(path) in str(info.value)
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_refuses_non_socket_path(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("not a socket")
    server = ControlServer(str(path), FakeTarget())
    with pytest.raises(OSError, match="not a socket"):
        uvloop.run(server.start())
    assert path.read_text() == "not a socket"
