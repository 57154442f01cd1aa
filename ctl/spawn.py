"""A private echod: started on a given or a free loopback port, waited for, then stopped.

`echoctl compare --spawn` and the integration tests both start their daemons here. The daemon
is the `echod` next to the running interpreter (the same installation as echoctl), its control
socket lives in a directory the caller owns, and its output goes to a log file there, so a
daemon that fails to start is reported with the last line it wrote.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echoctl.client import ControlClient, ControlError

START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
POLL_S = 0.05


class SpawnError(Exception):
    """The daemon could not be started, did not serve in time, or did not stop; one line."""


def echod_binary() -> Path:
    """Return the echod next to the running interpreter (the same venv as echoctl)."""
    return Path(sys.executable).parent / "echod"


def free_port(hosts: Sequence[str] = ("127.0.0.1",), udp: bool = False) -> int:
    """Return a TCP port (and with `udp`, UDP port) that was free on every one of `hosts` a
    moment ago."""
    kinds = (socket.SOCK_STREAM, socket.SOCK_DGRAM) if udp else (socket.SOCK_STREAM,)
    for _ in range(50):
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.socket(_family(hosts[0])))
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            try:
                for host, kind in itertools.product(hosts, kinds):
                    if (host, kind) == (hosts[0], socket.SOCK_STREAM):
                        continue
                    other = stack.enter_context(socket.socket(_family(host), kind))
                    if other.family == socket.AF_INET6:
                        other.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    other.bind((host, port))
            except OSError:
                continue
            return port
    raise SpawnError(f"no {'TCP and UDP' if udp else 'TCP'} port free on {', '.join(hosts)}")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@dataclass
class Daemon:
    """A running echod started by `start`."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    control: str
    log_path: Path
    args: list[str]

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """Make one control call; ControlError and OSError pass through."""
        with ControlClient(self.control, timeout=timeout) as client:
            return client.call(method, params)

    def status(self) -> dict[str, Any]:
        """Return the daemon's `status`."""
        result: dict[str, Any] = self.call("status")
        return result

    def stats(self) -> dict[str, Any]:
        """Return the daemon's `stats`."""
        result: dict[str, Any] = self.call("stats")
        return result

    def log(self) -> str:
        """Return everything the daemon has written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def last_line(self) -> str:
        """Return the last line the daemon wrote, for one-line errors."""
        lines = self.log().strip().splitlines()
        return lines[-1] if lines else ""

    def wait_serving(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """Poll `status` until the daemon serves; return that status.

        Raises SpawnError when the daemon exits first or does not serve within `timeout`.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if self.proc.poll() is not None:
                raise SpawnError(f"echod exited with {self.proc.returncode}: {self.last_line()}")
            try:
                status = self.status()
            except (ControlError, OSError) as exc:
                last = str(exc)
            else:
                if status.get("state") == "serving":
                    return status
                last = f"state {status.get('state')}"
            if time.monotonic() > deadline:
                raise SpawnError(f"echod did not start serving within {timeout:g} s ({last})")
            time.sleep(POLL_S)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """Send SIGTERM and wait; return the exit status.

        A daemon that does not exit within `timeout` is killed, and SpawnError says so.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise SpawnError(f"echod did not stop within {timeout:g} s; killed") from None
        return self.proc.returncode


def start(
    workdir: Path,
    mode: str,
    hosts: Sequence[str] = ("127.0.0.1",),
    args: Sequence[str] = (),
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> Daemon:
    """Start echod in `mode` on `port` (default: a free one) of `hosts`, control in `workdir`.

    `args` go after the ones given here, so they can add to them; `prefix` goes before the
    binary (a wrapper such as `unshare`). With `env` None the daemon inherits this environment.
    """
    binary = echod_binary()
    if not binary.exists():
        raise SpawnError(f"{binary} not found: install the project (make venv) first")
    port = port or free_port(hosts, udp="--udp" in args)
    control = str(workdir / "control.sock")
    log_path = workdir / "echod.log"
    argv = [*prefix, str(binary), "--mode", mode]
    for host in hosts:
        argv += ["--host", host]
    argv += ["--port", str(port), "--control", control, *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )
    return Daemon(proc, hosts[0], port, control, log_path, argv)


@contextlib.contextmanager
def private_echod(
    mode: str,
    hosts: Sequence[str] = ("127.0.0.1",),
    args: Sequence[str] = (),
    say: Callable[[str], None] | None = None,
    port: int | None = None,
) -> Iterator[Daemon]:
    """Run a private echod on `port` (default: a free one) for the length of the block."""
    with tempfile.TemporaryDirectory(prefix="echod-private-") as tmp:
        daemon = start(Path(tmp), mode, hosts, args, port=port)
        if say is not None:
            say(f"starting {' '.join(daemon.args)}")
        try:
            daemon.wait_serving()
            yield daemon
        finally:
            daemon.stop()
