"""The four paths against a C ping-pong client: the bypass's acceptance figures.

Builds tests/cclient/pingpong.c with clang, starts one private echod, and for each round
switches it through user, user+bypass, kernel and kernel+bypass (`restart` over the control
socket), running the C client on 10 connections and on 1 connection of 64 B each time. Prints
the medians and each +bypass path's ratio to its mode. Root (BPF); loopback only; every run is
bounded by --seconds.

    python -m tests.cpaths --rounds 3 --seconds 5 --workers 1 [--port P]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from echoctl.client import ControlClient
from tests.integration.conftest import assert_clean_exit, spawn

CCLIENT = Path(__file__).parent / "cclient"
PATHS = (("user", False), ("user", True), ("kernel", False), ("kernel", True))
LOADS = (10, 1)  # connections


def build(workdir: Path, name: str = "pingpong") -> Path:
    """Compile tests/cclient/NAME.c into workdir (clang-14, as the BPF objects; cc when there
    is none): the ping-pong client, the epoll server or the UDP flood client."""
    cc = shutil.which("clang-14") or shutil.which("cc") or "clang-14"
    binary = workdir / name
    source = CCLIENT / f"{name}.c"
    subprocess.run([cc, "-O2", "-pthread", "-o", str(binary), str(source)], check=True)
    return binary


def name(mode: str, bypass: bool) -> str:
    return mode + ("+bypass" if bypass else "")


def run(
    rounds: int, seconds: float, workers: int, size: int, workdir: Path, port: int | None = None
) -> dict[str, Any]:
    """All rounds against one daemon on `port` (default: a free one); every run, keyed by path
    and connections."""
    client = build(workdir)
    args = ["--workers", str(workers), "--log-level", "warning"]
    d = spawn(workdir, "user", args, port=port)
    print(f"echod on port {d.port}", file=sys.stderr, flush=True)
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for r in range(rounds):
            for mode, bypass in PATHS:
                with ControlClient(d.control) as ctl:
                    ctl.call("restart", {"mode": mode, "bypass": bypass})
                for conns in LOADS:
                    argv = [str(client), str(d.port), str(conns), str(size), str(seconds)]
                    out = subprocess.run(
                        argv, capture_output=True, text=True, timeout=seconds + 30, check=True
                    ).stdout
                    result = json.loads(out)
                    runs.setdefault(f"{name(mode, bypass)} {conns}", []).append(result)
                    print(
                        f"round {r + 1}: {name(mode, bypass)}, {conns} conn: {out.strip()}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        assert_clean_exit(d)
    return runs


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians of req/s and p50 per path and load."""
    return {
        key: {
            "qps": statistics.median(r["qps"] for r in results),
            "p50_us": statistics.median(r["p50_us"] for r in results),
            "mismatches": sum(r["mismatches"] for r in results),
        }
        for key, results in runs.items()
    }


def render(table: dict[str, dict[str, float]], size: int) -> str:
    lines = []
    for conns in LOADS:
        for mode, bypass in PATHS:
            cell = table[f"{name(mode, bypass)} {conns}"]
            line = (
                f"{conns:>2} conn x {size} B  {name(mode, bypass):14} {cell['qps']:>10,.0f} req/s"
                f"  p50 {cell['p50_us']:7.2f} us"
            )
            if bypass:
                base = table[f"{mode} {conns}"]
                line += (
                    f"   {cell['qps'] / base['qps']:.2f}x req/s,"
                    f" p50 {cell['p50_us'] / base['p50_us']:.2f}x of {mode}"
                )
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`make cpaths`."""
    p = argparse.ArgumentParser(prog="python -m tests.cpaths", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--port", type=int, help="echod's TCP port (default: a free one)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    a = p.parse_args(argv)
    if a.port is not None and not 1 <= a.port <= 65535:
        p.error(f"--port {a.port}: must be from 1 to 65535")
    with tempfile.TemporaryDirectory(prefix="echod-cpaths-") as tmp:
        table = summary(run(a.rounds, a.seconds, a.workers, a.size, Path(tmp), a.port))
    print(json.dumps(table) if a.json else render(table, a.size))
    return 1 if any(cell["mismatches"] for cell in table.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
