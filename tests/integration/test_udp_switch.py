"""UDP under a steady stream while the mode switches live: every datagram echoed once.

A sender paces sequenced datagrams from one socket; a receiver checks each reply's content and
counts duplicates. Switches between user and kernel mode run meanwhile. A datagram echoed by
both paths would come back twice; one echoed by neither would be lost.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.cpaths import build
from tests.integration.conftest import Factory
from tests.integration.test_udp import start

RATE = 2000  # datagrams/s
SECONDS = 6.0
SIZE = 64
HEADER = struct.Struct("!Q")


def payload(seq: int) -> bytes:
    body = bytes((seq * 31 + i) & 0xFF for i in range(SIZE - HEADER.size))
    return HEADER.pack(seq) + body


@pytest.mark.bpf
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_switching_modes_under_a_udp_stream_echoes_each_datagram_once(
    echod_factory: Factory, workers: str
) -> None:
    d = start(echod_factory, "--udp-rate-per-source", "0", "--workers", workers, mode="user")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.connect(("127.0.0.1", d.port))
    sock.settimeout(0.5)
    seen: dict[int, int] = {}
    mismatches: list[int] = []
    sent = 0
    done = threading.Event()

    def receive() -> None:
        quiet_since = None
        while True:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if done.is_set():
                    if quiet_since is None:
                        quiet_since = time.monotonic()
                    elif time.monotonic() - quiet_since > 1.0:
                        return
                continue
            (seq,) = HEADER.unpack_from(data)
            seen[seq] = seen.get(seq, 0) + 1
            if data != payload(seq):
                mismatches.append(seq)

    receiver = threading.Thread(target=receive)
    receiver.start()
    paths = []
    try:
        start_t = time.monotonic()
        switches = iter([(1.0, "kernel"), (2.5, "user"), (4.0, "kernel"), (5.0, "user")])
        at, mode = next(switches)
        while (elapsed := time.monotonic() - start_t) < SECONDS:
            while sent < elapsed * RATE:
                sock.send(payload(sent))
                sent += 1
            if at is not None and elapsed >= at:
                d.call("restart", {"mode": mode})
                paths.append(d.status()["udp"]["path"])
                at, mode = next(switches, (None, ""))
            time.sleep(0.001)
    finally:
        done.set()
        receiver.join(timeout=30)
        sock.close()
    assert paths == ["kernel", "user", "kernel", "user"]
    duplicates = sorted(seq for seq, n in seen.items() if n > 1)
    lost = sent - len(seen)
    figures = d.stats()["udp"]
    print(f"sent {sent}, echoed {len(seen)}, lost {lost}, duplicates {len(duplicates)}, {figures}")
    assert not mismatches, mismatches[:10]
    assert not duplicates, duplicates[:10]
    assert lost <= sent // 1000, f"{lost} of {sent} lost"


@pytest.mark.bpf
@pytest.mark.timeout(90)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_switching_modes_under_a_udp_flood_loses_at_most_a_thousandth_of_a_second(
    echod_factory: Factory, workers: str, tmp_path: Path
) -> None:
    """The C flood client (32 in flight, every datagram sequenced and checked) through four
    switches: no duplicate, no mismatch, and at most 0.1 % of one second's datagrams lost
    per switch."""
    binary = build(tmp_path, "udpflood")
    d = start(echod_factory, "--udp-rate-per-source", "0", "--workers", workers, mode="user")
    argv = [str(binary), "127.0.0.1", str(d.port), str(SIZE), "32", "1", str(SECONDS)]
    paths = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as flood:
        for mode in ("kernel", "user", "kernel", "user"):
            time.sleep(SECONDS / 5)
            d.call("restart", {"mode": mode})
            paths.append(d.status()["udp"]["path"])
        out, _ = flood.communicate(timeout=SECONDS + 30)
    assert paths == ["kernel", "user", "kernel", "user"]
    result = json.loads(out)
    print(result, d.stats()["udp"])
    assert flood.returncode == 0, result
    assert result["received"] > 1000, result
    assert result["duplicates"] == 0, result
    assert result["mismatches"] == 0, result
    assert result["lost"] <= len(paths) * result["datagrams_per_s"] / 1000, result
