"""The control socket's server: MessagePack-RPC on a Unix socket (see docs/protocol.md).

It owns the socket file (created with its mode and group before it is visible, a stale one
replaced only when nothing answers it, removed at close), the slots per uid, the dispatch of
requests, and the watch streams. One client's stream and its framing with their deadlines are
connection.py's; the wire format is protocol.py's; what each method does is the target's (the
daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from echod import __version__
from echod.config.validators import SUN_PATH_MAX, control_temp_path
from echod.control.connection import Connection
from echod.control.limits import slot_refusal
from echod.control.peercred import is_admin, peer_cred
from echod.control.protocol import (
    API_VERSION,
    MAX_FRAME,
    METHODS,
    MIN_INTERVAL,
    MUTATING_METHODS,
    ControlTarget,
    FrameError,
    RequestError,
    admin_socket_path,
    encode_notification,
    encode_response,
    error_body,
    parse_request,
    request_msgid,
    validate_params,
)
from echod.control.replies import ControlFigures, Stats, Status
from echod.control.socketfile import SocketFile, resolve_group
from echod.logs import RateLimited

log = structlog.get_logger("echod.control")


LISTEN_BACKLOG = 1024
# Per-uid log events (control.denied, control.busy, control.dropped): this many per period,
# then a count.
LOG_BURST, LOG_PERIOD = 5, 5.0
_INFO_EVENTS = frozenset({"control.dropped"})

# How often suppressed log counts are written out once their window is over.
HOUSEKEEPING = 1.0
# Watchers share one snapshot (and its encoding) while it is younger than this: the cost of
# watching is bounded by the clock, not by the number of watchers.
SNAPSHOT_MAX_AGE = MIN_INTERVAL / 2


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
        self._file = SocketFile(path, mode, resolve_group(group))
        self._admin_gid = resolve_group(admin_group)
        # The admins' own socket: 0600 (root and the daemon's uid), 0660 with the admin group.
        self.admin_path = admin_socket_path(path)
        admin_mode = 0o600 if self._admin_gid is None else 0o660
        self._admin_file = SocketFile(self.admin_path, admin_mode, self._admin_gid)
        self._own_uid = os.geteuid()
        self._server: asyncio.AbstractServer | None = None
        self._admin_server: asyncio.AbstractServer | None = None
        self._conns: dict[asyncio.Task[Any], Connection] = {}
        self._slots: Counter[int] = Counter()  # slots held, by uid
        self._limiter = RateLimited(burst=LOG_BURST, period=LOG_PERIOD)
        self._housekeeping: asyncio.Task[None] | None = None
        self._shared: tuple[float, bytes] | None = None  # (loop time, encoded notification)
        # Mutating calls run one at a time so start/stop from two clients cannot interleave.
        self._mutate_lock = asyncio.Lock()
        self._handlers: dict[str, Callable[[Connection, dict[str, Any]], Awaitable[Any]]] = {
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
        sock = self._file.bind(LISTEN_BACKLOG)
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, backlog=LISTEN_BACKLOG
            )
        except BaseException:
            sock.close()
            self._file.unlink()
            raise
        self._housekeeping = asyncio.create_task(self._report_suppressed())
        log.info("control.listening", path=self.path, mode=oct(self.mode), group=self.group)
        await self._start_admin()

    async def _start_admin(self) -> None:
        """Bind the admins' socket; without it admins share the socket above (a warning)."""
        path = self.admin_path
        if len(control_temp_path(path, 4194304).encode()) > SUN_PATH_MAX:
            log.warning("control.admin_socket_skipped", path=path, reason="path too long")
            return
        try:
            sock = self._admin_file.bind(LISTEN_BACKLOG)
        except OSError as exc:
            log.warning("control.admin_socket_skipped", path=path, reason=str(exc))
            return
        try:
            self._admin_server = await asyncio.start_unix_server(
                self._on_connect, sock=sock, backlog=LISTEN_BACKLOG
            )
        except BaseException:
            sock.close()
            self._admin_file.unlink()
            raise
        mode = oct(self._admin_file.mode)
        log.info("control.admin_listening", path=path, mode=mode, group=self.admin_group)

    async def close(self) -> None:
        """Stop accepting, end every client and watch stream, and remove the socket file."""
        try:
            for server in (self._server, self._admin_server):
                if server is not None:
                    server.close()
            tasks = list(self._conns)
            if self._housekeeping is not None:
                tasks.append(self._housekeeping)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5.0)
            for server in (self._server, self._admin_server):
                if server is not None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5.0):
                            await server.wait_closed()
        finally:
            self._server = self._admin_server = self._housekeeping = None
            self._file.unlink()
            self._admin_file.unlink()
            log.info("control.closed", path=self.path)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = Connection(reader, writer)
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
            self._log_limited("control.dropped", conn, reason="not reading")
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

    async def _serve(self, conn: Connection) -> None:
        try:
            await conn.read_frames(functools.partial(self._handle, conn))
        except FrameError as exc:
            await self._fatal(conn, exc.code, exc.message)

    async def _fatal(self, conn: Connection, code: str, message: str) -> None:
        conn.bad_requests += 1
        self._log_limited("control.dropped", conn, code=code)
        await conn.send(encode_response(None, error_body(code, message), None))
        await conn.linger()

    def _log_limited(self, event: str, conn: Connection, **fields: Any) -> None:
        """A log line, at most LOG_BURST per LOG_PERIOD per event and uid; the rest are counted.

        control.dropped is info (a client's own fault), the others warnings.
        """
        ok, suppressed = self._limiter.allow(event, key=conn.peer.uid)
        if ok:
            extra = {"suppressed": suppressed} if suppressed else {}
            emit = log.info if event in _INFO_EVENTS else log.warning
            emit(event, uid=conn.peer.uid, pid=conn.peer.pid, **fields, **extra)

    async def _report_suppressed(self) -> None:
        """Write out what the limiter suppressed once each window is over."""
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            for event, uid, count in self._limiter.expired():
                emit = log.info if event in _INFO_EVENTS else log.warning
                emit(event, uid=uid, suppressed=count)

    async def _handle(self, conn: Connection, frame: Any, size: int) -> None:
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
                raise RequestError("permission_denied", f"{method} needs {self._admins()}")
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

    def _admins(self) -> str:
        """Who may call a mutating method, as a refusal names them."""
        who = ["root"] if self._own_uid == 0 else ["root", f"uid {self._own_uid}"]
        if self.admin_group is not None:
            who.append(f"a member of group {self.admin_group!r}")
        return "an admin: " + ", ".join(who[:-1]) + (" or " if len(who) > 1 else "") + who[-1]

    async def _hello(self, conn: Connection, kwargs: dict[str, Any]) -> dict[str, Any]:
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

    def _control_info(self) -> ControlFigures:
        return {"clients": self.active_clients, "watchers": self.active_watchers}

    async def _status(self, conn: Connection, kwargs: dict[str, Any]) -> Status:
        return {**(await self.target.status()), "control": self._control_info()}

    async def _stats(self, conn: Connection, kwargs: dict[str, Any]) -> Stats:
        return await self.target.stats()

    async def _snapshot(self) -> dict[str, Any]:
        status, stats = await self.target.status(), await self.target.stats()
        return {
            "time": time.time(),
            "status": {**status, "control": self._control_info()},
            "stats": stats,
        }

    async def _notification(self) -> bytes:
        """The watch notification, taken and encoded once per SNAPSHOT_MAX_AGE for everyone."""
        now = asyncio.get_running_loop().time()
        if self._shared is None or now - self._shared[0] >= SNAPSHOT_MAX_AGE:
            self._shared = (now, encode_notification("stats", await self._snapshot()))
        return self._shared[1]

    async def _watch(self, conn: Connection, kwargs: dict[str, Any]) -> dict[str, Any]:
        if conn.watch is not None:
            raise RequestError("bad_state", "this connection is already watching")
        # _handle starts the stream after this acknowledgement is sent.
        return {"subscribed": True, "interval": kwargs["interval"], "notification": "stats"}

    async def _watch_loop(self, conn: Connection, interval: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        try:
            while True:
                await conn.send(await self._notification())
                deadline += interval
                # Fixed cadence; if we fell behind (slow reader), skip the missed ticks.
                now = loop.time()
                if deadline < now:
                    deadline = now + interval
                await asyncio.sleep(deadline - now)
        except TimeoutError:
            # The peer stopped reading: drop it, so its handler sees the end of the stream.
            self._log_limited("control.dropped", conn, reason="not reading")
            conn.abort()
        except ConnectionError:
            conn.abort()
        except Exception:
            # A failing status()/stats() must not leave the client waiting for ever.
            log.exception("control.watch_failed", uid=conn.peer.uid, pid=conn.peer.pid)
            conn.abort()

    def _mutator(self, method: str) -> Callable[[Connection, dict[str, Any]], Awaitable[Any]]:
        """The handler of a mutating method: logged with the caller, run one at a time."""

        async def handler(conn: Connection, kwargs: dict[str, Any]) -> Any:
            log.info(f"control.{method}", uid=conn.peer.uid, pid=conn.peer.pid, **kwargs)
            async with self._mutate_lock:
                return await getattr(self.target, method)(**kwargs)

        return handler
