"""The echo path a daemon is on while a bench measures it: polled, so a switch mid-run shows.

A TCP path is the effective mode, with "+bypass" when the same-host bypass is on (as `compare`
names them); a UDP path is the one `status.udp.path` names (user or kernel). `PathWatch` polls
`status` in a thread for the length of a run and records each change with the interval in
which it happened.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from echoctl.client import ControlClient

POLL_S = 0.25
StatusProbe = Callable[[], dict[str, Any]]
PathOf = Callable[[dict[str, Any] | None], str | None]


def path_of(status: dict[str, Any] | None) -> str | None:
    """Return a status's path: "kernel", "kernel+bypass", ...; None when it serves none."""
    mode = (status or {}).get("mode")
    if not isinstance(mode, str):
        return None
    return mode + ("+bypass" if ((status or {}).get("bypass") or {}).get("enabled") else "")


def udp_path_of(status: dict[str, Any] | None) -> str | None:
    """Return the path that echoes a status's UDP: "user" or "kernel"; None when UDP is off."""
    path = ((status or {}).get("udp") or {}).get("path")
    return path if isinstance(path, str) else None


def control_status(path: str, timeout: float = 2.0) -> StatusProbe:
    """Return a probe that reads `status` from a control socket ({"error": ...} on failure)."""

    def probe() -> dict[str, Any]:
        try:
            with ControlClient(path, timeout=timeout) as client:
                result: dict[str, Any] = client.call("status")
                return result
        except Exception as exc:  # ControlError or OSError: a poll missed, not a failed run
            return {"error": str(exc)}

    return probe


class PathWatch:
    """Poll `status` from the moment measuring starts until the block ends (a thread it owns).

    `changes` lists each change as {"from", "to", "after_s", "by_s"}: seen on the old path at
    `after_s` and on the new one at `by_s`, in seconds since the watch began.
    """

    def __init__(
        self,
        status: StatusProbe,
        start: str | None,
        poll_s: float = POLL_S,
        where: PathOf = path_of,
    ) -> None:
        self.status = status
        self.where = where
        self.start = start
        self.poll_s = poll_s
        self.changes: list[dict[str, Any]] = []
        self._last = start
        self._last_seen = 0.0
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-pathwatch", daemon=True)

    def __enter__(self) -> PathWatch:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.saw(self.status())

    def saw(self, status: dict[str, Any]) -> None:
        """Record one status reading (the final probe goes through here too)."""
        if "error" in status:
            return
        now = round(time.monotonic() - self._t0, 2)
        path = self.where(status)
        if path is not None and path != self._last:
            change = {"from": self._last, "to": path, "after_s": self._last_seen, "by_s": now}
            self.changes.append(change)
            self._last = path
        self._last_seen = now
