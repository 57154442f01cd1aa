"""echod against a C epoll echo server, side by side: the figures of user mode and churn.

Builds tests/cclient/epollecho.c (one thread, epoll, non-blocking, TCP_NODELAY) and
tests/cclient/pingpong.c with clang, starts the C server and one echod per configuration, all
at once on their own ports, and for each round runs the C client against each server in turn
(A B C A B C): 10 connections x 64 B, 1 connection x 64 B, and churn (4 client threads, each
connection: connect, 64 B echoed, close). Every byte is checked by the client. Prints the
medians and each server's ratio to the C server's. Root for kernel mode (BPF); loopback only;
every run is bounded by --seconds.

    python -m tests.userspeed --rounds 3 --seconds 5 [--servers user,user-w1,kernel,uvloop-min]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.cpaths import build, summary
from tests.integration.conftest import Echod, assert_clean_exit, free_port, spawn

# name -> echod's mode and arguments (workers: the default unless named)
ECHODS: dict[str, tuple[str, list[str]]] = {
    "user": ("user", ["--workers", "auto"]),
    "user-w1": ("user", ["--workers", "1"]),
    "kernel": ("kernel", ["--workers", "auto"]),
    "kernel-w1": ("kernel", ["--workers", "1"]),
}
# load name -> pingpong arguments after the port: connections, size, and crr for churn
LOADS = {"10x64": ["10", "64"], "1x64": ["1", "64"], "churn": ["4", "64", "crr"]}
BASE = "c-epoll"
# The ceiling of a Python user path here: tests/minecho.py, uvloop with nothing else.
MINIMAL = "uvloop-min"


def start_server(argv: list[str], what: str, stack: ExitStack) -> int:
    """A reference server (argv, then its port) on a free port, stopped (SIGTERM) when the
    stack closes."""
    port = free_port()
    proc = subprocess.Popen([*argv, str(port)], stdout=subprocess.PIPE, text=True)
    out = proc.stdout
    assert out is not None
    out.readline()  # "listening on ...": it accepts from now on

    def stop() -> None:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        out.close()
        if code != 0:
            raise RuntimeError(f"{what} exited with {proc.returncode}")

    stack.callback(stop)
    return port


def start_echod(name: str, workdir: Path, stack: ExitStack) -> int:
    mode, args = ECHODS[name]
    d: Echod = spawn(workdir / name, mode, [*args, "--log-level", "warning"], hosts=("127.0.0.1",))
    stack.callback(assert_clean_exit, d)
    return d.port


def run(rounds: int, seconds: float, servers: list[str], workdir: Path) -> dict[str, Any]:
    """Every round runs every load against every server in turn; returns each run's result,
    keyed by server and load."""
    client = build(workdir, "pingpong")
    cserver = build(workdir, "epollecho")
    runs: dict[str, list[dict[str, Any]]] = {}
    with ExitStack() as stack:
        ports = {BASE: start_server([str(cserver)], "the C epoll server", stack)}
        for name in servers:
            if name == MINIMAL:
                argv = [sys.executable, str(Path(__file__).with_name("minecho.py"))]
                ports[name] = start_server(argv, "tests.minecho", stack)
                continue
            (workdir / name).mkdir()
            ports[name] = start_echod(name, workdir, stack)
        time.sleep(1.0)  # the daemons' start-up work is over
        for r in range(rounds):
            for load, largs in LOADS.items():
                for name, port in ports.items():
                    argv = [str(client), str(port), *largs[:2], str(seconds), *largs[2:]]
                    out = subprocess.run(
                        argv, capture_output=True, text=True, timeout=seconds + 30, check=True
                    ).stdout
                    runs.setdefault(f"{name} {load}", []).append(json.loads(out))
                    print(f"round {r + 1}: {name}, {load}: {out.strip()}", file=sys.stderr)
    return runs


def render(table: dict[str, dict[str, float]], servers: list[str]) -> str:
    lines = [f"{'load':7} {'server':10} {'per s':>9} {'vs C':>6} {'p50 us':>8} {'vs C':>6}"]
    for load in LOADS:
        base = table[f"{BASE} {load}"]
        for name in [BASE, *servers]:
            cell = table[f"{name} {load}"]
            lines.append(
                f"{load:7} {name:10} {cell['qps']:>9,.0f} {cell['qps'] / base['qps']:>5.2f}x"
                f" {cell['p50_us']:>8.1f} {cell['p50_us'] / base['p50_us']:>5.2f}x"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`make userspeed`."""
    p = argparse.ArgumentParser(
        prog="python -m tests.userspeed", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument(
        "--servers",
        default="user,user-w1,kernel,uvloop-min",
        help=f"echod configurations, from {','.join(ECHODS)}; and {MINIMAL}, the least a uvloop"
        " server does (tests/minecho.py) (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object")
    a = p.parse_args(argv)
    servers = [s for s in a.servers.split(",") if s]
    unknown = [s for s in servers if s not in ECHODS and s != MINIMAL]
    if unknown or not servers:
        known = ", ".join([*ECHODS, MINIMAL])
        p.error(f"--servers: unknown {', '.join(unknown) or '(none)'}; from {known}")
    if a.rounds < 1 or a.seconds <= 0:
        p.error("--rounds must be at least 1 and --seconds above 0")
    with tempfile.TemporaryDirectory(prefix="echod-userspeed-") as tmp:
        table = summary(run(a.rounds, a.seconds, servers, Path(tmp)))
    print(json.dumps(table) if a.json else render(table, servers))
    return 1 if any(cell["mismatches"] for cell in table.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
