"""The UDP kernel path's self-check: before it serves, prove it on the running kernel.

As for TCP (echod.service.selfcheck), a path is trusted only once it has echoed each case
exactly on its own machinery. Here that is the attached program itself, pointed for the check
at a private port (held by a bound socket that never reads, so a datagram the program passes
lands there instead of coming back): 1 B and 1,472 B datagrams, on each loopback address echod
listens on, must come back whole and be counted as echoed by the program. The program turns
a datagram around inside the sender's own send, so no wait is needed beyond a short deadline.

`echoctl check` (and `echod --self-check`) runs the same cases on a private copy of the program,
attached to lo for the time of the check (`check_targets`): it turns around only datagrams to
its private port and passes everything else to the next program on lo (TCX_NEXT), so a copy
that serves is left undisturbed.

Only loopback addresses can be checked from here: a datagram this host sends to its own
non-loopback address enters through lo, not through the device that carries the address.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CASES = (1, 1472)  # bytes: the smallest datagram, and the largest that fits a 1,500 B MTU
TIMEOUT = 0.5  # seconds for each echo


@dataclass
class Result:
    """What the cases saw: each (address, bytes) case passed, failed or not run, in the order
    they run, and the first failure as one line (None when every case passed)."""

    cases: dict[tuple[str, int], str] = field(default_factory=dict)
    failed: str | None = None


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


def check_targets(hosts: Sequence[str]) -> list[str]:
    """What a check on a private copy of the program covers (`echoctl check`): the loopback
    addresses listened on, or where there is none, lo's address of each family listened on."""
    found = targets(hosts)
    if found or not hosts:
        return found
    return targets(["::" if ipaddress.ip_address(h).version == 6 else "0.0.0.0" for h in hosts])


def planned(hosts: Sequence[str]) -> dict[tuple[str, int], str]:
    """Every case on these addresses, not run yet."""
    return {(host, size): "not_run" for host in hosts for size in CASES}


def check(echo: Any, hosts: Sequence[str]) -> Result:
    """Run the cases against `echo` (a UdpKernelEcho, attached) on targets(hosts); the first
    that fails ends the check.

    `echo` is left configured for the private port: the caller configures it for real next.
    """
    found = targets(hosts)
    result = Result(planned(found))
    for host in found:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sink:
            sink.bind((host, 0))  # the private port: passed datagrams land here, unread
            port = sink.getsockname()[1]
            echo.configure(port, (), 0, (), hosts=[host])
            before = echo.counters()["echoed_packets"]
            for size in CASES:
                result.failed = _case(family, host, port, size)
                result.cases[(host, size)] = "passed" if result.failed is None else "failed"
                if result.failed is not None:
                    return result
            counted = echo.counters()["echoed_packets"] - before
            if counted != len(CASES):
                for size in CASES:  # the echoes came back, but not from the program
                    result.cases[(host, size)] = "failed"
                result.failed = f"{counted} of {len(CASES)} echoes to {host} counted by the program"
                return result
    return result


def run(echo: Any, hosts: Sequence[str]) -> str | None:
    """check(), as one line: None, or what failed."""
    return check(echo, hosts).failed


def _case(family: socket.AddressFamily, host: str, port: int, size: int) -> str | None:
    payload = bytes((i * 13 + size) & 0xFF for i in range(size))
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((host, port))
            sock.send(payload)
            reply = sock.recv(size + 1)
        except TimeoutError:
            return f"{size:,} B to {host}: no echo within {TIMEOUT:g} s"
        except OSError as exc:
            return f"{size:,} B to {host}: {exc.strerror or exc}"
    if reply != payload:
        return f"{size:,} B to {host}: the echo differs ({len(reply)} B back)"
    return None
