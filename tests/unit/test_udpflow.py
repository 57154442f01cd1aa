"""`bench --udp`'s checks without sockets: datagrams staged by a Flow, echoes handed back to it."""

from __future__ import annotations

import struct
from zlib import crc32

import pytest

from echoctl.bench.udpflow import Flow, Tally
from echoctl.bench.udplost import LostRecord
from echoctl.bench.udpwire import HSIZE, VARIANTS, Payloads

SIZE = 64
PS = SIZE - HSIZE
MS = 1_000_000


class Sim:
    """One flow and the bytes it sent, as a send stage and a socket would see them."""

    def __init__(
        self, window: int = 32, measuring: bool = True, paced: bool = False, every: int = 1
    ) -> None:
        self.pay = Payloads(SIZE, seed=7)
        self.tally = Tally(measuring=measuring)
        self.flow = Flow(0x30002, self.pay, window, self.tally, paced, every)
        self.stage = bytearray(HSIZE * 2 * VARIANTS)
        self.sent: dict[int, bytes] = {}

    def send(self, n: int, now: int = 0, due: list[int] | None = None) -> list[int]:
        """Send n datagrams (in batches of up to 64); return their sequence numbers."""
        seqs = []
        while n > 0:
            k = min(n, VARIANTS, self.flow.room())
            assert k > 0, "no room"
            j = self.flow.stage(memoryview(self.stage).cast("Q"), now, k)
            first = self.flow.nxt
            chosen = [due[i] for i in self.flow.sampled(k)] if due else None
            self.flow.commit(memoryview(self.stage), j, k, chosen)
            for i in range(k):
                head = bytes(self.stage[(j + i) * HSIZE : (j + i + 1) * HSIZE])
                self.sent[first + i] = head + self.pay.variants[(first + i) % VARIANTS]
                seqs.append(first + i)
            n -= k
            due = due[k:] if due else None
        return seqs

    def echo(self, datagrams: list[bytes], now: int = MS) -> None:
        """Hand the flow one batch of echoes, as recvmmsg would leave them."""
        rxh = bytearray(HSIZE * VARIANTS)
        rxp = bytearray(PS * VARIANTS)
        for i, d in enumerate(datagrams):
            head, body = d[:HSIZE], d[HSIZE : HSIZE + PS]
            rxh[i * HSIZE : i * HSIZE + len(head)] = head
            rxp[i * PS : i * PS + len(body)] = body
        lens = tuple(len(d) for d in datagrams)
        self.flow.receive(rxh, memoryview(rxh).cast("Q"), rxp, lens, now)

    def back(self, *seqs: int, now: int = MS) -> None:
        self.echo([self.sent[s] for s in seqs], now)

    def counts(self) -> dict[str, int]:
        t = self.tally
        names = ("echoed", "lost", "late", "duplicates", "mismatches", "reordered")
        return {k: getattr(t, k) for k in names if getattr(t, k)}


def flipped(d: bytes, at: int) -> bytes:
    return d[:at] + bytes([d[at] ^ 0x01]) + d[at + 1 :]


def test_the_header_is_flow_sequence_time_and_the_payloads_check() -> None:
    sim = Sim()
    sim.send(3, now=123)
    w0, seq, ts = struct.unpack("=QQQ", sim.sent[2][:HSIZE])
    assert (w0 >> 32, seq, ts) == (0x30002, 2, 123)
    assert w0 & 0xFFFFFFFF == crc32(sim.pay.variants[2]) == crc32(sim.sent[2][HSIZE:])
    sim.send(1, now=456)  # one datagram: another way of writing it
    w0, seq, ts = struct.unpack("=QQQ", sim.sent[3][:HSIZE])
    assert (w0, seq, ts) == (crc32(sim.pay.variants[3]) | 0x30002 << 32, 3, 456)
    assert len({v[0] for v in sim.pay.variants}) == VARIANTS  # each its own first byte
    assert Payloads(SIZE, seed=7).variants == sim.pay.variants


