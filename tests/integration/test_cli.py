"""`echoctl` as a user runs it (the installed console script) against a real daemon."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.conftest import Echod, require_bpf, spawn
from tests.integration.echo_util import connect, roundtrip, wait_for

Factory = Callable[..., Echod]
ECHOCTL = str(Path(sys.executable).parent / "echoctl")


def echoctl(
    d: Echod | str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run echoctl --control <socket> ARGS (stdout is a pipe, so never a TTY)."""
    path = d if isinstance(d, str) else d.control
    base = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    return subprocess.run(
        [ECHOCTL, "--control", path, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def ok_json(r: subprocess.CompletedProcess[str]) -> dict:
    assert r.returncode == 0, r
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["kernel", "user"])
def test_status_both_output_modes(echod_factory: Factory, mode: str) -> None:
    d = echod_factory(mode=mode)
    r = echoctl(d, "status")
    assert r.returncode == 0, r
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["state", "serving"]
    assert lines[1].split()[:2] == ["mode", mode]
    # Labels and values are aligned in two columns.
    assert len({line.index(line.split()[1]) for line in lines if len(line.split()) > 1}) == 1
    for args in (["--json", "status"], ["status", "--json"]):
        st = ok_json(echoctl(d, *args))
        assert st["mode"] == mode
        assert st["state"] == "serving"


def test_stats(echod_factory: Factory) -> None:
    d = echod_factory(mode="kernel")
    with connect(d.host, d.port) as sock:
        for _ in range(20):
            roundtrip(sock, b"x" * 64)
    r = echoctl(d, "stats")
    assert r.returncode == 0, r
    assert "rss" in r.stdout
    assert "MiB" in r.stdout
    assert "echo_verdict" in r.stdout
    stats = ok_json(echoctl(d, "stats", "--json"))
    assert stats["connections"]["accepted"] >= 1
    assert stats["kernel"]["redirected_bytes"] + stats["user"]["bytes"] >= 20 * 64


def test_stop_start_restart_reload(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    r = echoctl(d, "stop")
    assert (r.returncode, r.stdout.strip()) == (0, "echod stopped")
    r = echoctl(d, "status")
    assert r.returncode == 3
    assert "stopped" in r.stdout
    assert ok_json_rc(echoctl(d, "--json", "status"), 3)["state"] == "stopped"
    r = echoctl(d, "stop")
    assert r.returncode == 1
    assert "bad_state" in r.stderr
    err = ok_json_rc(echoctl(d, "stop", "--json"), 1)
    assert err["error"]["code"] == "bad_state"
    r = echoctl(d, "start", "--mode", "user", "--port", str(d.port))
    assert r.returncode == 0, r
    assert r.stdout.strip() == f"echod serving in user mode on 127.0.0.1:{d.port}, [::1]:{d.port}"
    r = echoctl(d, "restart")
    assert r.returncode == 0, r
    assert r.stdout.strip().endswith("; connections moved 0, stayed 0"), r
    assert ok_json(echoctl(d, "restart", "--mode", "user", "--json"))["state"] == "serving"
    assert ok_json(echoctl(d, "--json", "stop"))["state"] == "stopped"
    assert ok_json(echoctl(d, "start", "--json"))["state"] == "serving"
    r = echoctl(d, "reload")
    assert (r.returncode, r.stdout.strip()) == (0, "configuration unchanged")
    assert ok_json(echoctl(d, "reload", "--json")) == {"applied": [], "needs_restart": []}
    with connect(d.host, d.port) as sock:
        roundtrip(sock, os.urandom(1000))


@pytest.mark.bpf
def test_restart_says_what_moved_and_what_stayed(echod_factory: Factory) -> None:
    """The human line carries the reply's migration, as the JSON does."""
    d = echod_factory(mode="user")
    require_bpf()
    with connect(d.host, d.port) as sock:
        roundtrip(sock, b"x")
        # Kernel mode moves the open user-path connection into the sockhash.
        r = echoctl(d, "restart", "--mode", "kernel")
        assert r.returncode == 0, r
        assert r.stdout.strip() == (
            f"echod serving in kernel mode on 127.0.0.1:{d.port}, [::1]:{d.port}; "
            "connections moved 1, stayed 0"
        )
        # Back to user: the kernel-path connection keeps its path until it closes.
        r = echoctl(d, "restart", "--mode", "user")
        assert r.returncode == 0, r
        assert r.stdout.strip().endswith("; connections moved 0, stayed 1"), r
        roundtrip(sock, os.urandom(1000))


def ok_json_rc(r: subprocess.CompletedProcess[str], rc: int) -> dict:
    assert r.returncode == rc, r
    return json.loads(r.stdout)


def test_watch_json_lines(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    t0 = time.monotonic()
    r = echoctl(d, "watch", "--interval", "0.1", "--count", "5")
    assert r.returncode == 0, r
    assert time.monotonic() - t0 < 10
    snaps = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(snaps) == 5
    assert all(s["status"]["state"] == "serving" for s in snaps)
    r = echoctl(d, "--json", "watch", "-n", "1")
    assert len(r.stdout.splitlines()) == 1
    # The stream ended with the process; the daemon has no watcher left.
    wait_for(lambda: d.status()["control"]["watchers"] == 0, what="no watcher left")


def test_watch_flushes_each_line(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with subprocess.Popen(
        [ECHOCTL, "--control", d.control, "watch", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            first = json.loads(proc.stdout.readline())
            second = json.loads(proc.stdout.readline())
            assert second["time"] > first["time"]
        finally:
            proc.terminate()
            proc.wait(10)


def test_watch_live_table_on_a_tty(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    r = subprocess.run(
        ["script", "-qec", f"{ECHOCTL} --control {d.control} watch -i 0.1 -n 3", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert r.returncode == 0, r
    for label in (
        "mode",
        "connections",
        "requests",
        "throughput",
        "kernel / user",
        "cpu",
        "rss",
        "per verdict",
    ):
        assert label in r.stdout
    assert "req/s" in r.stdout
    assert "MiB" in r.stdout


def test_control_from_environment(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    base = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    r = subprocess.run(
        [ECHOCTL, "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, "ECHOD_CONTROL": d.control},
    )
    assert json.loads(r.stdout)["state"] == "serving"


def test_watch_ends_quietly_when_the_reader_goes(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    # `echoctl watch | head -1`: the reader takes one line and closes the pipe.
    with subprocess.Popen(
        [ECHOCTL, "--control", d.control, "watch", "--interval", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        json.loads(proc.stdout.readline())
        proc.stdout.close()
        try:
            code = proc.wait(10)
        finally:
            proc.kill()
        stderr = proc.stderr.read()
    assert code == 0
    assert stderr == ""
    wait_for(lambda: d.status()["control"]["watchers"] == 0, what="no watcher left")


def test_short_json_flag(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    for args in (["-j", "status"], ["status", "-j"]):
        assert ok_json(echoctl(d, *args))["state"] == "serving"
    r = echoctl(d, "watch", "--help")
    assert "one JSON object per line" in " ".join(r.stdout.split())


def test_stats_show_dropped_bytes_and_bpf_figures(echod_factory: Factory) -> None:
    d = echod_factory(mode="kernel")
    r = echoctl(d, "stats")
    assert r.returncode == 0, r
    assert "aborted (backlog)" in r.stdout
    assert "insert failed" in r.stdout
    if d.status()["bpf"].get("stats_enabled") is False:
        assert "unavailable" in r.stdout


def test_watch_reconnect_resumes_after_a_restart(tmp_path: Path) -> None:
    first = spawn(tmp_path, "user")
    second: Echod | None = None
    args = ["watch", "-i", "0.2", "-n", "6", "--reconnect"]
    proc = subprocess.Popen(
        [ECHOCTL, "--control", first.control, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        snaps = [json.loads(proc.stdout.readline())]
        assert first.stop() == 0
        second = spawn(tmp_path, "user")  # the same control socket path
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        snaps += [json.loads(line) for line in out.splitlines()]
        assert len(snaps) == 6
        pids = [s["status"]["pid"] for s in snaps]
        assert pids[0] == first.proc.pid
        assert pids[-1] == second.proc.pid
        assert "waiting for the daemon" in err
    finally:
        proc.kill()
        proc.wait()
        first.stop()
        if second is not None:
            assert second.stop() == 0


def test_full_listen_backlog_is_busy_not_stopped(tmp_path: Path) -> None:
    path = str(tmp_path / "full.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(0)  # never accepts: the backlog fills
        queued: list[socket.socket] = []
        try:
            for _ in range(64):
                s = socket.socket(socket.AF_UNIX)
                s.setblocking(False)
                queued.append(s)
                try:
                    s.connect(path)
                except BlockingIOError:
                    break
            else:
                pytest.fail("the listen backlog never filled")
            r = echoctl(path, "--timeout", "1", "status")
            assert r.returncode == 1, r
            assert "busy" in r.stderr
            assert "is echod running" not in r.stderr
            err = ok_json_rc(echoctl(path, "--timeout", "1", "-j", "status"), 1)
            assert err["error"]["code"] == "busy"
        finally:
            for s in queued:
                s.close()


FALLBACK = """
import os, socket, subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
os.mkdir("/run/echod", 0o755)
listener = socket.socket(socket.AF_UNIX)
listener.bind("/run/echod/control.sock")
os.chmod("/run/echod/control.sock", 0o666)
listener.listen(8)
code = (
    "import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['echoctl', *sys.argv[2:]]; "
    "from echoctl.cli import main; main()"
)
r = subprocess.run(
    ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
     "env", "XDG_RUNTIME_DIR=/nonexistent", "/usr/bin/python3", "-c", code, sys.argv[1],
     "--timeout", "1", "status"],
    capture_output=True, text=True, timeout=30, cwd="/",
)
print(r.stderr, end="")
"""


def test_a_user_without_a_socket_falls_back_to_the_system_one() -> None:
    # A private mount namespace with its own /run: the machine's /run is never touched.
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs a system python3 that uid 65534 can run")
    site = next(p for p in sys.path if p.endswith("site-packages"))
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", FALLBACK, site],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r
    assert "/run/echod/control.sock" in r.stdout, r
    assert "nonexistent" not in r.stdout
