"""sd_notify(3) written by hand: READY, STATUS, WATCHDOG, RELOADING, STOPPING."""

from __future__ import annotations

import os
import socket
import time


def notify(*fields: str) -> bool:
    """Send KEY=VALUE fields to $NOTIFY_SOCKET; return False when there is no socket to tell."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or not fields:
        return False
    if path.startswith("@"):
        # An abstract socket name: '@' in the environment stands for the leading NUL byte.
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        # The service manager going away must never take the daemon down with it.
        return False
    return True


def managed() -> bool:
    """Whether a service manager listens ($NOTIFY_SOCKET is set)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def ready(status: str | None = None) -> bool:
    """Tell the service manager that start-up has finished."""
    return notify("READY=1", *(() if status is None else (f"STATUS={status}",)))


def status(text: str) -> bool:
    """Set the one-line status `systemctl status` shows."""
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    """Pet the watchdog."""
    return notify("WATCHDOG=1")


def reloading(status: str | None = None) -> bool:
    """Announce a reload; READY=1 must follow when it is done."""
    # systemd 253+ wants the timestamp to tell this reload from an older one; 252 ignores it.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    extra = () if status is None else (f"STATUS={status}",)
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *extra)


def stopping(status: str | None = None) -> bool:
    """Announce that the daemon is shutting down."""
    return notify("STOPPING=1", *(() if status is None else (f"STATUS={status}",)))


def watchdog_interval() -> float | None:
    """Return how often to pet the watchdog (half of WATCHDOG_USEC) in seconds, or None."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        # The variables were meant for another process (we were forked or exec'd by it).
        return None
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    return int(usec) / 2_000_000