def test_an_in_order_batch_is_checked_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = Sim()
    seqs = sim.send(32, now=10)
    monkeypatch.setattr(sim.flow, "_each", lambda *a: pytest.fail("went one by one"))
    sim.back(*seqs[:20], now=110)
    sim.back(*seqs[20:], now=210)
    assert sim.counts() == {"echoed": 32}
    assert sim.tally.lat == [100] * 20 + [200] * 12
    assert (sim.flow.outstanding, sim.flow.low, sim.flow.top) == (0, 32, 31)


def test_batches_across_the_ring_s_end() -> None:
    sim = Sim(window=50)
    assert sim.flow.ring == 256
    for _ in range(20):  # 1,000 datagrams: the ring wraps inside batches
        sim.back(*sim.send(50))
    assert sim.counts() == {"echoed": 1000}
    assert sim.flow.outstanding == 0


def test_reordered_and_duplicated_echoes() -> None:
    sim = Sim()
    sim.send(4)
    sim.back(0, 2, 1, 3)
    assert sim.counts() == {"echoed": 4, "reordered": 1}
    sim.back(1)
    sim.back(3, 3)
    assert sim.counts() == {"echoed": 4, "reordered": 1, "duplicates": 3}


def test_a_damaged_payload_is_a_mismatch_and_resolves_its_datagram() -> None:
    sim = Sim()
    sim.send(3)
    sim.echo([sim.sent[0], flipped(sim.sent[1], SIZE - 1), sim.sent[2]])
    assert sim.counts() == {"echoed": 2, "mismatches": 1}
    sim.flow.expire(10 * MS)
    assert sim.counts() == {"echoed": 2, "mismatches": 1}
    assert sim.flow.outstanding == 0


def test_a_damaged_header_is_a_mismatch_and_its_datagram_is_lost() -> None:
    sim = Sim()
    sim.send(3)
    sim.echo([sim.sent[0], flipped(sim.sent[1], 17), sim.sent[2]])  # the send time
    assert sim.counts() == {"echoed": 2, "mismatches": 1}
    sim.flow.expire(10 * MS)
    assert sim.counts() == {"echoed": 2, "mismatches": 1, "lost": 1}


@pytest.mark.parametrize(
    "bad",
    [
        lambda d: d[:-1],  # short
        lambda d: d + b"x",  # long
        lambda d: d[:10],  # not even a header
        lambda d: flipped(d, 5),  # another flow
        lambda d: d[:8] + struct.pack("=Q", 999) + d[16:],  # never sent
    ],
)
def test_what_cannot_be_an_echo_is_a_mismatch(bad: object) -> None:
    sim = Sim()
    sim.send(2)
    sim.echo([sim.sent[0], bad(sim.sent[1])])  # type: ignore[operator]
    assert sim.counts() == {"echoed": 1, "mismatches": 1}


def test_lost_then_late() -> None:
    sim = Sim()
    sim.send(3, now=0)
    sim.back(0, 2, now=MS)
    sim.flow.expire(-1)  # the cut: what was sent at or before it is lost
    assert sim.counts() == {"echoed": 2}
    sim.flow.expire(5 * MS)
    assert sim.counts() == {"echoed": 2, "lost": 1}
    sim.back(1, now=6 * MS)
    assert sim.counts() == {"echoed": 2, "lost": 1, "late": 1}
    sim.back(1, now=7 * MS)  # once more: it has come back already
    assert sim.counts() == {"echoed": 2, "lost": 1, "late": 1, "duplicates": 1}


def test_a_hole_moves_out_of_the_ring_and_the_flow_goes_on() -> None:
    sim = Sim(window=100)
    ring = sim.flow.ring
    sim.send(1, now=0)  # seq 0 does not come back for a while
    batches = 3 * ring // 50  # past the ring's end three times
    for _ in range(batches):
        sim.back(*sim.send(50, now=MS), now=2 * MS)
    assert sim.flow.outstanding == 1
    assert 0 in sim.flow.old
    sim.back(0, now=3 * MS)
    assert sim.counts() == {"echoed": 1 + 50 * batches, "reordered": 1}
    assert sim.flow.outstanding == 0


