"""Unix-socket control server speaking MessagePack-RPC (see docs/protocol.md)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import math
import os
import resource
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import msgpack
import structlog

from echod import __version__
from echod.config import MODES
from echod.errors import RequestError
from echod.logs import RateLimited
from echod.peercred import PeerCred, is_admin, peer_cred

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
# A peer may pause between frames for ever, but must finish a frame once started: a deadline
# for the whole frame from its first byte, not a timeout that each byte renews.
PARTIAL_FRAME_TIMEOUT = 10.0
# A connection whose first frame is not complete by then is closed, so that idle connections
# cannot hold slots.
IDLE_TIMEOUT = 5.0
# A peer that stops reading its replies is dropped (its transport aborted) once one write has
# waited this long for the kernel to take it.
WRITE_TIMEOUT = 30.0
# Slots: MAX_CLIENTS for everyone, of which one unprivileged uid may hold MAX_CLIENTS_PER_UID;
# RESERVED_CLIENTS more are for admins only (root, the daemon's uid, the admin group).
MAX_CLIENTS = 64
MAX_CLIENTS_PER_UID = 8
RESERVED_CLIENTS = 16
LISTEN_BACKLOG = 1024
# Descriptors the echo service leaves free (it refuses connections this far below
# RLIMIT_NOFILE): every control slot, plus the daemon's own files (BPF, epoll, metrics, ...).
FD_RESERVE = MAX_CLIENTS + RESERVED_CLIENTS + 64
# Per-uid log events (control.denied, control.busy): this many per period, then a count.
LOG_BURST, LOG_PERIOD = 5, 5.0
MIN_INTERVAL, MAX_INTERVAL, DEFAULT_INTERVAL = 0.1, 60.0, 1.0

READ_ONLY_METHODS = ("hello", "status", "stats", "watch")
MUTATING_METHODS = ("start", "stop", "restart", "reload")
METHODS = READ_ONLY_METHODS + MUTATING_METHODS


class ControlTarget(Protocol):
    """What the control server drives: the daemon's service object."""

    def status(self) -> dict[str, Any]: ...

    def stats(self) -> dict[str, Any]: ...

    async def start(self, mode: str | None = None, port: int | None = None) -> dict[str, Any]: ...

    async def stop(self) -> dict[str, Any]: ...

    async def restart(self, mode: str | None = None) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...


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


def slot_refusal(admin: bool, uid: int, total: int, of_uid: int) -> str | None:
    """Why a new client gets no slot, or None; `total` and `of_uid` are the slots held now."""
    if admin:
        if total >= MAX_CLIENTS + RESERVED_CLIENTS:
            return "too many control clients"
        return None
    if total >= MAX_CLIENTS:
        return "too many control clients"
    if of_uid >= MAX_CLIENTS_PER_UID:
        return f"too many control clients for uid {uid} (at most {MAX_CLIENTS_PER_UID})"
    return None


