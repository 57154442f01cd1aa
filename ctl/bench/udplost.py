"""Which of a flow's datagrams were counted lost: to tell a late echo from a duplicate.

Losses are recorded in runs, as a flow's loss timer finds them: a run is its first sequence
number and one byte per datagram from there, 1 for lost (0: it had come back). A run costs
one append however many datagrams it holds, so a server that answers nothing costs no Python
work per datagram. The most recent KEPT sequence numbers are remembered; an echo of an older
one cannot be told from a duplicate, and counts as late (`forgotten`).
"""

from __future__ import annotations

from bisect import bisect_right

KEPT = 1 << 16  # sequence numbers remembered per flow


class LostRecord:
    """One flow's lost sequence numbers, in runs."""

    def __init__(self, kept: int = KEPT) -> None:
        self.kept = kept
        self.starts: list[int] = []
        self.marks: list[bytearray] = []
        self.size = 0  # sequence numbers in the runs
        self.forgotten = -1  # the highest sequence number no longer remembered

    def add(self, start: int, marks: bytes) -> None:
        """Record the run from `start`: marks[i] is 1 when start + i was lost."""
        self.starts.append(start)
        self.marks.append(bytearray(marks))
        self.size += len(marks)
        if self.size > 2 * self.kept and len(self.starts) > 1:
            drop = 0  # forget the oldest runs at once: one list copy, not one per run
            while self.size > self.kept and drop < len(self.starts) - 1:
                self.size -= len(self.marks[drop])
                drop += 1
            self.forgotten = self.starts[drop] - 1
            del self.starts[:drop], self.marks[:drop]

    def take(self, seq: int) -> bool:
        """Return True the first time an echo of lost `seq` comes back (it is late)."""
        i = bisect_right(self.starts, seq) - 1
        if i < 0:
            return False
        marks, k = self.marks[i], seq - self.starts[i]
        if k < len(marks) and marks[k]:
            marks[k] = 0
            return True
        return False
