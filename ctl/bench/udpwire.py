"""The datagrams of `bench --udp`: their header, their payloads, and what an echo must hold.

Every datagram is a 24-byte header and a payload, sent on a flow's own connected socket and
expected back whole (RFC 862). The header is three native 64-bit words:

    check | flow << 32    check: CRC-32 of the payload; flow: worker index << 16 | flow index
    sequence number       0, 1, 2, ... on each flow
    send time             CLOCK_MONOTONIC in ns

and the payload is variant `seq % 64` of the worker's 64 random payloads (each with its own
first byte), so what an echo must hold follows from its sequence number.
"""

from __future__ import annotations

import os
import random
import struct
from zlib import crc32

HSIZE = 24
VARIANTS = 64  # payloads per worker; also the most datagrams in one send or receive batch
VMASK = VARIANTS - 1
HEADER = struct.Struct("=QQQ")
LOW32 = 0xFFFFFFFF


class Payloads:
    """A worker's 64 payload variants, their checks, and the lengths every echo must have."""

    def __init__(self, size: int, seed: int | None) -> None:
        self.size = size
        self.psize = psize = size - HSIZE
        rnd = random.Random(seed if seed is not None else os.urandom(16))
        raw = [rnd.randbytes(psize) for _ in range(VARIANTS)]
        self.variants = [bytes([k]) + v[1:] if psize else b"" for k, v in enumerate(raw)]
        self.checks = [crc32(v) for v in self.variants]
        self.doubled = memoryview(b"".join(self.variants * 2))  # any 64 in a row, one slice
        self.sizes = [(size,) * n for n in range(VARIANTS + 1)]
