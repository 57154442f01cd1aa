"""One UDP flow's datagrams: what went out, what came back, and what each echo counts as.

The datagrams are udpwire.py's: a header (flow, sequence number, send time, check) and a
payload that follows from the sequence number. An echo is

- echoed when it is intact and its datagram was in flight, and also `reordered` when a later
  datagram of the flow came back before it;
- a mismatch when any byte differs from what was sent: length, flow, check, payload, or a
  header other than the one sent. When its header is exactly the one sent for a datagram in
  flight, that datagram is resolved by the mismatch; otherwise (a damaged header) the
  datagram it was never comes back, and counts as lost too;
- late when it is intact and its datagram was already counted lost, after `--udp-timeout`;
- a duplicate when it is intact and its datagram was already echoed.

Cheap in the usual case: the headers of the last `ring` datagrams sent are kept, with a flag
for each still in flight. An in-order batch (the headers the next datagrams expected were
sent with, their payloads, every flag set) is checked by three byte comparisons, with no
Python work per datagram; anything else goes datagram by datagram. Datagrams still in flight
behind a hole, when the ring is needed for newer ones, move to a dict.
"""

from __future__ import annotations

from array import array
from collections import deque

from echoctl.bench.udplost import LostRecord
from echoctl.bench.udpwire import HEADER, HSIZE, LOW32, VARIANTS, VMASK, Payloads

NEVER = 1 << 62  # the first measured sequence number, before measuring begins
ONES = [b"\x01" * n for n in range(VARIANTS + 1)]
ZEROS = [bytes(n) for n in range(VARIANTS + 1)]


class Tally:
    """A worker's counts and latencies; the engine moves them into the worker's figures."""

    __slots__ = (
        "echoed",
        "lost",
        "late",
        "duplicates",
        "mismatches",
        "reordered",
        "warmup_errors",
        "measuring",
        "lat",
        "raw",
        "last_echo",
    )

    def __init__(self, measuring: bool = True) -> None:
        self.echoed = self.lost = self.late = self.duplicates = 0
        self.mismatches = self.reordered = self.warmup_errors = 0
        self.measuring = measuring
        self.lat: list[int] = []
        self.raw: list[int] = []  # paced: latency from the actual send
        self.last_echo = 0


