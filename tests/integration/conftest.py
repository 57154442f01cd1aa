"""Integration fixtures: a real echod on a free loopback port, with a temporary control socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from echoctl.client import ControlClient

BIN = Path(sys.executable).parent
START_TIMEOUT = 15.0
STOP_TIMEOUT = 20.0


def bpf_available() -> tuple[bool, str]:
    """Whether this machine can run kernel mode: root, BTF, a sockmap-capable bpf()."""
    if os.geteuid() != 0:
        return False, "not root"
    try:
        from echod.sockmap import KernelEcho

        with KernelEcho():
            return True, ""
    except OSError as exc:
        return False, f"cannot load the BPF object: {exc}"


def require_bpf() -> None:
    """Skip without BPF, except where ECHOD_REQUIRE_BPF=1 makes it a failure."""
    ok, why = bpf_available()
    if not ok:
        if os.environ.get("ECHOD_REQUIRE_BPF") == "1":
            pytest.fail(f"ECHOD_REQUIRE_BPF=1 but BPF is unavailable: {why}")
        pytest.skip(f"BPF unavailable: {why}")


def free_port() -> int:
    """A TCP port free on both 127.0.0.1 and ::1."""
    for _ in range(50):
        with socket.socket() as s4:
            s4.bind(("127.0.0.1", 0))
            port = s4.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET6) as s6:
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(("::1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def loaded_bpf_ids(ours: bool = False) -> tuple[set[int], set[int]]:
    """Ids of the BPF programs and maps loaded on the machine (bpftool); ours: echod's names."""
    progs = json.loads(
        subprocess.run(
            ["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True
        ).stdout
        or "[]"
    )
    maps = json.loads(
        subprocess.run(
            ["bpftool", "-j", "map", "show"], capture_output=True, text=True, check=True
        ).stdout
        or "[]"
    )
    if ours:
        progs = [p for p in progs if p.get("name") == "echo_verdict"]
        maps = [m for m in maps if str(m.get("name", "")).startswith("echo_")]
    return {p["id"] for p in progs}, {m["id"] for m in maps}


def assert_unloaded(progs: set[int], maps: set[int], timeout: float = 5.0) -> None:
    """None of these programs or maps is loaded (the kernel frees maps after an RCU period)."""
    deadline = time.monotonic() + timeout
    while True:
        loaded_progs, loaded_maps = loaded_bpf_ids()
        left_progs, left_maps = progs & loaded_progs, maps & loaded_maps
        if not left_progs and not left_maps:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still loaded: programs {left_progs}, maps {left_maps}")
        time.sleep(0.05)


@dataclass
class Echod:
    """A running daemon started by the tests."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    control: str
    log_path: Path
    args: list[str]
    bpf_ids: tuple[set[int], set[int]] = field(default_factory=lambda: (set(), set()))

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One control call."""
        with ControlClient(self.control) as client:
            return client.call(method, params)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"echod did not stop in {STOP_TIMEOUT}s:\n{self.log()}"
                ) from None
        return self.proc.returncode


def spawn(
    tmp: Path,
    mode: str = "kernel",
    args: list[str] | None = None,
    wait: bool = True,
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Echod:
    """Start echod; with wait, until its control socket answers `status`."""
    port = free_port()
    control = str(tmp / "control.sock")
    log_path = tmp / "echod.log"
    argv = [
        *(prefix or []),
        str(BIN / "echod"),
        "--mode",
        mode,
        "--host",
        "127.0.0.1",
        "--host",
        "::1",
        "--port",
        str(port),
        "--control",
        control,
        "--log-format",
        "json",
        "--log-level",
        "debug",
        *(args or []),
    ]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}, **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
        )
    d = Echod(proc, "127.0.0.1", port, control, log_path, argv)
    if wait:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"echod exited with {proc.returncode}:\n{d.log()}")
            try:
                st = d.status()
                if st["state"] == "serving":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                d.stop()
                raise AssertionError(f"echod did not become ready:\n{d.log()}")
            time.sleep(0.05)
        bpf = st["bpf"]
        d.bpf_ids = ({p["id"] for p in bpf["programs"]}, set(bpf["maps"]))
    return d


def assert_clean_exit(d: Echod) -> None:
    """Exit code 0, and none of the daemon's programs or maps is still loaded."""
    code = d.stop()
    assert code == 0, f"echod exited with {code}:\n{d.log()}"
    if d.bpf_ids[0] or d.bpf_ids[1]:
        assert_unloaded(*d.bpf_ids)


@pytest.fixture
def echod_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Echod]]:
    """Start real daemons; each is stopped at teardown and must exit cleanly, leaving no BPF."""
    started: list[Echod] = []

    def factory(mode: str = "kernel", args: list[str] | None = None, **kw: Any) -> Echod:
        if mode in ("kernel", "auto"):
            require_bpf()
        d = spawn(tmp_path_factory.mktemp("echod"), mode, args, **kw)
        started.append(d)
        return d

    yield factory
    for d in started:
        assert_clean_exit(d)


@pytest.fixture(scope="module", params=[pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Echod]:
    """One daemon per mode, shared by a module's tests."""
    if request.param == "kernel":
        require_bpf()
    d = spawn(tmp_path_factory.mktemp("echod"), request.param)
    assert d.status()["mode"] == request.param
    yield d
    assert_clean_exit(d)
