"""UDP in kernel mode through the daemon: the TCX path echoes, counts, follows live switches
and leaves nothing behind; the user path takes over in user mode, each datagram echoed once."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.conftest import Echod, Factory, assert_clean_exit
from tests.integration.echo_util import connect, roundtrip
from tests.integration.test_udp import client, exchange, start


def counts(d: Echod) -> tuple[dict[str, int], dict[str, int]]:
    """(user counters, kernel counters or zeros)."""
    figures = d.stats()["udp"]
    assert figures is not None
    return figures["user"], figures["kernel"] or {"echoed_packets": 0, "dropped_loop": 0}


def tcx_links() -> set[int]:
    links = json.loads(
        subprocess.run(
            ["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        or "[]"
    )
    return {link["id"] for link in links if link.get("type") in ("tcx", 11)}


@pytest.mark.bpf
@pytest.mark.parametrize("workers", ["1", "2"])
def test_kernel_mode_echoes_udp_in_the_kernel_and_switches_live(
    echod_factory: Factory, workers: str
) -> None:
    d = start(echod_factory, "--workers", workers, mode="kernel")
    st = d.status()
    assert st["udp"]["path"] == "kernel", st["udp"]
    assert st["udp"]["fallback_reason"] is None
    kernel = st["udp"]["kernel"]
    assert kernel["attached"], kernel
    assert kernel["link_ids"], kernel
    ours = set(kernel["link_ids"])
    assert ours <= tcx_links()
    with connect("127.0.0.1", d.port) as tcp:
        roundtrip(tcp, b"tcp in the kernel too")
    sent = 0
    for host in ("127.0.0.1", "::1"):
        with client(host) as sock:
            for size in (1, 1472, 60000):
                payload = bytes((i * 7 + size) & 0xFF for i in range(size))
                assert exchange(sock, host, d.port, payload) == payload
                sent += 1
    user, kern = counts(d)
    assert kern["echoed_packets"] == sent, (user, kern)
    assert user["echoed_packets"] == 0, (user, kern)
    with client("127.0.0.1", ("127.0.0.1", 7)) as sock:  # the loop guard, in the kernel
        assert exchange(sock, "127.0.0.1", d.port, b"loop?") is None
    assert counts(d)[1]["dropped_loop"] == 1

    # User mode: the links go, the user path echoes; back to kernel: links again.
    d.call("restart", {"mode": "user"})
    st = d.status()
    assert st["udp"]["path"] == "user"
    assert st["udp"]["kernel"] is None
    assert not ours & tcx_links()
    with client("::1") as sock:
        assert exchange(sock, "::1", d.port, b"user path") == b"user path"
    assert counts(d)[0]["echoed_packets"] == 1
    d.call("restart", {"mode": "kernel"})
    st = d.status()
    assert st["udp"]["path"] == "kernel"
    ours = set(st["udp"]["kernel"]["link_ids"])
    with client("127.0.0.1") as sock:
        assert exchange(sock, "127.0.0.1", d.port, b"kernel again") == b"kernel again"
    user, kern = counts(d)
    assert user["echoed_packets"] == 1, (user, kern)
    assert kern["echoed_packets"] >= 1, (user, kern)
    d.bpf_ids = (
        d.bpf_ids[0] | {p["id"] for p in st["udp"]["kernel"]["programs"]},
        d.bpf_ids[1] | set(st["udp"]["kernel"]["maps"]),
    )
    assert_clean_exit(d)  # no program or map of ours is left
    assert not ours & tcx_links()
