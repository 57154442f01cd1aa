"""One control client's connection: its stream, and the framing of what it sends.

Connection owns the stream of one client of the control server (echod.control.server): writes
with a deadline, a close that does not wait for a peer that does not read, the peer's
credentials and watch task, and the reading of MessagePack frames with their deadlines (idle
before the first frame, partial frame) and size limit. What a frame asks for is the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from echod.control.peercred import PeerCred
from echod.control.protocol import (
    MAX_FRAME,
    FrameError,
    FrameReader,
    encode_response,
    error_body,
)

log = structlog.get_logger("echod.control")

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
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 4 * 1024 * 1024


class Connection:
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

    async def read_frames(self, handle: Callable[[Any, int], Awaitable[None]]) -> None:
        """Each frame, with its size in bytes, to handle in turn, until the peer closes.

        A connection without a complete frame IDLE_TIMEOUT after it opened is answered and
        ends; FrameError for a frame too large, undecodable or not finished in time.
        """
        loop = asyncio.get_running_loop()
        # Room for one whole MAX_FRAME plus the read that completes it; frame size is checked
        # exactly by the handler with the size given.
        frames = FrameReader(MAX_FRAME + READ_CHUNK)
        first_by: float | None = loop.time() + IDLE_TIMEOUT  # None once a frame has arrived
        started: float | None = None  # when the first byte of an incomplete frame arrived
        while True:
            deadline = first_by
            if started is not None:
                frame_by = started + PARTIAL_FRAME_TIMEOUT
                deadline = frame_by if deadline is None else min(deadline, frame_by)
            try:
                async with asyncio.timeout_at(deadline):
                    data = await self.reader.read(READ_CHUNK)
            except TimeoutError:
                if frames.partial:
                    raise FrameError("invalid_request", "incomplete frame timed out") from None
                log.debug("control.idle_timeout", uid=self.peer.uid, pid=self.peer.pid)
                message = f"no request within {IDLE_TIMEOUT:g} s of connecting"
                await self.send(encode_response(None, error_body("invalid_request", message), None))
                return
            if not data:
                return
            now = loop.time()
            try:
                frames.feed(data)
            except FrameError:
                raise FrameError(
                    "frame_too_large", f"frames are limited to {MAX_FRAME} B"
                ) from None
            before = frames.boundary
            while (got := frames.next_frame()) is not None:  # FrameError: undecodable
                first_by = None
                await handle(*got)
                # A read can hold hundreds of pipelined requests: let the echo path run between.
                await asyncio.sleep(0)
            if not frames.partial:
                started = None
            elif started is None or frames.boundary != before:
                started = now

    async def linger(self) -> None:
        """Half-close, and discard what is still arriving for a bounded while.

        Closing with unread input makes the kernel reset the peer, which can then lose the
        last reply.
        """
        if self.writer.can_write_eof():
            self.writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                discarded = 0
                while discarded < LINGER_BYTES and (data := await self.reader.read(READ_CHUNK)):
                    discarded += len(data)
