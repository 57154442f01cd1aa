"""The supervisor ↔ worker channel: the control protocol's frames over a socketpair, with fds.

Both ends speak the control socket's MessagePack-RPC frames (protocol.py): requests, responses
and notifications, matched by msgid. A request may carry file descriptors (the BPF maps'),
sent with SCM_RIGHTS in the same sendmsg as the frame's first byte; `params["fds"]` names them
in the order sent, and the receiver's handler gets them by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import structlog

from echod.control.protocol import (
    NOTIFICATION,
    REQUEST,
    RESPONSE,
    FrameError,
    FrameReader,
    RequestError,
    encode_notification,
    encode_request,
    encode_response,
    error_body,
)

log = structlog.get_logger("echod.channel")

RECV_SIZE = 256 * 1024
MAX_FDS = 8  # per message

# (method, params, fds the request carried by name) -> result; raise RequestError for an error.
Handler = Callable[[str, dict[str, Any], dict[str, int]], Awaitable[Any]]


class ChannelClosed(ConnectionError):
    """The other end has gone (its process exited, or closed the channel)."""


class Channel:
    """One end of a socketpair: send requests and await replies, serve the other end's requests.

    Takes ownership of sock. `on_close` runs once when the channel closes, whichever end
    closed it.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.on_close = on_close
        self.closed = False
        self._frames = FrameReader(strict_map_key=False)
        self._fds: deque[int] = deque()
        self._out: deque[tuple[bytes, Sequence[int]]] = deque()  # frames, and our fd copies
        self._writing = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # -- sending -----------------------------------------------------------------------------

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        fds: Mapping[str, int] | None = None,
        wait_s: float | None = None,
    ) -> Any:
        """Send a request and wait for its result; RequestError or ChannelClosed on failure."""
        if self.closed:
            raise ChannelClosed("channel closed")
        msgid = next(self._ids)
        future: asyncio.Future[Any] = self.loop.create_future()
        self._pending[msgid] = future
        body = dict(params or {})
        if fds:
            body["fds"] = list(fds)  # their names, in the order of the fds sent with the frame
        self._send(encode_request(msgid, method, body), list((fds or {}).values()))
        try:
            async with asyncio.timeout(wait_s):
                return await future
        finally:
            self._pending.pop(msgid, None)

    def notify(self, method: str, params: Any) -> None:
        """Send a notification (no reply)."""
        if not self.closed:
            self._send(encode_notification(method, params), ())

    def _send(self, frame: bytes, fds: Sequence[int]) -> None:
        # Our own copies: the caller's fds may be closed (an unloaded BPF object) while the
        # frame waits in the queue, and their numbers reused.
        self._out.append((frame, [os.dup(fd) for fd in fds]))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._out and not self.closed:
            frame, fds = self._out[0]
            try:
                sent = (
                    socket.send_fds(self.sock, [frame], list(fds)) if fds else self.sock.send(frame)
                )
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()
                return
            _close_all(fds)  # sent with the frame's first byte: the receiver has its own
            if sent < len(frame):
                self._out[0] = (frame[sent:], ())
                break
            self._out.popleft()
        if self._out and not self._writing and not self.closed:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._flush)
        elif not self._out and self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    # -- receiving ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, RECV_SIZE, MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        self._fds.extend(fds)
        if not data:
            self.close()
            return
        self._frames.feed(data)
        try:
            while (got := self._frames.next_frame()) is not None:
                self._dispatch(got[0])
        except FrameError as exc:  # the two ends are one program: this is a defect, say so
            log.error("channel.undecodable", error=exc.message)
            self.close()

    def _dispatch(self, frame: Any) -> None:
        if not isinstance(frame, list) or not frame:
            log.warning("channel.bad_frame")
            return
        if frame[0] == RESPONSE and len(frame) == 4:
            _, msgid, error, result = frame
            future = self._pending.get(msgid)
            if future is not None and not future.done():
                if error:
                    future.set_exception(RequestError(error["code"], error["message"]))
                else:
                    future.set_result(result)
        elif frame[0] == REQUEST and len(frame) == 4:
            _, msgid, method, params = frame
            names = params.pop("fds", []) if isinstance(params, dict) else []
            fds = {str(name): self._fds.popleft() for name in names if self._fds}
            task = self.loop.create_task(self._serve(msgid, method, params, fds))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif frame[0] == NOTIFICATION and len(frame) == 3 and self.handler is not None:
            task = self.loop.create_task(self._serve(None, frame[1], frame[2] or {}, {}))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(
        self, msgid: int | None, method: str, params: dict[str, Any], fds: dict[str, int]
    ) -> None:
        error, result = None, None
        try:
            if self.handler is None:
                raise RequestError("unknown_method", method)
            result = await self.handler(method, params, fds)
        except RequestError as exc:
            error = error_body(exc.code, exc.message)
        except Exception as exc:
            log.exception("channel.handler_failed", method=method)
            error = error_body("internal", f"{type(exc).__name__}: {exc}")
        if msgid is not None and not self.closed:
            self._send(encode_response(msgid, error, result), ())

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket, fail the calls still waiting, and run on_close; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        if self._writing:
            self.loop.remove_writer(self.sock.fileno())
        self.sock.close()
        while self._out:
            _close_all(self._out.popleft()[1])
        while self._fds:
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed("channel closed"))
        for task in self._tasks:  # requests being served: nobody is left to answer
            task.cancel()
        if self.on_close is not None:
            self.on_close()


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