def test_a_hole_out_of_the_ring_is_lost_then_late() -> None:
    sim = Sim(window=100)
    sim.send(1, now=0)
    for _ in range(20):
        sim.back(*sim.send(50, now=MS), now=MS)
    sim.flow.expire(MS // 2)
    assert sim.counts() == {"echoed": 1000, "lost": 1}
    sim.back(0)
    assert sim.counts() == {"echoed": 1000, "lost": 1, "late": 1}


def test_lose_all_counts_what_is_in_flight() -> None:
    sim = Sim()
    sim.send(5)
    sim.back(1)
    sim.flow.lose_all()
    assert sim.counts() == {"echoed": 1, "lost": 4}
    assert sim.flow.outstanding == 0


def test_the_window_bounds_what_is_in_flight() -> None:
    sim = Sim(window=8)
    assert sim.flow.room() == 8
    sim.send(8)
    assert sim.flow.room() == 0
    sim.back(0, 1, 2)
    assert sim.flow.room() == 3


def test_nothing_counts_before_measuring_but_errors() -> None:
    sim = Sim(measuring=False)
    sim.send(4)
    sim.back(0, 1, 1)
    sim.echo([flipped(sim.sent[2], SIZE - 1)])
    assert sim.counts() == {}
    assert sim.tally.warmup_errors == 2  # the duplicate and the mismatch
    sim.tally.measuring = True
    sim.flow.start_measuring()
    sim.send(2)
    sim.back(3, 4, 5)  # 3 was sent during the warm-up
    sim.flow.expire(10 * MS)
    assert sim.counts() == {"echoed": 2}
    assert sim.tally.lat == [MS, MS]


def test_paced_latency_is_from_when_each_was_due() -> None:
    sim = Sim(paced=True)
    sim.send(3, now=500, due=[100, 200, 300])
    sim.back(0, 1, 2, now=1000)
    assert sim.tally.lat == [900, 800, 700]
    assert sim.tally.raw == [500, 500, 500]
    sim.send(2, now=1500, due=[1100, 1200])
    sim.back(4, 3, now=2000)  # one by one
    assert sim.tally.lat == [900, 800, 700, 800, 900]
    assert sim.tally.raw == [500, 500, 500, 500, 500]


def test_header_only_datagrams() -> None:
    pay = Payloads(HSIZE, seed=1)
    assert pay.psize == 0
    assert set(pay.variants) == {b""}
    assert set(pay.checks) == {0}


def test_a_server_that_answers_nothing_is_lost_in_runs() -> None:
    sim = Sim(window=200)
    sim.send(200, now=0)
    sim.back(*range(0, 100, 2))  # batches of at most 64, as a receive stage holds
    sim.back(*range(100, 200, 2))
    sim.flow.expire(0)
    assert sim.counts() == {"echoed": 100, "lost": 100}
    assert sim.flow.lost.starts == [1]  # one run from the oldest in flight, however long
    sim.back(1, 3)
    sim.back(2, 3)
    assert sim.counts() == {"echoed": 100, "lost": 100, "late": 2, "duplicates": 2}


def test_lost_runs_are_forgotten_oldest_first() -> None:
    lost = LostRecord(kept=100)
    for start in range(0, 300, 50):
        lost.add(start, b"\x01" * 50)
    # Past twice the bound (the fifth run), back to it: the three oldest runs go at once.
    assert (lost.forgotten, lost.starts) == (149, [150, 200, 250])
    assert not lost.take(120)
    assert lost.take(150)
    assert not lost.take(150)


def test_one_latency_in_k_by_sequence_number() -> None:
    sim = Sim(every=4)
    seqs = sim.send(16, now=0)
    sim.back(*seqs[:8], now=10)  # a batch: 0 and 4
    sim.back(9, 8, 11, 10, 12, 13, 15, 14, now=20)  # one by one: 8 and 12
    assert sim.counts() == {"echoed": 16, "reordered": 3}
    assert sim.tally.lat == [10, 10, 20, 20]
    paced = Sim(every=3, paced=True)
    paced.send(7, now=100, due=[10, 11, 12, 13, 14, 15, 16])
    paced.back(*range(7), now=200)
    assert (paced.tally.lat, paced.tally.raw) == ([190, 187, 184], [100, 100, 100])
