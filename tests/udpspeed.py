"""UDP flood, user mode against the kernel path, with the client on a second "host".

A network namespace joined by a veth pair (198.18.0.0/15) stands in for the client's host,
and the two CPUs are split as two hosts would have them: the C flood client
(tests/cclient/udpflood.c) and the receive work of its replies on CPU 0 (taskset, and RPS on
the namespace's end), echod and the receive work of its datagrams on CPU 1 (taskset, and RPS
on the host's end). Without the split, on loopback, the kernel path's echo runs inside the
client's own send, on the client's CPU, and the figure measures the client. One echod
(`--udp`, one worker, no per-source limit: every datagram comes from one address) is
switched between user and kernel mode (`restart`) for each run, alternated, and the medians
are printed. Root; every run is bounded by --seconds.

    python -m tests.udpspeed --rounds 3 --seconds 5 [--size 64 --window 32 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from echoctl.client import ControlClient
from tests.cpaths import build
from tests.integration.conftest import assert_clean_exit, spawn
from tests.integration.netns_util import veth_name, veth_namespace

MODES = ("user", "kernel")
CLIENT_CPU, SERVER_CPU = 0, 1


def steer(device: str, cpu: int, ns: str | None = None) -> None:
    """Receive processing of `device` (in namespace `ns`) on `cpu` (RPS)."""
    path = f"/sys/class/net/{device}/queues/rx-0/rps_cpus"
    script = f"echo {1 << cpu:x} > {path}"
    argv = ["sh", "-c", script] if ns is None else ["ip", "netns", "exec", ns, "sh", "-c", script]
    subprocess.run(argv, check=True, timeout=30)


def cpu_busy(cpu: int) -> tuple[float, float]:
    """(busy, total) jiffies of one CPU so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                ticks = [float(t) for t in line.split()[1:]]
                return sum(ticks) - ticks[3] - ticks[4], sum(ticks)
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


def run(rounds: int, seconds: float, size: int, window: int, threads: int, workdir: Path) -> Any:
    """Every round runs the flood once in each mode; returns each run's result, by mode."""
    client = build(workdir, "udpflood")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with veth_namespace() as (ns, host_ip, _):
        steer(veth_name(), SERVER_CPU)
        steer("eth0", CLIENT_CPU, ns)
        args = ["--udp", "--udp-rate-per-source", "0", "--workers", "1", "--log-level", "warning"]
        prefix = ["taskset", "-c", str(SERVER_CPU)]
        d = spawn(workdir, "user", args, prefix=prefix, hosts=(host_ip,))
        try:
            for r in range(rounds):
                for mode in MODES:
                    with ControlClient(d.control) as ctl:
                        ctl.call("restart", {"mode": mode})
                    argv = ["ip", "netns", "exec", ns, "taskset", "-c", str(CLIENT_CPU)]
                    argv += [str(client), host_ip, str(d.port), str(size), str(window)]
                    argv += [str(threads), str(seconds)]
                    busy0, total0 = cpu_busy(SERVER_CPU)
                    out = subprocess.run(
                        argv, capture_output=True, text=True, timeout=seconds + 30, check=True
                    ).stdout
                    busy1, total1 = cpu_busy(SERVER_CPU)
                    result = json.loads(out)
                    # The server's CPU (echod, and the receive work steered to it), busy share.
                    result["server_cpu"] = (busy1 - busy0) / max(total1 - total0, 1.0)
                    runs[mode].append(result)
                    print(
                        f"round {r + 1}: {mode}: {out.strip()}"
                        f" server CPU {result['server_cpu']:.0%} busy",
                        file=sys.stderr,
                        flush=True,
                    )
            udp = d.stats()["udp"]
        finally:
            assert_clean_exit(d)
    return {"runs": runs, "udp": udp}


def render(result: dict[str, Any], size: int) -> str:
    runs = result["runs"]
    rate = {m: statistics.median(r["datagrams_per_s"] for r in runs[m]) for m in MODES}
    # Datagrams per second for each second of the server CPU's busy time: what the server
    # could echo with the whole CPU, whichever side is the limit.
    per_cpu = {
        m: statistics.median(r["datagrams_per_s"] / max(r["server_cpu"], 1e-3) for r in runs[m])
        for m in MODES
    }
    lines = [f"UDP flood, {size} B, client and server on their own CPUs (veth, RPS)"]
    for mode in MODES:
        lost = sum(r["lost"] for r in runs[mode])
        sent = sum(r["sent"] for r in runs[mode])
        cpu = statistics.median(r["server_cpu"] for r in runs[mode])
        lines.append(
            f"  {mode:6} {rate[mode]:>10,.0f} datagrams/s, server CPU {cpu:4.0%} busy,"
            f" {per_cpu[mode]:>10,.0f} per server CPU second; lost {lost} of {sent:,}"
        )
    lines.append(
        f"  kernel / user: {rate['kernel'] / rate['user']:.2f}x datagrams/s,"
        f" {per_cpu['kernel'] / per_cpu['user']:.2f}x per server CPU second"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.udpspeed", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--window", type=int, default=32, help="datagrams in flight per thread")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true", help="one JSON object")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.seconds <= 0 or not 1 <= a.size <= 1472:
        p.error("--rounds at least 1, --seconds above 0, --size from 1 to 1472")
    with tempfile.TemporaryDirectory(prefix="echod-udpspeed-") as tmp:
        result = run(a.rounds, a.seconds, a.size, a.window, a.threads, Path(tmp))
    print(json.dumps(result) if a.json else render(result, a.size))
    bad = [
        r for runs in result["runs"].values() for r in runs if r["mismatches"] or r["duplicates"]
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
