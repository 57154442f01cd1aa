"""The supervisor-worker channel over a real socketpair: calls, errors, notifications, fds."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
import uvloop

from echod.control.protocol import RequestError
from echod.supervisor.channel import Channel, ChannelClosed


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _pair(handler: Any) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return Channel(a), Channel(b, handler)


def test_calls_errors_notifications_and_fds_cross_intact() -> None:
    got: dict[str, Any] = {}

    async def handler(method: str, params: dict[str, Any], fds: dict[str, int]) -> Any:
        if method == "fail":
            raise RequestError("bad_state", "no")
        if method == "note":
            got["note"] = params
            return None
        got["inodes"] = {name: os.fstat(fd).st_ino for name, fd in fds.items()}
        for fd in fds.values():
            os.close(fd)
        return {"echo": params["x"], "fds": sorted(fds)}

    async def main() -> None:
        before = _open_fds()
        sup, worker = await _pair(handler)
        r, w = os.pipe()
        try:
            reply = await sup.call("take", {"x": 5}, fds={"write": w, "read": r}, wait_s=5)
            assert reply == {"echo": 5, "fds": ["read", "write"]}  # the names the call gave
            assert got["inodes"] == {"read": os.fstat(r).st_ino, "write": os.fstat(w).st_ino}
            with pytest.raises(RequestError) as err:
                await sup.call("fail", wait_s=5)
            assert err.value.code == "bad_state"
            sup.notify("note", {"cookies": [1, 2]})
            await sup.call("take", {"x": 0}, wait_s=5)  # after the notification, in order
            assert got["note"] == {"cookies": [1, 2]}
        finally:
            os.close(r)
            os.close(w)
        worker.close()
        with pytest.raises(ChannelClosed):
            await sup.call("take", {"x": 1}, wait_s=5)
        sup.close()
        assert _open_fds() == before  # our copies of the fds, and both ends, are closed

    uvloop.run(main())


def test_a_call_fails_when_the_other_end_goes() -> None:
    async def never(method: str, params: dict[str, Any], fds: dict[str, int]) -> Any:
        await asyncio.sleep(60)

    async def main() -> None:
        sup, worker = await _pair(never)
        call = asyncio.ensure_future(sup.call("slow", wait_s=30))
        await asyncio.sleep(0)  # the call is on its way (either order fails it the same way)
        worker.close()
        with pytest.raises(ChannelClosed):
            await call
        sup.close()

    uvloop.run(main())