def echo_fd_budget() -> int:
    """Descriptors the echo service may use: RLIMIT_NOFILE's soft limit less FD_RESERVE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE


def check_fd_budget(max_connections: int) -> None:
    """Warn when max_connections cannot be reached under the fd limit."""
    budget = echo_fd_budget()
    if max_connections > budget:
        log.warning(
            "daemon.fd_limit_low",
            max_connections=max_connections,
            nofile=budget + FD_RESERVE,
            fd_reserve=FD_RESERVE,
            connections_possible=max(budget, 0),
            hint="raise LimitNOFILE= (ulimit -n) or lower max_connections",
        )


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
# How often suppressed log counts are written out once their window is over.
HOUSEKEEPING = 1.0
# Watchers share one snapshot (and its encoding) while it is younger than this: the cost of
# watching is bounded by the clock, not by the number of watchers.
SNAPSHOT_MAX_AGE = MIN_INTERVAL / 2


class _Conn:
    """One client connection: its stream, credentials and optional watch task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = PeerCred(pid=0, uid=-1, gid=-1, groups=frozenset())
        self.admin = False
        self.slot = False
        self.watch: asyncio.Task[None] | None = None
        self.bad_requests = 0
        # No queue in user space: each write waits until the kernel has taken all of it, so
        # WRITE_TIMEOUT measures how long the peer has not been reading.
        writer.transport.set_write_buffer_limits(high=0)

    async def send(self, frame: bytes) -> None:
        self.writer.write(frame)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await self.writer.drain()

    def abort(self) -> None:
        """Drop the connection now, with whatever is still unsent."""
        self.writer.transport.abort()

    async def close(self) -> None:
        """Close, or abort when output is still queued: close() would wait for a peer that
        does not read, and wait_closed() would never return."""
        if self.writer.transport.get_write_buffer_size():
            self.abort()
        else:
            self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LINGER_TIMEOUT):
                await self.writer.wait_closed()


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
        self._slots: Counter[int] = Counter()  # slots held, by uid
        self._limiter = RateLimited(burst=LOG_BURST, period=LOG_PERIOD)
        self._housekeeping: asyncio.Task[None] | None = None
        self._shared: tuple[float, bytes] | None = None  # (loop time, encoded notification)
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
        """Control clients holding a slot."""
        return self._slots.total()

    @property
    def active_watchers(self) -> int:
        """Running watch streams."""
        return sum(1 for c in self._conns.values() if c.watch is not None and not c.watch.done())

    async def start(self) -> None:
        """Bind the socket (chmod/chgrp before it becomes visible) and start accepting."""
        sock = self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, backlog=LISTEN_BACKLOG
            )
        except BaseException:
            sock.close()
            self._unlink()
            raise
        self._housekeeping = asyncio.create_task(self._report_suppressed())
        log.info("control.listening", path=self.path, mode=oct(self.mode), group=self.group)
        # The target is the service: its config says how many echo connections it may hold.
        max_connections = getattr(getattr(self.target, "config", None), "max_connections", None)
        if isinstance(max_connections, int):
            check_fd_budget(max_connections)

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
            sock.listen(LISTEN_BACKLOG)
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
            if self._housekeeping is not None:
                tasks.append(self._housekeeping)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            if self._server is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self._server.wait_closed()
        finally:
            self._server = self._housekeeping = None
            self._unlink()
            log.info("control.closed", path=self.path)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Conn(reader, writer)
        self._conns[task] = conn
        try:
            conn.peer = peer_cred(writer.get_extra_info("socket"))
            conn.admin = is_admin(conn.peer, self._own_uid, self._admin_gid)
            refusal = slot_refusal(
                conn.admin, conn.peer.uid, self._slots.total(), self._slots[conn.peer.uid]
            )
            if refusal is not None:
                self._log_limited("control.busy", conn, reason=refusal)
                await conn.send(encode_response(None, error_body("busy", refusal), None))
                return
            conn.slot = True
            self._slots[conn.peer.uid] += 1
            log.debug("control.connected", uid=conn.peer.uid, pid=conn.peer.pid)
            await self._serve(conn)
        except TimeoutError:
            log.info("control.dropped", reason="not reading", uid=conn.peer.uid, pid=conn.peer.pid)
        except ConnectionError as exc:
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
            await conn.close()
            if conn.slot:
                self._slots[conn.peer.uid] -= 1
                if self._slots[conn.peer.uid] <= 0:
                    del self._slots[conn.peer.uid]
            del self._conns[task]
            log.debug(
                "control.disconnected",
                uid=conn.peer.uid,
                pid=conn.peer.pid,
                bad_requests=conn.bad_requests,
            )

    async def _serve(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        # Room for one whole MAX_FRAME plus the read that completes it; frame size is checked
        # exactly below with tell().
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME + READ_CHUNK)
        # tell() also advances over a partly decoded frame, so track where frames end.
        fed = boundary = 0
        first_by: float | None = loop.time() + IDLE_TIMEOUT  # None once a frame has arrived
        started: float | None = None  # when the first byte of an incomplete frame arrived
        while True:
            deadline = first_by
            if started is not None:
                frame_by = started + PARTIAL_FRAME_TIMEOUT
                deadline = frame_by if deadline is None else min(deadline, frame_by)
            try:
                async with asyncio.timeout_at(deadline):
                    data = await conn.reader.read(READ_CHUNK)
            except TimeoutError:
                if fed > boundary:
                    await self._fatal(conn, "invalid_request", "incomplete frame timed out")
                else:
                    log.debug("control.idle_timeout", uid=conn.peer.uid, pid=conn.peer.pid)
                    message = f"no request within {IDLE_TIMEOUT:g} s of connecting"
                    await conn.send(
                        encode_response(None, error_body("invalid_request", message), None)
                    )
                return
            if not data:
                return
            now = loop.time()
            try:
                unpacker.feed(data)
            except msgpack.BufferFull:
                await self._fatal(conn, "frame_too_large", f"frames are limited to {MAX_FRAME} B")
                return
            fed += len(data)
            before = boundary
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
                first_by = None
                await self._handle(conn, frame, size)
                # A read can hold hundreds of pipelined requests: let the echo path run between.
                await asyncio.sleep(0)
            if fed == boundary:
                started = None
            elif started is None or boundary != before:
                started = now

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

    def _log_limited(self, event: str, conn: _Conn, **fields: Any) -> None:
        """A warning, at most LOG_BURST per LOG_PERIOD per event and uid; the rest are counted."""
        ok, suppressed = self._limiter.allow(event, key=conn.peer.uid)
        if ok:
            extra = {"suppressed": suppressed} if suppressed else {}
            log.warning(event, uid=conn.peer.uid, pid=conn.peer.pid, **fields, **extra)

    async def _report_suppressed(self) -> None:
        """Write out what the limiter suppressed once each window is over."""
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            for event, uid, count in self._limiter.expired():
                log.warning(event, uid=uid, suppressed=count)

    async def _handle(self, conn: _Conn, frame: Any, size: int) -> None:
        # Read first, so that every refusal of a frame that starts like a request carries it.
        msgid = request_msgid(frame)
        try:
            if size > MAX_FRAME:
                raise RequestError("frame_too_large", f"frames are limited to {MAX_FRAME} B")
            msgid, method, params = parse_request(frame)
            if method not in self._handlers:
                raise RequestError("unknown_method", f"unknown method {method!r}")
            if method in MUTATING_METHODS and not conn.admin:
                self._log_limited("control.denied", conn, method=method)
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
                "admin": conn.admin,
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

    def _notification(self) -> bytes:
        """The watch notification, taken and encoded once per SNAPSHOT_MAX_AGE for everyone."""
        now = asyncio.get_running_loop().time()
        if self._shared is None or now - self._shared[0] >= SNAPSHOT_MAX_AGE:
            self._shared = (now, encode_notification("stats", self._snapshot()))
        return self._shared[1]

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
                await conn.send(self._notification())
                deadline += interval
                # Fixed cadence; if we fell behind (slow reader), skip the missed ticks.
                now = loop.time()
                if deadline < now:
                    deadline = now + interval
                await asyncio.sleep(deadline - now)
        except TimeoutError:
            # The peer stopped reading: drop it, so its handler sees the end of the stream.
            log.info("control.dropped", reason="not reading", uid=conn.peer.uid, pid=conn.peer.pid)
            conn.abort()
        except ConnectionError:
            conn.abort()
        except Exception:
            # A failing status()/stats() must not leave the client waiting for ever.
            log.exception("control.watch_failed", uid=conn.peer.uid, pid=conn.peer.pid)
            conn.abort()

    def _mutator(self, method: str) -> Callable[[_Conn, dict[str, Any]], Awaitable[Any]]:
        """The handler of a mutating method: logged with the caller, run one at a time."""

        async def handler(conn: _Conn, kwargs: dict[str, Any]) -> Any:
            log.info(f"control.{method}", uid=conn.peer.uid, pid=conn.peer.pid, **kwargs)
            async with self._mutate_lock:
                return await getattr(self.target, method)(**kwargs)

        return handler
