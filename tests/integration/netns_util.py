"""A network namespace joined to this one by a veth pair: a second host for the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator


def ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, timeout=30)


def veth_name() -> str:
    """The host's end of this process's veth pair (veth_namespace)."""
    return f"eb{os.getpid() % 10**8}"


@contextlib.contextmanager
def veth_namespace() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair in 198.18.0.0/15.

    Yields (namespace, host address, namespace address); everything is removed afterwards.
    """
    n = os.getpid()
    ns, veth = f"echod-bench-{n}", veth_name()
    # A /30 of its own per test process, so that concurrent runs do not collide.
    base = f"198.18.{n % 256}.{4 * ((n >> 8) % 64)}"
    prefix, last = base.rsplit(".", 1)
    host_ip, ns_ip = f"{prefix}.{int(last) + 1}", f"{prefix}.{int(last) + 2}"
    try:
        ip("netns", "add", ns)
        ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", veth)
        ip("link", "set", veth, "up")
        ip("-n", ns, "addr", "add", f"{ns_ip}/30", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")
        yield ns, host_ip, ns_ip
    finally:
        ip("link", "del", veth, check=False)
        ip("netns", "del", ns, check=False)
