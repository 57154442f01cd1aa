"""Unix-socket control server speaking MessagePack-RPC (see docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import math
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import structlog

from echod import __version__
from echod.errors import RequestError

log = structlog.get_logger("echod.control")

API_VERSION = 1
REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2

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
    "listen_failed",
    "busy",
    "internal",
)

MAX_FRAME = 64 * 1024
READ_CHUNK = 4096
# A peer may pause between frames for ever, but not in the middle of one.
PARTIAL_FRAME_TIMEOUT = 10.0
# A peer that stops reading its replies is dropped rather than buffered for without bound.
WRITE_TIMEOUT = 30.0
MAX_CLIENTS = 64
MODES = ("auto", "kernel", "user")
MIN_INTERVAL, MAX_INTERVAL, DEFAULT_INTERVAL = 0.1, 60.0, 1.0

READ_ONLY_METHODS = ("hello", "status", "stats", "watch")
MUTATING_METHODS = ("start", "stop", "restart", "reload")
METHODS = READ_ONLY_METHODS + MUTATING_METHODS

_UCRED = struct.Struct("3i")


class ControlTarget(Protocol):
    """What the control server drives: the daemon's service object."""

    def status(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...

    async def start(self, mode: str | None = None, port: int | None = None) -> dict[str, Any]: ...

    async def stop(self) -> dict[str, Any]: ...

    async def restart(self, mode: str | None = None) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PeerCred:
    """Credentials of a connected client, as the kernel reported them at connect()."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


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
        _check_keys(params, ("mode", "port"))
        return {"mode": _opt_mode(params), "port": _opt_port(params)}
    if method == "restart":
        _check_keys(params, ("mode",))
        return {"mode": _opt_mode(params)}
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


def describe_exception(exc: BaseException) -> str:
    """The class name of `exc`, and its message when it has one (msgpack's are often empty)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def is_admin(peer: PeerCred, own_uid: int, admin_gid: int | None) -> bool:
    """Whether `peer` may call mutating methods."""
    if peer.uid in (0, own_uid):
        return True
    return admin_gid is not None and (peer.gid == admin_gid or admin_gid in peer.groups)


def read_groups(pid: int, uid: int) -> frozenset[int]:
    """Supplementary groups of process `pid`, or none if it is gone or no longer `uid`'s."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    # The pid may have been reused since connect(); only trust it while the uid still matches.
    real_uid = fields.get("Uid", "").split()[:1]
    if real_uid != [str(uid)]:
        return frozenset()
    return frozenset(int(g) for g in fields.get("Groups", "").split() if g.isdigit())


def peer_cred(sock: Any) -> PeerCred:
    """Read SO_PEERCRED from a connected Unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    groups = read_groups(pid, uid) if pid > 0 else frozenset()
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=groups)


def _resolve_group(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    return grp.getgrnam(group).gr_gid


def _answers(path: str) -> bool:
    """Whether something accepts connections on the Unix socket at `path` (OSError: can't tell)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except (BlockingIOError, TimeoutError):
            # A full backlog (EAGAIN on a Unix socket) still means a live listener.
            return True
        except OSError as exc:
            # EACCES (a socket we may not connect to), EPROTOTYPE (a datagram socket), ...: we
            # cannot tell whether it is in use, so it is not ours to remove.
            raise OSError(
                exc.errno,
                f"{path} exists and cannot be probed ({exc.strerror or exc}); "
                "not removing it: remove it by hand if no daemon uses it",
                path,
            ) from exc
    return True


LINGER_TIMEOUT = 1.0
LINGER_BYTES = 4 * 1024 * 1024


class _Conn:
    """One client connection: its stream, credentials and optional watch task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = PeerCred(pid=0, uid=-1, gid=-1, groups=frozenset())
        self.watch: asyncio.Task[None] | None = None
        self.bad_requests = 0

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self.writer.drain()


class ControlServer:
    """Serve the control protocol on a Unix stream socket for one ControlTarget."""

    def __init__(
        self,
        path: str,
        target: ControlTarget,
        *,
        mode: int = 0o660,
        group: str | None = None,
        admin_group: str | None = None,
    ) -> None:
        self.path = path
        self.target = target
        self.mode = mode
        self.group = group
        self.admin_group = admin_group
        self._gid = _resolve_group(group)
        self._admin_gid = _resolve_group(admin_group)
        self._own_uid = os.geteuid()
        self._server: asyncio.AbstractServer | None = None
        self._inode: int | None = None
        self._conns: dict[asyncio.Task[Any], _Conn] = {}
        # Mutating calls run one at a time so start/stop from two clients cannot interleave.
        self._mutate_lock = asyncio.Lock()
        self._handlers: dict[str, Callable[[_Conn, dict[str, Any]], Awaitable[Any]]] = {
            "hello": self._hello,
            "status": self._status,
            "stats": self._stats,
            "watch": self._watch,
            **{method: self._mutator(method) for method in MUTATING_METHODS},
        }

    @property
    def active_clients(self) -> int:
        """Connected control clients."""
        return len(self._conns)

    @property
    def active_watchers(self) -> int:
        """Running watch streams."""
        return sum(1 for c in self._conns.values() if c.watch is not None and not c.watch.done())

    async def start(self) -> None:
        """Bind the socket (chmod/chgrp before it becomes visible) and start accepting."""
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(self._on_connect, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise
        log.info("control.listening", path=self.path, mode=oct(self.mode), group=self.group)

    def _bind(self) -> socket.socket:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, mode=0o755, exist_ok=True)
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = os.path.join(parent, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            # Permissions are set on a private name, then renamed in: no window where the
            # socket is reachable with the umask's permissions.
            os.chmod(tmp, self.mode)
            if self._gid is not None:
                os.chown(tmp, -1, self._gid)
            sock.listen(16)
            os.rename(tmp, self.path)
            self._inode = os.stat(self.path).st_ino
            sock.setblocking(False)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return sock

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{self.path} exists and is not a socket", self.path)
        if _answers(self.path):
            raise OSError(errno.EADDRINUSE, f"another daemon answers on {self.path}", self.path)
        log.info("control.stale_socket_removed", path=self.path)
        os.unlink(self.path)

    def _unlink(self) -> None:
        # Only remove the file we bound: a newer daemon may already own the path.
        if self._inode is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    async def close(self) -> None:
        """Stop accepting, end every client and watch stream, and remove the socket file."""
        try:
            if self._server is not None:
                self._server.close()
            tasks = list(self._conns)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self._server.wait_closed()
        finally:
            self._server = None
            self._unlink()
            log.info("control.closed", path=self.path)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(reader, writer)
        self._conns[task] = conn
        try:
            conn.peer = peer_cred(writer.get_extra_info("socket"))
            if len(self._conns) > MAX_CLIENTS:
                log.warning("control.busy", uid=conn.peer.uid, pid=conn.peer.pid)
                await conn.send(
                    encode_response(None, error_body("busy", "too many control clients"), None)
                )
                return
            log.debug("control.connected", uid=conn.peer.uid, pid=conn.peer.pid)
            await self._serve(conn)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("control.client_lost", uid=conn.peer.uid, pid=conn.peer.pid, error=str(exc))
        except asyncio.CancelledError:
            # close() cancels us; finish quietly so the task does not report an error.
            pass
        except Exception:
            log.exception("control.client_failed", uid=conn.peer.uid, pid=conn.peer.pid)
        finally:
            if conn.watch is not None:
                conn.watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await conn.watch
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            del self._conns[task]
            log.debug(
                "control.disconnected",
                uid=conn.peer.uid,
                pid=conn.peer.pid,
                bad_requests=conn.bad_requests,
            )

    async def _serve(self, conn: _Conn) -> None:
        # Room for one whole MAX_FRAME plus the read that completes it; frame size is checked
        # exactly below with tell().
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME + READ_CHUNK)
        # tell() also advances over a partly decoded frame, so track where frames end.
        fed = boundary = 0
        while True:
            partial = fed > boundary
            try:
                async with asyncio.timeout(PARTIAL_FRAME_TIMEOUT if partial else None):
                    data = await conn.reader.read(READ_CHUNK)
            except TimeoutError:
                await self._fatal(conn, "invalid_request", "incomplete frame timed out")
                return
            if not data:
                return
            try:
                unpacker.feed(data)
            except msgpack.BufferFull:
                await self._fatal(conn, "frame_too_large", f"frames are limited to {MAX_FRAME} B")
                return
            fed += len(data)
            while True:
                try:
                    frame = unpacker.unpack()
                except msgpack.OutOfData:
                    break
                except (ValueError, msgpack.UnpackException) as exc:
                    # Undecodable bytes leave no frame boundary to resync on.
                    message = f"undecodable frame: {describe_exception(exc)}"
                    await self._fatal(conn, "invalid_request", message)
                    return
                size, boundary = unpacker.tell() - boundary, unpacker.tell()
                await self._handle(conn, frame, size)

    async def _fatal(self, conn: _Conn, code: str, message: str) -> None:
        conn.bad_requests += 1
        log.info("control.dropped", code=code, uid=conn.peer.uid, pid=conn.peer.pid)
        await conn.send(encode_response(None, error_body(code, message), None))
        # Closing with unread input makes the kernel reset the peer, which can then lose the
        # error reply: half-close, and discard what is still arriving for a bounded while.
        if conn.writer.can_write_eof():
            conn.writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                discarded = 0
                while discarded < LINGER_BYTES and (data := await conn.reader.read(READ_CHUNK)):
                    discarded += len(data)

    async def _handle(self, conn: _Conn, frame: Any, size: int) -> None:
        # Read first, so that every refusal of a frame that starts like a request carries it.
        msgid = request_msgid(frame)
        try:
            if size > MAX_FRAME:
                raise RequestError("frame_too_large", f"frames are limited to {MAX_FRAME} B")
            msgid, method, params = parse_request(frame)
            if method not in self._handlers:
                raise RequestError("unknown_method", f"unknown method {method!r}")
            if method in MUTATING_METHODS and not is_admin(
                conn.peer, self._own_uid, self._admin_gid
            ):
                log.warning("control.denied", method=method, uid=conn.peer.uid, pid=conn.peer.pid)
                raise RequestError("permission_denied", f"{method} needs an admin (uid 0 or group)")
            kwargs = validate_params(method, params)
            result = await self._handlers[method](conn, kwargs)
        except RequestError as exc:
            if exc.code != "permission_denied":
                conn.bad_requests += 1
                log.debug("control.refused", code=exc.code, uid=conn.peer.uid, pid=conn.peer.pid)
            await conn.send(encode_response(msgid, error_body(exc.code, exc.message), None))
            return
        except Exception as exc:
            log.exception("control.internal_error", msgid=msgid)
            await conn.send(encode_response(msgid, error_body("internal", repr(exc)), None))
            return
        await conn.send(encode_response(msgid, None, result))
        if method == "watch":
            # Started only once the acknowledgement is written, so it precedes the first
            # notification on the wire.
            conn.watch = asyncio.create_task(self._watch_loop(conn, kwargs["interval"]))

    async def _hello(self, conn: _Conn, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {
            "api_version": API_VERSION,
            "methods": list(METHODS),
            "version": __version__,
            "pid": os.getpid(),
            "peer": {
                "uid": conn.peer.uid,
                "gid": conn.peer.gid,
                "pid": conn.peer.pid,
                "admin": is_admin(conn.peer, self._own_uid, self._admin_gid),
            },
        }

    def _control_info(self) -> dict[str, int]:
        return {"clients": self.active_clients, "watchers": self.active_watchers}

    async def _status(self, conn: _Conn, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {**self.target.status(), "control": self._control_info()}

    async def _stats(self, conn: _Conn, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.target.stats()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "time": time.time(),
            "status": {**self.target.status(), "control": self._control_info()},
            "stats": self.target.stats(),
        }

    async def _watch(self, conn: _Conn, kwargs: dict[str, Any]) -> dict[str, Any]:
        if conn.watch is not None:
            raise RequestError("bad_state", "this connection is already watching")
        # _handle starts the stream after this acknowledgement is sent.
        return {"subscribed": True, "interval": kwargs["interval"], "notification": "stats"}

    async def _watch_loop(self, conn: _Conn, interval: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        try:
            while True:
                await conn.send(encode_notification("stats", self._snapshot()))
                deadline += interval
                # Fixed cadence; if we fell behind (slow reader), skip the missed ticks.
                now = loop.time()
                if deadline < now:
                    deadline = now + interval
                await asyncio.sleep(deadline - now)
        except (ConnectionError, TimeoutError):
            # The peer went away or stopped reading; closing makes its handler see EOF.
            conn.writer.close()
        except Exception:
            # A failing status()/stats() must not leave the client waiting for ever.
            log.exception("control.watch_failed", uid=conn.peer.uid, pid=conn.peer.pid)
            conn.writer.close()

    def _mutator(self, method: str) -> Callable[[_Conn, dict[str, Any]], Awaitable[Any]]:
        """The handler of a mutating method: logged with the caller, run one at a time."""

        async def handler(conn: _Conn, kwargs: dict[str, Any]) -> Any:
            log.info(f"control.{method}", uid=conn.peer.uid, pid=conn.peer.pid, **kwargs)
            async with self._mutate_lock:
                return await getattr(self.target, method)(**kwargs)

        return handler
