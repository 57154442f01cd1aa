"""How the echo service accepts: uvloop's server in plain user mode, its own reader otherwise.

Plain user mode lets uvloop's server accept (`create_server` on a dup of each listener: the
accept, the transport and the protocol are made in C, and the protocol asks the service to
admit the connection): connection set-up costs half the Python work of the service's own
accept. Kernel mode needs the own accept (each socket enters the sockhash before any byte is
read), and so does user mode while a bypass object is held (each socket's path is looked up
as it is accepted). The service says which way (Service.accept_follow); this switches.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

ACCEPT_BATCH = 64
LISTEN_BACKLOG = 4096
# The listeners' fds run out: accepting pauses this long rather than spin on the error.
PAUSE_ON_EMFILE = 0.1


class Acceptor:
    """Accepts from the service's listeners the way it is told to: "server", "reader" or ""."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
        admit: Callable[[socket.socket, str], None],
        protocol: Callable[[], asyncio.Protocol],
        warn: Callable[..., None],
    ) -> None:
        self.loop = loop
        self._spawn = spawn
        self._admit = admit  # a socket the reader accepted, and its peer's address
        self._protocol = protocol  # the protocol factory of uvloop's servers
        self._warn = warn  # warn(event, rate=(burst, period) | None, **fields), rate-limited
        self.listeners: list[socket.socket] = []
        self.how = ""
        self._served: list[asyncio.AbstractServer] = []
        self._gen = 0

    def switch(self, how: str) -> None:
        """Stop accepting the current way, then start `how` (a no-op when it is the same)."""
        if how == self.how:
            return
        if self.how == "reader":
            for sock in self.listeners:
                self.loop.remove_reader(sock.fileno())
        for server in self._served:
            server.close()  # closes its dup of the listener: the listener stays
        self._served.clear()
        self._gen += 1
        self.how = how
        if how == "reader":
            for sock in self.listeners:
                self.loop.add_reader(sock.fileno(), self._on_accept, sock)
        elif how == "server":
            # Queued connections wait in the listen backlog until the servers run.
            self._spawn(self._serve(self._gen))

    def close(self) -> None:
        """Stop accepting and close the listeners."""
        self.switch("")
        for sock in self.listeners:
            sock.close()
        self.listeners.clear()

    async def _serve(self, gen: int) -> None:
        """uvloop's servers on dups of the listeners (for generation `gen` of switch)."""
        served: list[asyncio.AbstractServer] = []
        try:
            for sock in self.listeners:
                served.append(
                    await self.loop.create_server(
                        self._protocol, sock=sock.dup(), backlog=LISTEN_BACKLOG
                    )
                )
        except OSError as exc:
            self._warn("accept.server_failed", None, error=str(exc))
            for server in served:
                server.close()
            if gen == self._gen:
                self.switch("reader")
            return
        if gen != self._gen:  # switched again meanwhile
            for server in served:
                server.close()
            return
        self._served = served

    def _on_accept(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Paused accepts retry every 0.1 s: one line per 10 s, with the count suppressed.
                self._warn("accept.failed", (1, 10.0), error=str(exc))
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(listener)
                return
            self._admit(sock, sys.intern(addr[0]))  # one string per peer address, shared

    def _pause(self, listener: socket.socket) -> None:
        """Out of fds: stop accepting for a moment instead of spinning on the error."""
        fd = listener.fileno()
        self.loop.remove_reader(fd)

        def resume() -> None:
            if self.how == "reader" and listener in self.listeners:
                self.loop.add_reader(fd, self._on_accept, listener)

        self.loop.call_later(PAUSE_ON_EMFILE, resume)
