"""Live-switch soak: long-lived pipelined streams, every byte checked, while the daemon switches.

Each connection carries its own pseudo-random byte stream, written in pieces of 1 B to
--max-size with up to --window bytes in flight. Every echoed byte is compared at its stream
offset. A connection with bytes outstanding and no progress for --stall seconds counts as stuck.
Meanwhile the daemon switches mode (`restart --mode`) --switches times, and each switch opens
one more stream, so that connections of every age are in flight at every switch. With
--bypass on the same-host bypass stays on throughout; with --bypass switch each switch moves
one step round user+bypass, kernel+bypass, kernel, user, so that it goes on and off live too.

    python -m tests.soak --runs 4 --switches 20 --connections 50 --duration 120

Half the connections use 127.0.0.1 and half ::1. Traffic stays on loopback; every loop is
bounded by --duration and --stall. Exit status 1 on any mismatch, stuck connection or failed
switch. `make soak` runs the long form; tests/integration/test_soak.py a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from echoctl.client import ControlClient
from tests.integration.conftest import Echod, assert_clean_exit, spawn

BLOCK = 65536


def stream_bytes(seed: int, offset: int, n: int) -> bytes:
    """n bytes of stream `seed` from `offset`: 64 KiB blocks, each seeded by (seed, index)."""
    out = bytearray()
    while n > 0:
        index, skip = divmod(offset, BLOCK)
        block = random.Random(seed * 1_000_003 + index).randbytes(BLOCK)
        take = min(n, BLOCK - skip)
        out += block[skip : skip + take]
        offset += take
        n -= take
    return bytes(out)


def describe_mismatch(seed: int, offset: int, got: bytes) -> str:
    """Where a wrong byte came from: a repeat (earlier offset), a loss (later) or neither."""
    lo = max(0, offset - 4 * BLOCK * 16)
    window = stream_bytes(seed, lo, offset - lo + 4 * BLOCK * 16)
    at = window.find(got[:256])
    if at < 0:
        return f"mismatch at offset {offset}: bytes not from this stream"
    shift = lo + at - offset
    kind = "repeated" if shift < 0 else "skipped"
    return f"mismatch at offset {offset}: {abs(shift)} bytes {kind}"


@dataclass
class Stream:
    """One long-lived connection: writes its stream and checks what comes back."""

    host: str
    port: int
    seed: int
    window: int
    max_size: int
    stall: float
    sent: int = 0
    received: int = 0
    error: str | None = None
    last_progress: float = field(default_factory=time.monotonic)

    async def run(self, stop_at: float) -> None:
        """Stream until stop_at, then wait for the whole echo (or a stall)."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            self.error = f"connect failed: {exc}"
            return
        rng = random.Random(self.seed)
        try:
            await asyncio.gather(self._write(writer, rng, stop_at), self._read(reader, stop_at))
        finally:
            writer.close()

    async def _write(self, writer: asyncio.StreamWriter, rng: random.Random, stop: float) -> None:
        log_max = math.log2(self.max_size)
        while time.monotonic() < stop and self.error is None:
            room = self.window - (self.sent - self.received)
            if room <= 0:
                await asyncio.sleep(0.001)
                continue
            size = min(int(2 ** rng.uniform(0, log_max)), room)  # log-uniform: 1 B .. max
            writer.write(stream_bytes(self.seed, self.sent, size))
            self.sent += size
            await writer.drain()

    async def _read(self, reader: asyncio.StreamReader, stop: float) -> None:
        while self.error is None:
            if time.monotonic() >= stop and self.received >= self.sent:
                return
            try:
                data = await asyncio.wait_for(reader.read(1 << 20), 0.5)
            except TimeoutError:
                if self.received < self.sent and time.monotonic() - self.last_progress > self.stall:
                    self.error = f"stuck at offset {self.received} with {self.sent} sent"
                continue
            except OSError as exc:
                self.error = f"{type(exc).__name__} at offset {self.received}"
                return
            if not data:
                self.error = f"EOF at offset {self.received} with {self.sent} sent"
                return
            if data != stream_bytes(self.seed, self.received, len(data)):
                expect = stream_bytes(self.seed, self.received, len(data))
                first = next(i for i, (a, b) in enumerate(zip(data, expect, strict=True)) if a != b)
                self.error = describe_mismatch(self.seed, self.received + first, data[first:])
                return
            self.received += len(data)
            self.last_progress = time.monotonic()


@dataclass
class Options:
    """One soak run's shape."""

    connections: int = 50
    duration: float = 120.0
    switches: int = 20
    window: int = 1 << 20
    max_size: int = 1 << 20
    stall: float = 10.0
    start: str = "user"
    workers: int = 1
    bypass: str = "off"  # off, on, or switch (on and off live, with the mode)


def _steps(opt: Options) -> list[tuple[str, bool]]:
    """The (mode, bypass) of each switch, in order."""
    if opt.bypass == "switch":
        cycle = [("kernel", True), ("kernel", False), ("user", False), ("user", True)]
        if opt.start == "kernel":
            cycle = [("user", True), ("user", False), ("kernel", False), ("kernel", True)]
        return [cycle[i % 4] for i in range(opt.switches)]
    other = {"user": "kernel", "kernel": "user"}
    modes = [opt.start if i % 2 else other[opt.start] for i in range(opt.switches)]
    return [(m, opt.bypass == "on") for m in modes]


