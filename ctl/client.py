"""Blocking client for echod's control socket (MessagePack-RPC, see docs/protocol.md)."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections import deque
from collections.abc import Iterator
from types import TracebackType
from typing import Any

# One definition of the default path and of the wire format, shared with the daemon.
from echod.config.schema import default_control_path
from echod.control.protocol import (
    API_VERSION,
    NOTIFICATION,
    FrameError,
    FrameReader,
    admin_socket_path,
    encode_request,
    well_formed_reply,
)

__all__ = [
    "ControlClient",
    "ControlError",
    "DaemonUnreachable",
    "client_control_path",
    "default_control_path",
]

# Replies are not capped by the server the way requests are; this only bounds a broken peer.
MAX_REPLY = 16 * 1024 * 1024
SYSTEM_CONTROL_PATH = "/run/echod/control.sock"  # the system daemon's, under systemd
BUSY_RETRY_S = 2.0  # how long connect retries while the listen backlog is full


def client_control_path() -> str:
    """Return the control socket `echoctl` uses when none is given.

    The per-user socket when it exists; otherwise the system daemon's, which an admin-group
    member may use. A path that exists neither way is returned as the per-user one, so the
    error names the socket the user would have started.
    """
    path = default_control_path()
    if path != SYSTEM_CONTROL_PATH and not os.path.exists(path):
        if os.path.exists(SYSTEM_CONTROL_PATH):
            return SYSTEM_CONTROL_PATH
    return path


class ControlError(Exception):
    """An error reply from the daemon, or a client-side failure with its own `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class DaemonUnreachable(ControlError, OSError):
    """The control socket could not be connected to (code unreachable or permission_denied).

    It is also an OSError, so callers that poll for a starting daemon can catch just that.
    """

    def __init__(self, path: str, reason: str, err: int | None = None) -> None:
        code = "permission_denied" if err in (errno.EACCES, errno.EPERM) else "unreachable"
        message = f"cannot connect to {path}: {reason}"
        if err == errno.EAGAIN:
            # The daemon runs, but its listen backlog is full: a busy daemon, not a dead one.
            code = "busy"
            message = f"{path} is busy (its listen backlog stayed full); try again"
        super().__init__(code, message)
        self.path = path
        self.reason = reason
        self.errno = err


class ControlClient:
    """One connection to the daemon; connects (and says hello) on first use."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.server: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._frames = FrameReader(MAX_REPLY)
        self._msgid = 0
        self._pending: deque[tuple[str, Any]] = deque()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection; idempotent."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def connect(self) -> dict[str, Any]:
        """Connect and call `hello`; return its result (also kept in `self.server`)."""
        if self._sock is not None:
            return self.server
        self._sock = self._connect()
        try:
            hello = self._call("hello", {})
        except BaseException:
            self.close()
            raise
        if not isinstance(hello, dict) or hello.get("api_version") != API_VERSION:
            self.close()
            raise ControlError("protocol", f"unsupported control API: {hello!r}")
        self.server = hello
        return hello

    def _connect(self) -> socket.socket:
        """Connect: to the admins' socket when we may, else to the shared one.

        The admins' socket (sockfile.admin_socket_path) is one that other uids cannot reach, so
        their connections cannot delay ours; any failure there falls back to the shared socket.
        """
        admin = admin_socket_path(self.path)
        if os.access(admin, os.W_OK):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(admin)
            except OSError:
                sock.close()
            else:
                return sock
        return self._connect_shared()

    def _connect_shared(self) -> socket.socket:
        """Connect, retrying for a short while when the listen backlog is full (EAGAIN)."""
        deadline = time.monotonic() + min(self.timeout, BUSY_RETRY_S)
        pause = 0.01
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                if exc.errno == errno.EAGAIN and time.monotonic() + pause < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.2)
                    continue
                raise DaemonUnreachable(self.path, exc.strerror or str(exc), exc.errno) from exc
            return sock

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call `method` and return its result; raise ControlError on an error reply."""
        self.connect()
        return self._call(method, params or {})

    def subscribe(
        self, method: str, params: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Call a streaming method (`watch`) now, and return an iterator of notification params."""
        self.connect()
        params = params or {}
        self._call(method, params)
        assert self._sock is not None
        # Notifications arrive once per interval; allow for a slow daemon on top of that.
        interval = float(params.get("interval", 1.0))
        self._sock.settimeout(2 * interval + self.timeout)
        return self._stream()

    def _stream(self) -> Iterator[dict[str, Any]]:
        while True:
            _, body = self._next_notification()
            if isinstance(body, dict):
                yield body

    def _call(self, method: str, params: dict[str, Any]) -> Any:
        self._msgid = (self._msgid + 1) % 2**32
        msgid = self._msgid
        self._send(encode_request(msgid, method, params))
        while True:
            frame = self._read_frame()
            if frame[0] == NOTIFICATION:
                self._pending.append((frame[1], frame[2]))
                continue
            _, reply_id, error, result = frame
            if reply_id is None and error is not None:
                # The server could not read our stream and is closing it.
                raise ControlError(str(error.get("code")), str(error.get("message")))
            if reply_id != msgid:
                continue
            if error is not None:
                raise ControlError(str(error.get("code")), str(error.get("message")))
            return result

    def _next_notification(self) -> tuple[str, Any]:
        if self._pending:
            return self._pending.popleft()
        while True:
            frame = self._read_frame()
            if frame[0] == NOTIFICATION:
                return frame[1], frame[2]
            if frame[1] is None and frame[2] is not None:
                raise ControlError(str(frame[2].get("code")), str(frame[2].get("message")))

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except TimeoutError as exc:
            raise ControlError("timeout", f"no progress writing to {self.path}") from exc
        except OSError as exc:
            self.close()
            raise ControlError("disconnected", f"{self.path}: {exc.strerror or exc}") from exc

    def _read_frame(self) -> list[Any]:
        while True:
            try:
                got = self._frames.next_frame()
            except FrameError as exc:
                self.close()
                raise ControlError("protocol", exc.message.replace("frame", "reply", 1)) from exc
            if got is not None:
                frame = got[0]
                if not well_formed_reply(frame):
                    self.close()
                    raise ControlError("protocol", f"unexpected frame: {frame!r:.200}")
                return list(frame)
            self._fill()

    def _fill(self) -> None:
        if self._sock is None:
            raise ControlError("disconnected", f"connection to {self.path} is closed")
        try:
            data = self._sock.recv(65536)
        except TimeoutError as exc:
            raise ControlError("timeout", f"no reply from {self.path} in time") from exc
        except OSError as exc:
            self.close()
            raise ControlError("disconnected", f"{self.path}: {exc.strerror or exc}") from exc
        if not data:
            self.close()
            raise ControlError("disconnected", f"the daemon closed {self.path}")
        try:
            self._frames.feed(data)
        except FrameError as exc:
            # The rest of the stream cannot be framed any more: give up on the connection.
            self.close()
            raise ControlError(
                "protocol", f"reply from {self.path} exceeds {MAX_REPLY} bytes"
            ) from exc
