"""The least a uvloop echo server does: the ceiling of echod's user mode, for tests.userspeed.

One process, `loop.create_server`, `data_received` writes back, `TCP_NODELAY`; no admission,
no counting, no flow control. Prints "listening on PORT" once it accepts; SIGTERM stops it.

    python -m tests.minecho PORT
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", port, backlog=4096)
    for sock in server.sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"listening on {port}", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