async def _soak(d: Echod, opt: Options) -> dict[str, Any]:
    stop_at = time.monotonic() + opt.duration
    streams: list[Stream] = []
    tasks: list[asyncio.Task[None]] = []

    def open_stream() -> None:
        host = "127.0.0.1" if len(streams) % 2 == 0 else "::1"
        st = Stream(host, d.port, len(streams) + 1, opt.window, opt.max_size, opt.stall)
        streams.append(st)
        tasks.append(asyncio.create_task(st.run(stop_at)))

    for _ in range(opt.connections):
        open_stream()
    switches, failed = [], []
    for mode, bypass in _steps(opt):
        await asyncio.sleep(opt.duration / (opt.switches + 1))
        try:
            reply = await asyncio.to_thread(_restart, d.control, mode, bypass)
            switches.append(
                {"mode": mode, "bypass": bypass, **reply["migration"], **_echoed(reply["stats"])}
            )
        except Exception as exc:  # a failed switch is a result, reported with the rest
            failed.append(f"restart --mode {mode} --bypass={bypass}: {exc}")
        open_stream()
    await asyncio.gather(*tasks)
    errors = [f"{s.host} stream {s.seed}: {s.error}" for s in streams if s.error]
    return {
        "connections": len(streams),
        "bytes_checked": sum(s.received for s in streams),
        "switches": switches,
        "failed_switches": failed,
        "errors": errors,
        "stuck": sum(1 for s in streams if s.error and s.error.startswith("stuck")),
        "mismatches": sum(1 for s in streams if s.error and s.error.startswith("mismatch")),
    }


def _restart(control: str, mode: str, bypass: bool) -> dict[str, Any]:
    """Switch; the reply carries the stats taken just before (the BPF counters may go with it)."""
    with ControlClient(control) as client:
        stats = client.call("stats")
        reply: dict[str, Any] = client.call("restart", {"mode": mode, "bypass": bypass})
        return {**reply, "stats": stats}


def _echoed(stats: dict[str, Any]) -> dict[str, int]:
    """Bytes echoed so far on each path."""
    return {
        "user_bytes": stats["user"]["bytes"],
        "kernel_bytes": (stats["kernel"] or {}).get("redirected_bytes", 0),
        "short_circuit_bytes": (stats.get("bypass") or {}).get("short_bytes", 0),
    }


def run(opt: Options, workdir: Path) -> dict[str, Any]:
    """One soak run against a private daemon; the daemon must exit cleanly afterwards."""
    args = ["--log-level", "info", "--workers", str(opt.workers)]
    if opt.bypass != "off":
        args.append("--bypass")
    d = spawn(workdir, opt.start, args=args)
    try:
        began = time.monotonic()
        result = uvloop.run(_soak(d, opt))
        result["seconds"] = round(time.monotonic() - began, 1)
        stats = d.stats()
        result["daemon"] = {
            **_echoed(stats),
            "aborted_backlog": stats["connections"]["aborted_backlog"],
        }
    finally:
        assert_clean_exit(d)
    return result


def ok(result: dict[str, Any]) -> bool:
    """Whether a run lost, repeated or stuck nothing and every switch went through."""
    return not result["errors"] and not result["failed_switches"]


def main(argv: list[str] | None = None) -> int:
    """The `make soak` entry point."""
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--connections", type=int, default=Options.connections)
    p.add_argument("--duration", type=float, default=Options.duration, help="seconds per run")
    p.add_argument("--switches", type=int, default=Options.switches)
    p.add_argument("--window", type=int, default=Options.window, help="bytes in flight")
    p.add_argument("--max-size", type=int, default=Options.max_size, help="largest write")
    p.add_argument("--stall", type=float, default=Options.stall, help="stuck after S seconds")
    p.add_argument("--start", choices=("user", "kernel"), default=Options.start)
    p.add_argument("--workers", type=int, default=Options.workers, help="daemon worker processes")
    p.add_argument("--bypass", choices=("off", "on", "switch"), default=Options.bypass)
    p.add_argument("--json", action="store_true", help="one JSON object per run")
    a = p.parse_args(argv)
    opt = Options(
        a.connections,
        a.duration,
        a.switches,
        a.window,
        a.max_size,
        a.stall,
        a.start,
        a.workers,
        a.bypass,
    )
    failures = 0
    for i in range(1, a.runs + 1):
        with tempfile.TemporaryDirectory(prefix="echod-soak-") as tmp:
            result = run(opt, Path(tmp))
        failures += not ok(result)
        if a.json:
            print(json.dumps({"run": i, **result}), flush=True)
        else:
            print(
                f"run {i}/{a.runs} ({opt.workers} workers): {result['connections']} streams, "
                f"{result['bytes_checked'] / 1e9:.2f} GB checked in {result['seconds']} s, "
                f"{len(result['switches'])} switches ({len(result['failed_switches'])} failed), "
                f"{result['mismatches']} mismatches, {result['stuck']} stuck",
                flush=True,
            )
            for line in result["errors"] + result["failed_switches"]:
                print(f"  {line}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
