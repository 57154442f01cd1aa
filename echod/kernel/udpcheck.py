"""The UDP kernel path's self-check: before it serves, prove it on the running kernel.

As for TCP (echod.service.selfcheck), a path is trusted only once it has echoed each case
exactly on its own machinery. Here that is the attached program itself, pointed for the check
at a private port (held by a bound socket that never reads, so a datagram the program passes
lands there instead of coming back): 1 B and 1,472 B datagrams, on each loopback address echod
listens on, must come back whole and be counted as echoed by the program. The program turns
a datagram around inside the sender's own send, so no wait is needed beyond a short deadline.

Only loopback addresses can be checked from here: a datagram this host sends to its own
non-loopback address enters through lo, not through the device that carries the address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

CASES = (1, 1472)  # bytes: the smallest datagram, and the largest that fits a 1,500 B MTU
TIMEOUT = 0.5  # seconds for each echo


def targets(hosts: Sequence[str]) -> list[str]:
    """The loopback addresses to check: those listened on, or lo's for a wildcard."""
    out = []
    for host in hosts:
        ip = ipaddress.ip_address(host)
        if ip.is_unspecified:
            out.append("127.0.0.1" if ip.version == 4 else "::1")
        elif ip.is_loopback:
            out.append(host)
    return list(dict.fromkeys(out))


def run(echo: Any, hosts: Sequence[str]) -> str | None:
    """Run the cases against `echo` (a UdpKernelEcho, attached); None, or what failed.

    `echo` is left configured for the private port: the caller configures it for real next.
    """
    for host in targets(hosts):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sink:
            sink.bind((host, 0))  # the private port: passed datagrams land here, unread
            port = sink.getsockname()[1]
            echo.configure(port, (), 0, (), hosts=[host])
            before = echo.counters()["echoed_packets"]
            for size in CASES:
                failed = _case(family, host, port, size)
                if failed is not None:
                    return failed
            counted = echo.counters()["echoed_packets"] - before
            if counted != len(CASES):
                return f"{counted} of {len(CASES)} echoes to {host} counted by the program"
    return None


def _case(family: socket.AddressFamily, host: str, port: int, size: int) -> str | None:
    payload = bytes((i * 13 + size) & 0xFF for i in range(size))
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((host, port))
            sock.send(payload)
            reply = sock.recv(size + 1)
        except TimeoutError:
            return f"{size} B to {host}: no echo within {TIMEOUT:g} s"
        except OSError as exc:
            return f"{size} B to {host}: {exc.strerror or exc}"
    if reply != payload:
        return f"{size} B to {host}: the echo differs ({len(reply)} B back)"
    return None
