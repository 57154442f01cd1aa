"""UDP in kernel mode through the daemon: the TCX path echoes, counts, follows live switches
and leaves nothing behind; the user path takes over in user mode, each datagram echoed once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tests.cpaths import build
from tests.integration.conftest import (
    Echod,
    Factory,
    assert_clean_exit,
    assert_unloaded,
    require_bpf,
    spawn,
)
from tests.integration.echo_util import connect, roundtrip, wait_for
from tests.integration.netns_util import veth_namespace
from tests.integration.test_udp import client, exchange, start, udp_port


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


@pytest.mark.bpf
def test_the_c_flood_client_checks_every_datagram_on_both_paths(
    echod_factory: Factory, tmp_path: Path
) -> None:
    """tests/cclient/udpflood.c, the reference client of docs/benchmarks.md, builds and runs."""
    binary = build(tmp_path, "udpflood")
    d = start(echod_factory, "--udp-rate-per-source", "0", mode="user")
    for mode in ("user", "kernel"):
        d.call("restart", {"mode": mode})
        run = subprocess.run(
            [binary, "127.0.0.1", str(d.port), "64", "32", "2", "0.5"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert run.returncode == 0, run
        result = json.loads(run.stdout)
        assert result["received"] > 1000, (mode, result)
        assert result["duplicates"] == 0, (mode, result)
        assert result["mismatches"] == 0, (mode, result)
    assert d.stats()["udp"]["kernel"]["echoed_packets"] > 1000


NS_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
got = 0
for i in range(20):
    data = bytes([i]) * (1 + i * 70)
    s.sendto(data, (host, port))
    reply, source = s.recvfrom(65536)
    assert reply == data and source == (host, port), (i, source)
    got += 1
print(got)
"""


@pytest.mark.bpf
def test_a_client_in_another_namespace_is_echoed_on_the_kernel_path(
    echod_factory: Factory,
) -> None:
    """A second host over a veth pair: echod listens on the host's end, and the TCX program
    on that device turns the client's datagrams around."""
    with veth_namespace() as (ns, host_ip, _):
        d = echod_factory(mode="kernel", args=["--udp"], hosts=(host_ip,))
        st = d.status()
        assert st["udp"]["path"] == "kernel", st["udp"]
        assert st["udp"]["kernel"]["ifindexes"], st["udp"]  # the host's veth end
        run = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", NS_CLIENT, host_ip, str(d.port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run
        assert run.stdout.strip() == "20"
        user, kern = counts(d)
        assert kern["echoed_packets"] == 20, (user, kern)
        assert user["echoed_packets"] == 0, (user, kern)
        assert_clean_exit(d)


@pytest.mark.bpf
@pytest.mark.parametrize("workers", ["1", "2"])
def test_kill_9_leaves_no_udp_link_program_or_map(tmp_path: Path, workers: str) -> None:
    require_bpf()
    d = spawn(tmp_path, "kernel", ["--udp", "--workers", workers], port=udp_port())
    try:
        st = d.status()
        kernel = st["udp"]["kernel"]
        links = set(kernel["link_ids"])
        assert links
        assert links <= tcx_links()
        pids = [w["pid"] for w in st["workers"] if w["pid"] != d.proc.pid]
    finally:
        d.proc.kill()
        d.proc.wait(timeout=30)
    assert_unloaded({p["id"] for p in kernel["programs"]}, set(kernel["maps"]))
    assert not links & tcx_links()
    # The workers see their channel close and exit by themselves.
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), what="workers to exit")
