"""The experiment behind the short circuit's early-sender rule (docs/architecture.md).

A plain listener on 127.0.0.1 (no echod), the bypass attached in kernel mode, and clients that
connect and send 64 B after a delay. Each row says how many sends succeeded and how many
failed with EINVAL, for a listener that never accepts and for one whose thread accepts at
once, with two builds of the bypass object:

- eager: the short circuit as first written, taken at a client's first send
  (`make -C bpf eager`);
- shipped: echod's, which takes it only once the client's earlier bytes have been echoed.

    python -m tests.early_redirect [--connections 40]

Root (BPF). Bounded: connections x rows, each send at most a few ms, on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import structlog

from echod.kernel.bypass import Bypass
from echod.kernel.bypass_paths import mark_listener

REPO = Path(__file__).resolve().parents[1]
DELAYS_MS = (0.0, 0.2, 1.0, 5.0, 20.0)


def _run(obj: Path, accept: bool, delay_ms: float, n: int) -> tuple[int, int, int]:
    with Bypass(None, obj) as bypass:
        lst = socket.socket()
        mark_listener(bypass.paths_fd, lst)
        lst.bind(("127.0.0.1", 0))
        lst.listen(4096)
        port = lst.getsockname()[1]
        bypass.follow([("127.0.0.1", port)], "kernel")
        keep: list[socket.socket] = []
        if accept:

            def serve() -> None:
                while True:
                    try:
                        keep.append(lst.accept()[0])
                    except OSError:
                        return

            threading.Thread(target=serve, daemon=True).start()
        ok = einval = other = 0
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                until = time.perf_counter() + delay_ms / 1000
                while time.perf_counter() < until:
                    pass
                try:
                    sock.send(b"x" * 64)
                    ok += 1
                except OSError as exc:
                    if exc.errno == errno.EINVAL:
                        einval += 1
                    else:
                        other += 1
        lst.close()
        for s in keep:
            s.close()
        return ok, einval, other


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=40)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            ["make", "-s", "-C", str(REPO / "bpf"), "eager", f"FAULT_OUT={out}"], check=True
        )
        objects = {
            "eager": Path(out) / "bypass_eager.bpf.o",
            "shipped": REPO / "echod" / "bpf" / "bypass.bpf.o",
        }
        print(f"kernel {__import__('os').uname().release}, {args.connections} connections a row")
        print(f"{'object':8} {'server':14} {'delay':>7} {'sent':>5} {'EINVAL':>6} {'other':>5}")
        for name, obj in objects.items():
            for accept in (False, True):
                for delay in DELAYS_MS:
                    ok, einval, other = _run(obj, accept, delay, args.connections)
                    server = "accepts" if accept else "never accepts"
                    print(
                        f"{name:8} {server:14} {delay:5.1f}ms {ok:5} {einval:6} {other:5}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
