"""Helpers shared by tests/unit and tests/integration (nothing here needs privileges)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import msgpack

from echod.control.protocol import MAX_INTERVAL, NOTIFICATION, encode_request

TIMEOUT = 10.0


def wait_for(pred: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition") -> None:
    """Poll pred until true, or fail after timeout."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def first_watch_notification(path: str) -> dict[str, Any]:
    """Subscribe to `watch` at the longest interval; return the first notification's params.

    Each read gives up after a quarter of that interval: a first notification that waited for
    the interval, instead of bringing the current state at once, fails with TimeoutError.
    """
    unpacker = msgpack.Unpacker(raw=False)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(MAX_INTERVAL / 4)
        sock.connect(path)
        sock.sendall(encode_request(1, "watch", {"interval": MAX_INTERVAL}))
        while True:
            data = sock.recv(65536)
            assert data, "the server closed the watch"
            unpacker.feed(data)
            for frame in unpacker:
                if frame[0] == NOTIFICATION:
                    params: dict[str, Any] = frame[2]
                    return params
                assert frame[2] is None, frame  # the subscription's acknowledgement


def log_events(text: str) -> list[str]:
    """The `event` of each JSON record in a daemon's log (other lines are skipped)."""
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict) and "event" in record:
                events.append(str(record["event"]))
    return events
