"""Trust no kernel blindly: early senders on every path, the bypass's scope, the self-check."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import BIN, Echod, Factory, free_port, require_bpf, spawn
from tests.integration.echo_util import connect, recv_exact, roundtrip

pytestmark = pytest.mark.bpf


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_python_clients_that_send_at_once_are_echoed(on_path: Echod, host: str) -> None:
    """No client sees an error a plain echo server would not give it, whatever its timing."""
    for i in range(40):
        payload = os.urandom(1 + i * 1601)
        with socket.create_connection((host, on_path.port), timeout=10) as sock:
            sock.sendall(payload)  # at once after the handshake, before echod can accept
            assert recv_exact(sock, len(payload)) == payload


def _tool_argv(tool: str, host: str, port: int) -> list[str]:
    bracketed = f"[{host}]" if ":" in host else host
    if tool == "socat":
        return ["socat", "-t5", "-", f"TCP:{bracketed}:{port}"]
    if tool == "ncat":
        return ["ncat", host, str(port)]
    return ["nc", "-N", host, str(port)]  # OpenBSD netcat: shut down its side on EOF


@pytest.mark.parametrize("tool", ["socat", "ncat", "nc"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_command_line_clients_are_echoed(on_path: Echod, tool: str, host: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (make deps installs it)")
    payload = os.urandom(3000).hex().encode() + b"\n"
    for _ in range(5):
        done = subprocess.run(
            _tool_argv(tool, host, on_path.port),
            input=payload,
            capture_output=True,
            timeout=20,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout == payload, done.stderr.decode()


def test_a_client_that_sends_at_once_takes_the_short_circuit_once_echoed(
    echod_factory: Factory,
) -> None:
    d = echod_factory(mode="kernel", args=["--bypass"])
    before = d.stats()["bypass"]
    with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
        for _ in range(5):
            roundtrip(sock, os.urandom(5000))
    after = d.stats()["bypass"]
    assert after["deferred_conns"] - before["deferred_conns"] == 1
    assert after["late_bypassed_conns"] - before["late_bypassed_conns"] == 1
    assert after["short_msgs"] > before["short_msgs"]


# ---------------------------------------------------------------------------------------------
# The bypass touches echod's connections only


class OtherServer(threading.Thread):
    """Another service on the same port number: it answers "RESPONSE " and what it read."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(64)
        self.received = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = recv_exact(conn, 100)
                self.received += len(data)
                conn.sendall(b"RESPONSE " + data)


@pytest.fixture
def other_on_v6() -> Iterator[OtherServer]:
    port = free_port()
    other = OtherServer("::1", port)
    other.start()
    yield other
    other.listener.close()


@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_another_server_on_the_port_number_is_untouched(
    echod_factory: Factory, other_on_v6: OtherServer, mode: str
) -> None:
    """echod on 127.0.0.1:P with the bypass, another server on [::1]:P: its clients get it."""
    port = other_on_v6.listener.getsockname()[1]
    d = echod_factory(mode=mode, args=["--bypass"], hosts=("127.0.0.1",), port=port)
    before = d.stats()["bypass"]["client_sockets"]  # the self-check's clients are counted too
    for _ in range(10):
        payload = os.urandom(100)
        with socket.create_connection(("::1", port), timeout=10) as sock:
            sock.sendall(payload)
            assert recv_exact(sock, 109) == b"RESPONSE " + payload
    assert other_on_v6.received == 1000
    assert d.stats()["bypass"]["client_sockets"] == before  # none of the other's clients
    with connect("127.0.0.1", port) as ours:
        roundtrip(ours, os.urandom(1000))
        roundtrip(ours, os.urandom(1000))
    assert d.stats()["bypass"]["client_sockets"] == before + 1


