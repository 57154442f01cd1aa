"""What an unprivileged local user can do to the daemon, and the bound each attack now meets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import Factory
from tests.integration.echo_util import connect, roundtrip

pytestmark = pytest.mark.bpf

NOBODY = 65534
# The system's interpreter: the venv's may link into /root, which uid 65534 cannot enter.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def as_nobody(script: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet as uid/gid 65534 (no capabilities); it prints one JSON line."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    return subprocess.run(
        [PYTHON, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=drop,  # noqa: PLW1509 (the tests are single-threaded here)
        cwd="/",
    )


def tcp_mem_pages() -> int:
    """The host's TCP memory in pages (/proc/net/sockstat, TCP mem)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1])
    raise AssertionError("no TCP line in /proc/net/sockstat")


# Sends as fast as it can on one connection and never reads, for up to 5 s or 1 GiB; reports
# how much it sent, how it ended, and the host's TCP memory at its peak.
NEVER_READS = r"""
import json, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"x" * 100); got = b""
while len(got) < 100: got += s.recv(100)
s.setblocking(False)
chunk = b"y" * 65536; sent = 0; outcome = "deadline"; peak = 0
deadline = time.monotonic() + 5
while time.monotonic() < deadline and sent < 1 << 30:
    try:
        sent += s.send(chunk)
    except BlockingIOError:
        time.sleep(0.001)
    except OSError:
        outcome = "reset"; break
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split(); peak = max(peak, int(fields[fields.index("mem") + 1]))
print(json.dumps({"sent": sent, "outcome": outcome, "peak_pages": peak}))
"""


@pytest.mark.parametrize("bypass", ["at_start", "turned_on_live"])
def test_an_unprivileged_client_cannot_take_the_hosts_tcp_memory(
    echod_factory: Factory, bypass: str
) -> None:
    """user + bypass: the echo redirected into a never-reading client is bounded (8 MiB).

    Turned on live, the bypass also moves accepting from uvloop's server (plain user mode)
    to echod's own accept, which looks up each new connection's path.
    """
    d = echod_factory(mode="user", args=["--bypass"] if bypass == "at_start" else [])
    if bypass == "turned_on_live":
        with connect("127.0.0.1", d.port) as sock:  # served before: accepted by uvloop
            roundtrip(sock, b"before")
        d.call("restart", {"bypass": True})
    before = tcp_mem_pages()
    done = as_nobody(NEVER_READS, str(d.port))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["outcome"] == "reset", result
    assert result["sent"] < 32 << 20, result
    # 8 MiB of echo plus what was in flight: well under 16k pages (64 MiB) above the start.
    assert result["peak_pages"] - before < 16384, (before, result)
    assert d.stats()["connections"]["aborted_backlog"] >= 1
    with connect("127.0.0.1", d.port) as sock:  # the others are served on
        for _ in range(5):
            roundtrip(sock, os.urandom(100_000))


def _bpf_fds(pid: int) -> int:
    """How many BPF map, program and link fds a process holds."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except FileNotFoundError:
            continue
        count += target.startswith(("anon_inode:bpf", "anon_inode:btf"))
    return count


def _our_bypass_maps(pids: list[int]) -> int:
    """How many bypass objects (their bypass_paths maps) the daemon's processes hold.

    Counted from the processes' own fds, so other daemons on the host do not count.
    """
    out = subprocess.run(
        ["bpftool", "-j", "map", "show"], capture_output=True, text=True, check=True
    ).stdout
    paths = {m["id"] for m in json.loads(out or "[]") if m.get("name") == "bypass_paths"}
    held: set[int] = set()
    for pid in pids:
        for name in os.listdir(f"/proc/{pid}/fdinfo"):
            try:
                with open(f"/proc/{pid}/fdinfo/{name}") as f:
                    for line in f:
                        if line.startswith("map_id:"):
                            held.add(int(line.split()[1]))
            except FileNotFoundError:
                continue
    return len(held & paths)


def test_toggling_the_bypass_does_not_pile_up_maps_or_fds(echod_factory: Factory) -> None:
    """An old bypass object is let go once no connection of it is left, and not before."""
    import psutil

    from echod.kernel.bypass_paths import PathReaders
    from tests.integration.echo_util import wait_for

    d = echod_factory(mode="user", args=["--workers", "2", "--bypass"])
    workers = [psutil.Process(w["pid"]) for w in d.status()["workers"]]
    pids = [d.proc.pid, *(w.pid for w in workers)]
    maps_before = 0
    # A connection of the first object, on its ingress path, open through all the toggles.
    old = connect("127.0.0.1", d.port)
    roundtrip(old, os.urandom(100_000))
    d.call("restart", {"bypass": False}, timeout=60)
    fds_before = [_bpf_fds(w.pid) for w in workers]
    for _ in range(10):
        d.call("restart", {"bypass": True}, timeout=60)
        d.call("restart", {"bypass": False}, timeout=60)
    d.call("restart", {"bypass": True}, timeout=60)
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, os.urandom(1000))

    seen: list[object] = []

    def settled(extra: int) -> bool:
        fds = [_bpf_fds(w.pid) for w in workers]
        maps = _our_bypass_maps(pids)
        seen[:] = [fds_before, fds, maps_before, maps]
        # The attached object (and `extra` older ones): its sockhash and path storage fds in
        # each worker, its maps on the host.
        return all(f <= b + 2 * (1 + extra) for f, b in zip(fds, fds_before, strict=True)) and (
            maps <= maps_before + 1 + extra
        )

    def wait_settled(extra: int) -> None:
        try:
            wait_for(
                lambda: settled(extra),
                timeout=2 * PathReaders.RETIRE_CHECK + 10,
                what="old bypass objects to go",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}: fds before/after, maps before/after {seen}") from None

    try:
        wait_settled(extra=1)  # the first object stays: its connection is open
        time.sleep(PathReaders.RETIRE_CHECK + 1)  # another look at it: still kept
        assert _our_bypass_maps(pids) == maps_before + 2, seen
        for _ in range(5):  # and its connection still echoes every byte
            roundtrip(old, os.urandom(200_000))
    finally:
        old.close()
    wait_settled(extra=0)


# Sends 200 KB and closes without reading: the echo waiting in its receive buffer turns the
# close into a reset, after its FIN. Repeated for a bounded count and time.
SEND_AND_RESET = r"""
import json, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
done = refused = 0
deadline = time.monotonic() + 20
while done + refused < n and time.monotonic() < deadline:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"z" * 200_000)
        s.close()
        done += 1
        time.sleep(0.005)  # ~150 a second: 50 slots hold if each is freed within 0.3 s
    except OSError:
        refused += 1
print(json.dumps({"done": done, "refused": refused}))
"""


def test_peers_that_send_fin_then_reset_are_freed_at_once(echod_factory: Factory) -> None:
    """Kernel mode: a reset peer has nothing left to receive, so no drain is waited for it."""
    d = echod_factory(mode="kernel", args=["--max-connections", "50"])
    done = as_nobody(SEND_AND_RESET, str(d.port), "300")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"done": 300, "refused": 0}, result
    # None waits out the drain (10 s): all are gone within a few seconds of the last.
    from tests.integration.echo_util import wait_for

    wait_for(lambda: d.status()["connections"] == 0, timeout=3, what="reset peers freed")
    stats = d.stats()["connections"]
    assert stats["refused"]["max_connections"] == 0, stats
    log = d.log()
    assert log.count('"conn.drain_timeout"') <= 5, "one warning per connection, not rate-limited"
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, os.urandom(100_000))
