"""The user path's echo: a uvloop protocol that writes back what arrives."""

from __future__ import annotations

import asyncio
from typing import cast

from echod.service.connection import (
    INGRESS_CHECK_EVERY,
    WRITE_HIGH,
    WRITE_LOW,
    Connection,
    Host,
)


class UserEcho(asyncio.Protocol):
    """The user-space echo: write back what arrives; stop reading while the peer does not read.

    Made either for a Connection (moved to the user path, or accepted by the service's own
    accept) or, with none, by uvloop's server for a socket it accepted: the host admits it
    (or refuses it) once the transport is made.
    """

    def __init__(self, host: Host, conn: Connection | None = None) -> None:
        self.host = host
        self.conn = conn  # admitted in connection_made when None here
        self.transport: asyncio.Transport | None = None
        self.write_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self.conn is None:
            conn = self.host.admit_served(self.transport)
            if conn is None:  # refused: the host closed the transport
                return
            self.conn = conn
        elif self.conn.closed:  # stopped before the transport was ready
            self.transport.abort()
            return
        conn = self.conn
        conn.transport, conn.protocol = self.transport, self
        self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        if conn.out:  # echo a failed move to the kernel read but could not write yet
            self.transport.write(bytes(conn.out))
            conn.out.clear()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        assert self.transport is not None
        assert conn is not None
        self.transport.write(data)
        self.host.count_user(len(data))
        if conn.ingress >= 0:
            conn.ingress += len(data)
            if conn.ingress >= INGRESS_CHECK_EVERY:
                self.host.check_ingress(conn)

    def update_reading(self) -> None:
        """Read only while neither flow control nor a migration holds reading off."""
        assert self.transport is not None
        assert self.conn is not None
        if self.write_paused or self.conn.migrating:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.update_reading()

    def eof_received(self) -> bool:
        # Falsy: the transport closes once what is buffered has been written.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is None:  # refused by admit_served
            return
        if self.conn.transport is self.transport and self.transport is not None:
            self.conn.transport = self.conn.protocol = None
            self.conn.close(reason="reset" if exc else "eof")