def test_another_echod_on_the_port_number_is_untouched(
    echod_factory: Factory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Two daemons on one port number, other addresses: one's bypass leaves the other's be."""
    require_bpf()
    port = free_port()
    echod_factory(mode="user", args=["--bypass"], hosts=("127.0.0.1",), port=port)
    second = spawn(tmp_path_factory.mktemp("echod"), "kernel", hosts=("::1",), port=port)
    try:
        for _ in range(10):
            with socket.create_connection(("::1", port), timeout=5) as sock:
                roundtrip(sock, os.urandom(2000))
    finally:
        assert second.stop() == 0


def test_a_wildcard_bind_covers_local_addresses(echod_factory: Factory) -> None:
    d = echod_factory(mode="kernel", args=["--bypass"], hosts=("0.0.0.0", "::"))
    before = d.stats()["bypass"]
    for host in ("127.0.0.1", "127.0.0.2", "::1"):
        with connect(host, d.port) as sock:
            roundtrip(sock, os.urandom(300))
            roundtrip(sock, os.urandom(300))
    after = d.stats()["bypass"]
    assert after["bypassed_conns"] - before["bypassed_conns"] == 3
    assert d.status()["bypass"]["listen"] == [f"0.0.0.0:{d.port}", f"[::]:{d.port}"]


# ---------------------------------------------------------------------------------------------
# The self-check


def test_status_reports_the_self_check_of_the_path_in_use(on_path: Echod) -> None:
    st = on_path.status()
    name = st["mode"] + ("+bypass" if st["bypass"]["enabled"] else "")
    entry = st["self_check"][name]
    assert entry["result"] == "passed", entry
    assert entry["ms"] < 2000
    assert all(v == "passed" for v in entry["cases"].values()), entry
    assert set(st["self_check"]) == {"user", "user+bypass", "kernel", "kernel+bypass"}


def test_auto_falls_back_when_the_kernel_path_fails(echod_factory: Factory, faulty: Path) -> None:
    d = echod_factory(mode="auto", args=["--bpf-object", str(faulty / "echo.bpf.o")])
    st = d.status()
    assert st["mode"] == "user"
    assert "the kernel path failed its self-check" in st["fallback_reason"]
    assert "send 1 B right after connect" in st["fallback_reason"]
    assert st["self_check"]["kernel"]["result"] == "failed"
    assert st["self_check"]["kernel"]["case"] == "early_1b"
    assert st["self_check"]["user"]["result"] == "passed"
    assert st["bpf"]["attached"] is False  # nothing of the failed path stays loaded
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as sock:
        sock.sendall(b"x")
        assert recv_exact(sock, 1) == b"x"


def test_auto_with_the_bypass_falls_back_to_kernel(echod_factory: Factory, faulty: Path) -> None:
    d = echod_factory(
        mode="auto", args=["--bypass", "--bypass-object", str(faulty / "bypass.bpf.o")]
    )
    st = d.status()
    assert st["mode"] == "kernel"
    assert st["bypass"]["enabled"] is False
    assert "send failed with EACCES" in st["fallback_reason"]
    assert st["self_check"]["kernel+bypass"]["result"] == "failed"


def test_an_explicit_failing_path_refuses_to_start(
    tmp_path_factory: pytest.TempPathFactory, faulty: Path
) -> None:
    require_bpf()
    d = spawn(
        tmp_path_factory.mktemp("echod"),
        "kernel",
        ["--bypass", "--bypass-object", str(faulty / "bypass.bpf.o")],
        wait=False,
    )
    assert d.proc.wait(30) == 1
    assert (
        "echod: the kernel+bypass path failed its self-check: send 1 B right after connect: "
        "send failed with EACCES"
    ) in d.log()


def test_restart_into_a_failing_path_is_refused_and_nothing_changes(
    echod_factory: Factory, faulty: Path
) -> None:
    d = echod_factory(mode="user", args=["--bpf-object", str(faulty / "echo.bpf.o")])
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, os.urandom(1000))
        with pytest.raises(Exception, match="self_check_failed") as info:
            d.call("restart", {"mode": "kernel"}, timeout=60)
        assert "send 1 B right after connect" in str(info.value)
        st = d.status()
        assert st["mode"] == "user"
        assert st["self_check"]["kernel"]["result"] == "failed"
        roundtrip(sock, os.urandom(1000))


def test_echoctl_check_names_the_failing_path(
    tmp_path_factory: pytest.TempPathFactory, faulty: Path
) -> None:
    require_bpf()
    nowhere = tmp_path_factory.mktemp("nodaemon") / "none.sock"
    argv = [str(BIN / "echoctl"), "--control", str(nowhere), "check"]
    good = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr
    result = json.loads(good.stdout)
    assert {p: e["result"] for p, e in result["paths"].items()} == dict.fromkeys(
        ("user", "user+bypass", "kernel", "kernel+bypass"), "passed"
    )
    bad = subprocess.run(
        [*argv, "--bpf-object", str(faulty / "echo.bpf.o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert "kernel: failed: send 1 B right after connect: no echo within 2 s" in bad.stdout
    assert "kernel+bypass: failed" in bad.stdout


def test_echoctl_check_asks_a_running_daemon(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    done = subprocess.run(
        [str(BIN / "echoctl"), "--control", d.control, "check", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["paths"]["kernel+bypass"]["result"] == "passed"
    st = d.status()
    assert st["mode"] == "user"  # the check left the serving path alone
    assert st["bpf"]["attached"] is False
    assert st["bypass"]["enabled"] is False
    assert st["self_check"]["kernel"]["result"] == "passed"
