"""The control protocol's wire format, shared by the daemon and echoctl (docs/protocol.md).

MessagePack-RPC frames: a request `[0, msgid, method, params]`, a response
`[1, msgid, error, result]` and a notification `[2, method, params]`. This module holds the
constants both ends agree on, the error codes and `RequestError`, encoding, the checks of a
request and of a reply, and the one frame reader (`FrameReader`) that the control server, the
worker channel and echoctl's client all read with; none of them defines any of this again.
"""

from __future__ import annotations

import math
import os
from typing import Any, Protocol

import msgpack

from echod.config.schema import MODES
from echod.control.replies import CheckReport, ProcessStatus, Stats, Status

API_VERSION = 1
REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2  # the first element of every frame

# Every `code` a response error can carry; docs/protocol.md explains each one.
ERROR_CODES = (
    "invalid_request",
    "unknown_method",
    "invalid_params",
    "frame_too_large",
    "permission_denied",
    "bad_state",
    "invalid_config",
    "not_supported",
    "self_check_failed",
    "listen_failed",
    "busy",
    "internal",
)
# The largest request frame the daemon reads; replies are not capped this way.
MAX_FRAME = 64 * 1024

MIN_INTERVAL, MAX_INTERVAL, DEFAULT_INTERVAL = 0.1, 60.0, 1.0

READ_ONLY_METHODS = ("hello", "status", "stats", "watch")
MUTATING_METHODS = ("start", "stop", "restart", "reload", "check")
METHODS = READ_ONLY_METHODS + MUTATING_METHODS


class RequestError(Exception):
    """A control request that cannot be carried out; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlTarget(Protocol):
    """What the control methods act on: the daemon (daemon.Daemon) serves every one of them."""

    async def status(self) -> Status: ...

    async def stats(self) -> Stats: ...

    async def start(
        self, mode: str | None = None, port: int | None = None, bypass: bool | None = None
    ) -> ProcessStatus: ...

    async def stop(self) -> ProcessStatus: ...

    async def restart(
        self, mode: str | None = None, bypass: bool | None = None
    ) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...

    async def check(self) -> CheckReport: ...


def encode_request(msgid: int, method: str, params: dict[str, Any] | None = None) -> bytes:
    """Pack a request frame."""
    return msgpack.packb([REQUEST, msgid, method, params or {}])


def encode_response(msgid: int | None, error: dict[str, str] | None, result: Any) -> bytes:
    """Pack a response frame; `msgid` is None when the request could not be read."""
    return msgpack.packb([RESPONSE, msgid, error, result])


def encode_notification(method: str, params: Any) -> bytes:
    """Pack a notification frame."""
    return msgpack.packb([NOTIFICATION, method, params])


def error_body(code: str, message: str) -> dict[str, str]:
    """Build the error map of a response."""
    return {"code": code, "message": message}


def _check_keys(params: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in params if k not in allowed)
    if unknown:
        raise RequestError("invalid_params", f"unknown parameter(s): {', '.join(unknown)}")


def _opt_mode(params: dict[str, Any]) -> str | None:
    mode = params.get("mode")
    if mode is None:
        return None
    if not isinstance(mode, str) or mode not in MODES:
        raise RequestError("invalid_params", f"mode must be one of {', '.join(MODES)}")
    return mode


def _opt_port(params: dict[str, Any]) -> int | None:
    port = params.get("port")
    if port is None:
        return None
    # bool is an int subclass; True is not a port.
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise RequestError("invalid_params", "port must be an integer in 1..65535")
    return port


def _opt_bypass(params: dict[str, Any]) -> bool | None:
    bypass = params.get("bypass")
    if bypass is None or isinstance(bypass, bool):
        return bypass
    raise RequestError("invalid_params", "bypass must be true or false")


def _interval(params: dict[str, Any]) -> float:
    value = params.get("interval", DEFAULT_INTERVAL)
    if value is None:
        return DEFAULT_INTERVAL
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError("invalid_params", "interval must be a number of seconds")
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        raise RequestError(
            "invalid_params", f"interval must be between {MIN_INTERVAL} and {MAX_INTERVAL} s"
        )
    return float(value)


def validate_params(method: str, params: Any) -> dict[str, Any]:
    """Check a request's params for `method` and return the keyword arguments to call with."""
    if method not in METHODS:
        raise RequestError("unknown_method", f"unknown method {method!r}")
    # An empty array is what generic MessagePack-RPC clients send for "no arguments".
    if params is None or params == []:
        params = {}
    if not isinstance(params, dict):
        raise RequestError("invalid_params", "params must be a map of named parameters")
    if method == "start":
        _check_keys(params, ("mode", "port", "bypass"))
        return {"mode": _opt_mode(params), "port": _opt_port(params), "bypass": _opt_bypass(params)}
    if method == "restart":
        _check_keys(params, ("mode", "bypass"))
        return {"mode": _opt_mode(params), "bypass": _opt_bypass(params)}
    if method == "watch":
        _check_keys(params, ("interval",))
        return {"interval": _interval(params)}
    _check_keys(params, ())
    return {}