class Flow:
    """One flow's sequence numbers, the headers it sent, and its datagrams in flight."""

    def __init__(
        self, fid: int, pay: Payloads, window: int, tally: Tally, paced: bool, every: int = 1
    ) -> None:
        self.fid = fid
        self.every = every  # the latency of each datagram whose seq is a multiple of this
        self.pay = pay
        self.window = window
        self.tally = tally
        ring = 256
        while ring < 2 * window:
            ring <<= 1
        self.ring, self.mask = ring, ring - 1
        self.hring = bytearray(ring * HSIZE)  # the header sent for seq s is at slot s & mask
        self.hview = memoryview(self.hring)
        self.hq = self.hview.cast("Q")
        self.state = bytearray(ring)  # 1: in flight
        self.due: list[int] | None = [0] * ring if paced else None  # paced: when each was due
        self.w0 = array("Q", [c | fid << 32 for c in pay.checks] * 2)
        self.nxt = self.low = 0  # next to send; the oldest whose state is in the ring
        self.top = -1  # the highest sequence number echoed
        self.outstanding = 0
        self.old: dict[int, tuple[int, int]] = {}  # in flight, out of the ring: seq -> ts, due
        self.old_order: deque[int] = deque()  # the keys of `old` in order, and some gone
        self.lost = LostRecord()
        self.mseq = 0 if tally.measuring else NEVER  # echoes of older ones are not counted

    # -- sending

    def room(self) -> int:
        """Return how many datagrams may go now: the window, and the ring's free slots."""
        free = self.window - self.outstanding
        if free <= 0:
            return 0
        span = self.ring - (self.nxt - self.low)
        if span < free:  # only behind a hole: without one, nxt - low <= window <= ring / 2
            self._compact()
            span = self.ring - (self.nxt - self.low)
        return min(free, span)

    def stage(self, txq: memoryview, now: int, n: int) -> int:
        """Write the headers of the next n (<= 64) datagrams into a send stage, viewed as
        64-bit words; return the stage slot of the first."""
        a = self.nxt
        j = a & VMASK
        if n == 1:  # ping-pong's: one call, not three
            HEADER.pack_into(txq, j * HSIZE, self.w0[j], a, now)
            return j
        q, end = 3 * j, 3 * (j + n)
        txq[q:end:3] = self.w0[j : j + n]
        txq[q + 1 : end : 3] = array("Q", range(a, a + n))
        txq[q + 2 : end : 3] = array("Q", (now,)) * n
        return j

    def sampled(self, n: int) -> range:
        """Return which of the next n datagrams (0 .. n-1) have their latency recorded."""
        return range(-self.nxt % self.every, n, self.every)

    def commit(self, staged: memoryview, j: int, sent: int, due: list[int] | None) -> None:
        """Record as in flight the first `sent` datagrams staged at slot j; `due` (paced): when
        each of those `sampled(sent)` was due."""
        a, ring = self.nxt, self.ring
        s = a & self.mask
        e = s + sent
        src = staged[j * HSIZE : (j + sent) * HSIZE]
        if e <= ring:
            self.hring[s * HSIZE : e * HSIZE] = src
            self.state[s:e] = ONES[sent]
        else:
            k = ring - s
            self.hring[s * HSIZE :] = src[: k * HSIZE]
            self.hring[: (e - ring) * HSIZE] = src[k * HSIZE :]
            self.state[s:] = ONES[k]
            self.state[: e - ring] = ONES[sent - k]
        if due is not None and self.due is not None:
            for k, when in zip(self.sampled(sent), due, strict=True):
                self.due[(a + k) & self.mask] = when
        self.nxt = a + sent
        self.outstanding += sent

    def start_measuring(self) -> None:
        """Count the echoes of datagrams sent from now on."""
        self.mseq = self.nxt

    # -- receiving

    def receive(
        self, rxh: bytearray, rxq: memoryview, rxp: bytearray, lens: tuple[int, ...], now: int
    ) -> None:
        """Check and count a batch of echoes: headers in rxh (rxq: as words), payloads in rxp."""
        n = len(lens)
        exp = self.top + 1
        pay = self.pay
        if (
            lens == pay.sizes[n]
            and self.low <= exp
            and exp + n <= self.nxt
            and (exp >= self.mseq or exp + n <= self.mseq)
        ):
            s, ring, state, hv = exp & self.mask, self.ring, self.state, self.hview
            e = s + n
            if e <= ring:
                ok = state.startswith(ONES[n], s) and rxh.startswith(hv[s * HSIZE : e * HSIZE])
            else:
                k = ring - s
                ok = (
                    state.startswith(ONES[k], s)
                    and state.startswith(ONES[n - k])
                    and rxh.startswith(hv[s * HSIZE :])
                    and rxh.startswith(hv[: (e - ring) * HSIZE], k * HSIZE)
                )
            v, ps = exp & VMASK, pay.psize
            if ok and rxp.startswith(pay.doubled[v * ps : (v + n) * ps]):
                if e <= ring:
                    state[s:e] = ZEROS[n]
                else:
                    state[s:] = ZEROS[ring - s]
                    state[: e - ring] = ZEROS[e - ring]
                self.top = exp + n - 1
                self.outstanding -= n
                if self.low == exp:
                    self.low = exp + n
                t = self.tally
                t.last_echo = now
                if exp >= self.mseq:
                    t.echoed += n
                    self._batch_latency(rxq, n, exp, now)
                return
        self._each(rxh, rxp, lens, now)

    def _batch_latency(self, rxq: memoryview, n: int, exp: int, now: int) -> None:
        t, every = self.tally, self.every
        if n == 1 and self.due is None:  # ping-pong's
            if not exp % every:
                t.lat.append(now - rxq[2])
            return
        first = -exp % every
        sent = rxq[3 * first + 2 : 3 * n : 3 * every].tolist()
        if self.due is None:
            t.lat.extend([now - x for x in sent])
            return
        due, m = self.due, self.mask
        t.raw.extend([now - x for x in sent])
        t.lat.extend([now - due[(exp + k) & m] for k in range(first, n, every)])

    def _each(self, rxh: bytearray, rxp: bytearray, lens: tuple[int, ...], now: int) -> None:
        pay = self.pay
        ps, size, checks, variants = pay.psize, pay.size, pay.checks, pay.variants
        for i, ln in enumerate(lens):
            if ln < HSIZE:
                self._mismatch(None)
                continue
            w0, seq, ts = HEADER.unpack_from(rxh, i * HSIZE)
            v = seq & VMASK
            intact = (
                ln == size
                and w0 >> 32 == self.fid
                and w0 & LOW32 == checks[v]
                and rxp.startswith(variants[v], i * ps)
            )
            self._one(seq, ts, w0 >> 32 == self.fid, intact, rxh, i, now)
        low, nxt, state, m = self.low, self.nxt, self.state, self.mask
        while low < nxt and not state[low & m]:
            low += 1
        self.low = low

    def _one(
        self, seq: int, ts: int, ours: bool, intact: bool, rxh: bytearray, i: int, now: int
    ) -> None:
        counted = seq >= self.mseq
        slot = seq & self.mask
        if self.low <= seq < self.nxt and self.state[slot]:
            if not rxh.startswith(self.hview[slot * HSIZE : (slot + 1) * HSIZE], i * HSIZE):
                self._mismatch(counted)  # a damaged header: its datagram will count as lost
                return
            # The header is the one sent for a datagram in flight: this is its echo.
            self.state[slot] = 0
            self.outstanding -= 1
            due = self.due[slot] if self.due is not None else ts
            self._resolved(seq, ts, due, intact, counted, now)
            return
        old = self.old.get(seq) if ours else None
        if old is not None:
            if old[0] != ts:
                self._mismatch(counted)
                return
            del self.old[seq]
            self.outstanding -= 1
            self._resolved(seq, ts, old[1], intact, counted, now)
            return
        if not intact or seq >= self.nxt:
            # Damaged, or a datagram never sent: which one it was cannot be told.
            self._mismatch(counted if seq < self.nxt else None)
            return
        if self.lost.take(seq) or seq <= self.lost.forgotten:
            if counted:
                self.tally.late += 1
        elif counted:
            self.tally.duplicates += 1
        else:
            self.tally.warmup_errors += 1

    def _resolved(self, seq: int, ts: int, due: int, intact: bool, counted: bool, now: int) -> None:
        if not intact:
            self._mismatch(counted)
            return
        t = self.tally
        t.last_echo = now
        if seq < self.top:
            t.reordered += counted
        else:
            self.top = seq
        if counted:
            t.echoed += 1
            if seq % self.every:
                return
            t.lat.append(now - due)
            if self.due is not None:
                t.raw.append(now - ts)

    def _mismatch(self, counted: bool | None) -> None:
        t = self.tally
        if t.measuring if counted is None else counted:
            t.mismatches += 1
        else:
            t.warmup_errors += 1

    # -- losses

    def expire(self, cut: int) -> None:
        """Count as lost every datagram in flight sent at or before `cut` (ns)."""
        old, order = self.old, self.old_order
        while order:
            entry = old.get(order[0])
            if entry is not None and entry[0] > cut:
                return  # everything in the ring was sent after
            seq = order.popleft()
            if entry is not None:
                del old[seq]
                self.outstanding -= 1
                self.tally.lost += seq >= self.mseq
                self.lost.add(seq, ONES[1])
        # Send times grow with sequence numbers: bisect for the first one sent after the cut.
        low, hi, hq, m = self.low, self.nxt, self.hq, self.mask
        lo = low
        while lo < hi:
            mid = (lo + hi) // 2
            if hq[3 * (mid & m) + 2] > cut:
                hi = mid
            else:
                lo = mid + 1
        if lo == low:
            return
        marks = self._states(low, lo)
        self._set_states(low, lo, 0)
        lost = marks.count(1)
        self.outstanding -= lost
        self.tally.lost += marks.count(1, max(0, self.mseq - low)) if self.mseq > low else lost
        if lost:
            self.lost.add(low, marks)
        self.low = lo

    def lose_all(self) -> None:
        """Count every datagram still in flight as lost (the flow failed, or the run ended)."""
        self.expire(NEVER)

    def _states(self, lo: int, hi: int) -> bytes:
        s, e = lo & self.mask, (lo & self.mask) + hi - lo
        if e <= self.ring:
            return bytes(self.state[s:e])
        return bytes(self.state[s:]) + bytes(self.state[: e - self.ring])

    def _set_states(self, lo: int, hi: int, value: int) -> None:
        s, e = lo & self.mask, (lo & self.mask) + hi - lo
        if e <= self.ring:
            self.state[s:e] = bytes([value]) * (e - s)
        else:
            self.state[s:] = bytes([value]) * (self.ring - s)
            self.state[: e - self.ring] = bytes([value]) * (e - self.ring)

    def _compact(self) -> None:
        """Move the oldest datagrams in flight out of the ring until half of it is free."""
        low, end, hq, m, due = self.low, self.nxt - self.ring // 2, self.hq, self.mask, self.due
        if end <= low:
            return
        marks = self._states(low, end)
        at = marks.find(1)
        while at >= 0:
            slot = (low + at) & m
            ts = hq[3 * slot + 2]
            self.old[low + at] = (ts, due[slot] if due is not None else ts)
            self.old_order.append(low + at)
            at = marks.find(1, at + 1)
        self._set_states(low, end, 0)
        self.low = end
