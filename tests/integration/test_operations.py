"""Operations against a real daemon: sd_notify, reload, allow list, per-IP limit, /metrics."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import BIN, Echod, free_port, spawn
from tests.integration.echo_util import connect, roundtrip, send_without_reading, wait_for


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        yield sock, path


def read_until(sock: socket.socket, needle: str, timeout: float = 10.0) -> list[str]:
    """Datagrams until one contains needle."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = sock.recv(4096).decode()
        seen.append(msg)
        if needle in msg:
            return seen
    raise AssertionError(f"{needle!r} never arrived; saw {seen}")


@pytest.mark.bpf
def test_sd_notify_lifecycle(
    echod_factory: Callable[..., Echod], notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    d = echod_factory(mode="kernel", env=env)
    ready = read_until(sock, "READY=1")
    assert any("STATUS=" in m and "mode kernel" in m for m in ready), ready
    read_until(sock, "WATCHDOG=1")
    read_until(sock, "STATUS=")
    os.kill(d.proc.pid, signal.SIGHUP)
    reloading = read_until(sock, "RELOADING=1")
    assert "MONOTONIC_USEC=" in reloading[-1]
    read_until(sock, "READY=1")
    d.proc.send_signal(signal.SIGTERM)
    read_until(sock, "STOPPING=1")
    assert d.proc.wait(20) == 0


def reload_json(control: str) -> subprocess.CompletedProcess[str]:
    """`echoctl --json reload`, as an operator runs it."""
    return subprocess.run(
        [str(BIN / "echoctl"), "--control", control, "--json", "reload"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_reload_applies_live_settings_and_reports_restart_ones(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "echod.toml", "max_connections = 100\n")
    d = echod_factory(mode="user", args=["--config", str(cfg)])
    write_config(
        cfg, 'max_connections = 2\nallow = ["127.0.0.0/8"]\nport = 1\n[control]\ngroup = "adm"\n'
    )
    result = d.call("reload")
    assert set(result["applied"]) == {"max_connections", "allow"}
    # The port flag still overrides the file, so only the control group needs a restart.
    assert result["needs_restart"] == ["control_group"]
    assert "config.reloaded" in d.log()
    kept = [connect("127.0.0.1", d.port) for _ in range(2)]
    for sock in kept:
        roundtrip(sock, b"x")
    with connect("127.0.0.1", d.port) as extra:
        assert extra.recv(1) in (b"",)
    assert d.stats()["connections"]["refused"]["max_connections"] == 1
    for sock in kept:
        sock.close()
    assert d.status()["port"] == d.port, "a restart-only setting was applied live"


def test_reload_refuses_a_bad_file_and_keeps_running_config(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "echod.toml", "max_connections = 100\n")
    d = echod_factory(mode="user", args=["--config", str(cfg)])
    write_config(cfg, "max_connections = 100\nallow = ['10.0.0.0/33']\n")
    proc = subprocess.run(
        [str(BIN / "echoctl"), "--control", d.control, "reload"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1
    assert "allow" in proc.stderr + proc.stdout
    assert ":2:" in proc.stderr + proc.stdout  # the file line is named
    # SIGHUP with the same bad file: logged, and the daemon serves on with the old settings.
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for_log(d, "config.reload_rejected", count=2)
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"still serving")


def wait_for_log(d: Echod, needle: str, count: int = 1, timeout: float = 10.0) -> str:
    """The daemon's log once needle has appeared `count` times in it."""
    wait_for(
        lambda: d.log().count(needle) >= count, timeout, what=f"{needle!r} x{count} in the log"
    )
    return d.log()


def test_deeply_nested_config_is_rejected_on_reload_and_sighup(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "echod.toml", "max_connections = 100\n")
    d = echod_factory(mode="user", args=["--config", str(cfg)])
    write_config(cfg, "x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    proc = reload_json(d.control)
    assert proc.returncode == 1
    assert '"invalid_config"' in proc.stdout, proc.stdout + proc.stderr
    assert "nested too deeply" in proc.stdout
    os.kill(d.proc.pid, signal.SIGHUP)
    log = wait_for_log(d, "config.reload_rejected", count=2)
    assert "Task exception was never retrieved" not in log
    assert "Traceback" not in log
    assert d.status()["state"] == "serving"
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"still serving")


def test_bad_config_at_startup_names_key_and_line(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "echod.toml", 'port = 8888\nmode = "warp"\n')
    proc = subprocess.run(
        [str(BIN / "echod"), "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "mode" in proc.stderr
    assert f"{cfg}:2" in proc.stderr
    cfg = write_config(tmp_path / "echod.toml", "no_such_key = 1\n")
    proc = subprocess.run(
        [str(BIN / "echod"), "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "no_such_key" in proc.stderr


@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_allow_list_over_ipv4_and_ipv6(
    echod_factory: Callable[..., Echod], tmp_path: Path, mode: str
) -> None:
    cfg = write_config(tmp_path / "echod.toml", 'allow = ["127.0.0.0/8"]\n')
    d = echod_factory(mode=mode, args=["--config", str(cfg)])
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"v4 allowed")
    for _ in range(3):
        with connect("::1", d.port) as sock:
            assert sock.recv(1) == b"", "an address outside the allow list was served"
    assert d.stats()["connections"]["refused"]["allow"] == 3
    write_config(cfg, 'allow = ["::1/128"]\n')
    d.call("reload")
    with connect("::1", d.port) as sock:
        roundtrip(sock, b"v6 allowed now")
    with connect("127.0.0.1", d.port) as sock:
        assert sock.recv(1) == b""
    assert d.stats()["connections"]["refused"]["allow"] == 4
    assert d.log().count("conn.refused") >= 1


def test_max_connections_per_ip(echod_factory: Callable[..., Echod], tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "echod.toml", "max_connections_per_ip = 2\n")
    d = echod_factory(mode="user", args=["--config", str(cfg)])
    with connect("127.0.0.1", d.port) as a, connect("127.0.0.1", d.port) as b:
        roundtrip(a, b"a")
        roundtrip(b, b"b")
        with connect("127.0.0.1", d.port) as c:
            assert c.recv(1) == b""
        # Another loopback source address is another peer.
        with socket.create_connection(("127.0.0.1", d.port), 10, ("127.0.0.2", 0)) as other_ip:
            roundtrip(other_ip, b"c")
        assert d.stats()["connections"]["refused"]["per_ip"] == 1


def scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


@pytest.mark.parametrize("mode", [pytest.param("kernel", marks=pytest.mark.bpf), "user"])
def test_metrics_move_with_traffic(echod_factory: Callable[..., Echod], mode: str) -> None:
    port = free_port()
    d = echod_factory(mode=mode, args=["--metrics", f"127.0.0.1:{port}"])
    before = scrape(port)
    assert before[f"echod_mode{{mode={mode}}}"] == 1
    with connect("127.0.0.1", d.port) as sock:
        for _ in range(10):
            roundtrip(sock, os.urandom(1000))
    path = "kernel" if mode == "kernel" else "user"
    key = f"echod_bytes_total{{path={path}}}"
    # The scrape reads the snapshot the daemon takes every second.
    wait_for(
        lambda: scrape(port).get(key, 0) - before.get(key, 0) >= 10_000,
        what="the next metrics snapshot",
    )
    after = scrape(port)
    assert (
        after["echod_connections_accepted_total{}"]
        >= before["echod_connections_accepted_total{}"] + 1
    )
    assert after[key] - before.get(key, 0) >= 10_000
    assert any(k.startswith("echod_build_info") for k in after)


def test_metrics_off_by_default(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="user")
    assert "metrics.listening" not in d.log()


def test_unprivileged_port_needs_no_extra_capability(tmp_path: Path) -> None:
    """Sanity: the daemon's listen error names the address when binding is refused."""
    d = spawn(tmp_path, "user", ["--host", "192.0.2.1"], wait=False)
    assert d.proc.wait(20) == 1
    assert "cannot listen on 192.0.2.1" in d.log()


def test_busy_metrics_port_fails_start_cleanly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = spawn(tmp_path, "user", ["--metrics", f"127.0.0.1:{port}"], wait=False)
        assert d.proc.wait(20) == 1
    assert f"metrics address 127.0.0.1:{port}" in d.log()
    assert "Traceback" not in d.log()
    assert not Path(d.control).exists()


def test_reload_to_a_busy_metrics_port_keeps_the_old_one(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    old = free_port()
    cfg = write_config(tmp_path / "echod.toml", f'[metrics]\naddress = "127.0.0.1:{old}"\n')
    d = echod_factory(mode="user", args=["--config", str(cfg)])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        write_config(cfg, f'[metrics]\naddress = "127.0.0.1:{busy}"\n')
        proc = reload_json(d.control)
    assert proc.returncode == 1
    assert '"invalid_config"' in proc.stdout
    assert scrape(old)["echod_mode{mode=user}"] == 1  # the old endpoint still serves
    write_config(cfg, f'[metrics]\naddress = "127.0.0.1:{old}"\n')
    assert d.call("reload")["applied"] == []


def test_unknown_control_group_is_a_config_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "echod.toml", '[control]\ngroup = "nosuchgroupxyz"\n')
    proc = subprocess.run(
        [str(BIN / "echod"), "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert "nosuchgroupxyz" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.bpf
def test_total_kernel_backlog_is_bounded(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    """Peers that each stay under the per-connection limit are reset, largest first, once their
    sum passes kernel_backlog_total."""
    mib = 1024 * 1024
    cfg = write_config(
        tmp_path / "echod.toml",
        f"kernel_backlog_limit = {16 * mib}\nkernel_backlog_total = {16 * mib}\n",
    )
    d = echod_factory(mode="kernel", args=["--config", str(cfg)])
    with contextlib.ExitStack() as stack:
        for _ in range(3):
            hog = stack.enter_context(connect("127.0.0.1", d.port))
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # read nothing, hold little
            # Up to ~4 MiB of echo sits in the daemon's send buffer, which counts as written.
            send_without_reading(hog, 12 * mib, seconds=5.0)
        wait_for(
            lambda: d.stats()["connections"]["aborted_backlog"] >= 1,
            timeout=5,
            what="the total backlog to be bounded",
        )
        assert d.stats()["connections"]["aborted_backlog"] <= 2
        assert "conn.backlog_exceeded" in d.log()
        with connect("127.0.0.1", d.port) as other:
            roundtrip(other, b"others are still served")