def _valid_msgid(msgid: Any) -> bool:
    # bool is an int subclass; True is not a msgid.
    return not isinstance(msgid, bool) and isinstance(msgid, int) and 0 <= msgid < 2**32


def request_msgid(frame: Any) -> int | None:
    """The msgid of a frame that starts like a request `[0, msgid, ...]`, else None."""
    if isinstance(frame, list | tuple) and len(frame) >= 2 and frame[0] == REQUEST:
        if _valid_msgid(frame[1]):
            return int(frame[1])
    return None


def parse_request(frame: Any) -> tuple[int, str, Any]:
    """Split a decoded request frame into (msgid, method, params) or raise invalid_request."""
    if not isinstance(frame, list | tuple) or len(frame) != 4 or frame[0] != REQUEST:
        raise RequestError("invalid_request", "expected a request [0, msgid, method, params]")
    _, msgid, method, params = frame
    if not _valid_msgid(msgid):
        raise RequestError("invalid_request", "msgid must be an unsigned 32-bit integer")
    if not isinstance(method, str):
        raise RequestError("invalid_request", "method must be a string")
    return msgid, method, params


class FrameError(Exception):
    """The stream cannot be framed any more: a frame too large, or bytes that do not decode.

    Undecodable bytes leave no frame boundary to resynchronise on, so the stream is done.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # frame_too_large, or invalid_request for bytes that do not decode
        self.message = message


class FrameReader:
    """Frames out of a byte stream, each with its size in bytes.

    max_buffer bounds what is held of frames not yet complete (None: no bound). feed() raises
    FrameError once a stream would hold more; next_frame() raises it for undecodable bytes.
    """

    def __init__(self, max_buffer: int | None = None, *, strict_map_key: bool = True) -> None:
        if max_buffer is None:
            self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=strict_map_key)
        else:
            self._unpacker = msgpack.Unpacker(
                raw=False, strict_map_key=strict_map_key, max_buffer_size=max_buffer
            )
        self.max_buffer = max_buffer
        self.fed = 0  # bytes fed so far
        self.boundary = 0  # where the last whole frame ended (tell() also moves within one)

    def feed(self, data: bytes) -> None:
        """Add bytes read from the stream."""
        try:
            self._unpacker.feed(data)
        except msgpack.BufferFull as exc:
            raise FrameError("frame_too_large", f"more than {self.max_buffer} B unframed") from exc
        self.fed += len(data)

    @property
    def partial(self) -> bool:
        """Whether bytes of a frame not yet complete are held."""
        return self.fed > self.boundary

    def next_frame(self) -> tuple[Any, int] | None:
        """The next whole frame and its size, or None until more bytes are fed."""
        try:
            frame = self._unpacker.unpack()
        except msgpack.OutOfData:
            return None
        except (ValueError, msgpack.UnpackException) as exc:
            message = f"undecodable frame: {describe_exception(exc)}"
            raise FrameError("invalid_request", message) from exc
        end = self._unpacker.tell()
        size, self.boundary = end - self.boundary, end
        return frame, size


def describe_exception(exc: BaseException) -> str:
    """The class name of `exc`, and its message when it has one (msgpack's are often empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def well_formed_reply(frame: Any) -> bool:
    """Whether a frame the daemon sent is a response or a notification of the right shape."""
    if not isinstance(frame, list) or not frame:
        return False
    if frame[0] == RESPONSE:
        return len(frame) == 4 and (frame[2] is None or isinstance(frame[2], dict))
    return frame[0] == NOTIFICATION and len(frame) == 3


def admin_socket_path(control: str) -> str:
    """The admin-only control socket beside `control`: control.sock → control.admin.sock.

    Only admins may connect to it (mode 0600, or 0660 with the admin group), so no other uid
    can fill its accept queue or its slots: `echoctl` uses it when it may.
    """
    root, ext = os.path.splitext(control)
    return f"{root}.admin{ext or '.sock'}"
