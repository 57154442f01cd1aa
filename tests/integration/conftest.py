"""Integration fixtures: a real echod on a free loopback port, with a temporary control socket."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from echoctl import spawn as spawn_module
from echoctl.spawn import Daemon, SpawnError

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
HOSTS = ("127.0.0.1", "::1")
START_TIMEOUT = 15.0
OUR_PROGRAMS = ("echo_verdict", "bypass_sockops", "bypass_msg", "bypass_ingress", "udp_echo")
STOP_TIMEOUT = 20.0


def bpf_available() -> tuple[bool, str]:
    """Whether this machine can run kernel mode: root, BTF, a sockmap-capable bpf()."""
    if os.geteuid() != 0:
        return False, "not root"
    try:
        from echod.kernel.echo import KernelEcho

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
    return spawn_module.free_port(HOSTS)


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
        progs = [p for p in progs if p.get("name") in OUR_PROGRAMS]
        maps = [m for m in maps if str(m.get("name", "")).startswith(("echo_", "bypass_", "udp_"))]
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
class Echod(Daemon):
    """A running daemon started by the tests, with the BPF ids it reported when it served."""

    bpf_ids: tuple[set[int], set[int]] = field(default_factory=lambda: (set(), set()))

    def records(self, event: str | None = None) -> list[dict[str, Any]]:
        """The daemon's JSON log records so far (those of one event, if named)."""
        records = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return [r for r in records if event is None or r.get("event") == event]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code. Not stopping in time fails the test."""
        try:
            return super().stop(timeout)
        except SpawnError as exc:
            raise AssertionError(f"{exc}:\n{self.log()}") from None


Factory = Callable[..., Echod]


def spawn(
    tmp: Path,
    mode: str = "kernel",
    args: list[str] | None = None,
    wait: bool = True,
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
    hosts: tuple[str, ...] = HOSTS,
    port: int | None = None,
) -> Echod:
    """Start echod (on both loopbacks unless `hosts`); with wait, until it serves."""
    argv = ["--log-format", "json", "--log-level", "debug", *(args or [])]
    if "--workers" not in argv:
        # One process unless a test asks for workers (test_workers.py): these tests freeze,
        # limit and inspect the daemon's one pid.
        argv += ["--workers", "1"]
    # The tests choose every setting: none comes from the caller's environment.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}, **(env or {})}
    started = spawn_module.start(tmp, mode, hosts, argv, prefix or (), env, port)
    d = Echod(**vars(started))
    if wait:
        try:
            st = d.wait_serving(START_TIMEOUT)
        except SpawnError as exc:
            if d.proc.poll() is None:
                d.stop()
            raise AssertionError(f"{exc}:\n{d.log()}") from None
        bpf, bypass = st["bpf"], st.get("bypass") or {}
        udp = (st.get("udp") or {}).get("kernel") or {"programs": [], "maps": []}
        d.bpf_ids = (
            {p["id"] for p in bpf["programs"] + udp["programs"]}
            | set(bypass.get("prog_ids") or []),
            set(bpf["maps"]) | set(udp["maps"]) | set(bypass.get("map_ids") or []),
        )
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


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Objects built with ECHOD_FAULT: the echo drops 1-byte messages, the bypass refuses a
    client's first send, the UDP echo drops 1-byte datagrams (bpf/Makefile, target fault)."""
    out = tmp_path_factory.mktemp("fault")
    subprocess.run(
        ["make", "-s", "-C", str(REPO / "bpf"), "fault", f"FAULT_OUT={out}"],
        check=True,
        capture_output=True,
    )
    return out


# (mode, bypass): the four paths `echoctl compare --bypass` measures.
PATHS = [("user", False), ("user", True), ("kernel", False), ("kernel", True)]


def path_id(p: tuple[str, bool]) -> str:
    return p[0] + ("+bypass" if p[1] else "")


@pytest.fixture(scope="module", params=PATHS, ids=path_id)
def on_path(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Echod]:
    """One daemon per path, shared by the module's tests of that path."""
    require_bpf()
    mode, bypass = request.param
    d = spawn(tmp_path_factory.mktemp("echod"), mode, ["--bypass"] if bypass else [])
    st = d.status()
    assert st["mode"] == mode
    assert st["bypass"]["enabled"] is bypass
    yield d
    assert_clean_exit(d)
