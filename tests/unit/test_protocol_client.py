"""The control client (echoctl) against fake servers: what it sends, bad replies, no daemon."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest

from echoctl import client as client_module
from echoctl.client import ControlClient, ControlError, DaemonUnreachable
from echod.control import protocol


@contextmanager
def one_reply_server(
    path: str, payload: bytes, *, hello: bool = False
) -> Iterator[threading.Event]:
    """Answer one request on `path` with `payload`, whatever it is, then wait for EOF.

    With `hello`, the client's hello is answered first and `payload` goes to its next request.
    The event yielded is set when the client has closed the connection.
    """
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(10)
    closed = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                if hello:
                    conn.recv(65536)
                    conn.sendall(protocol.encode_response(1, None, {"api_version": 1}))
                conn.recv(65536)
                conn.sendall(payload)
                while conn.recv(65536):
                    pass
                closed.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield closed
    finally:
        thread.join(timeout=15)
        listener.close()


def test_client_request_bytes_match_server_encoding(tmp_path: Path) -> None:
    # The client sends what the shared encoder makes, byte for byte, and reads its replies.
    path = str(tmp_path / "c.sock")
    received = bytearray()
    replies = [
        protocol.encode_response(1, None, {"api_version": protocol.API_VERSION}),
        protocol.encode_response(2, None, {}),
    ]

    def serve(listener: socket.socket) -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            unpacker = msgpack.Unpacker()
            while chunk := conn.recv(65536):
                received.extend(chunk)
                unpacker.feed(chunk)
                for _ in unpacker:
                    conn.sendall(replies.pop(0))

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)
        thread = threading.Thread(target=serve, args=(listener,), daemon=True)
        thread.start()
        with ControlClient(path, timeout=5) as c:
            assert c.call("watch", {"interval": 0.5}) == {}
        thread.join(timeout=10)
        assert not thread.is_alive(), "the fake server did not see the client close"
    assert bytes(received) == protocol.encode_request(1, "hello", {}) + protocol.encode_request(
        2, "watch", {"interval": 0.5}
    )


def test_unreachable(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable) as info:
        ControlClient(str(tmp_path / "none.sock")).call("status")
    assert info.value.code == "unreachable"
    assert str(tmp_path / "none.sock") in info.value.message


def test_client_undecodable_reply_names_the_error(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    with one_reply_server(path, b"\xc1"), ControlClient(path, timeout=5) as c:
        with pytest.raises(ControlError) as info:
            c.call("status")
    assert info.value.code == "protocol"
    assert info.value.message == "undecodable reply: FormatError"


def test_client_reply_over_its_buffer_is_a_protocol_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "MAX_REPLY", 1024)
    path = str(tmp_path / "c.sock")
    # An array of 15 strings with only 14 sent: never a whole frame, always over the buffer.
    payload = b"\x9f" + (b"\xd9\xff" + b"x" * 255) * 14
    with one_reply_server(path, payload, hello=True) as closed, ControlClient(path, timeout=5) as c:
        c.connect()
        with pytest.raises(ControlError) as info:
            c.call("status")
        # The stream cannot be resynchronised: the client closed it (the server saw EOF).
        assert closed.wait(5)
    assert info.value.code == "protocol"
    assert info.value.message == f"reply from {path} exceeds 1024 bytes"
