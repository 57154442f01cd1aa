"""Start-up, fallback, bad input, shutdown and leaks of a real daemon."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from echod.kernel.echo import default_object
from tests.integration.conftest import (
    BIN,
    START_TIMEOUT,
    Echod,
    assert_unloaded,
    free_port,
    loaded_bpf_ids,
    spawn,
)
from tests.integration.echo_util import connect, roundtrip, wait_for

UNVERIFIABLE = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 16);
	__type(key, __u64);
	__type(value, __u64);
} echo_sockets SEC(".maps");
SEC("sk_skb/stream_verdict")
int echo_verdict(struct __sk_buff *skb)
{
	/* Reads past the end of the context: the verifier must refuse this. */
	return *(volatile __u32 *)((char *)skb + 4096);
}
char LICENSE[] SEC("license") = "GPL";
"""


@pytest.fixture
def unverifiable_object(tmp_path: Path) -> Path:
    """A BPF object the verifier refuses, built with the project's clang."""
    clang = shutil.which("clang-14") or shutil.which("clang")
    if clang is None:
        if os.environ.get("ECHOD_REQUIRE_BPF") == "1":
            pytest.fail("clang is needed to build the unverifiable test object")
        pytest.skip("no clang")
    src = tmp_path / "bad.bpf.c"
    src.write_text(UNVERIFIABLE)
    out = tmp_path / "bad.bpf.o"
    arch = f"/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run(
        [clang, "-O2", "-g", "-target", "bpf", f"-I{arch}", "-c", str(src), "-o", str(out)],
        check=True,
    )
    return out


def bad_objects(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.bpf.o"
    data = bytearray(default_object().read_bytes())
    data[64:512] = os.urandom(448)
    corrupt.write_bytes(bytes(data))
    not_elf = tmp_path / "text.bpf.o"
    not_elf.write_text("not an ELF object\n")
    return {"missing": tmp_path / "nope.bpf.o", "corrupt": corrupt, "not_elf": not_elf}


@pytest.mark.parametrize("kind", ["missing", "corrupt", "not_elf", "unverifiable"])
def test_auto_falls_back_to_user_with_reason(
    echod_factory: Callable[..., Echod], tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    obj = (
        request.getfixturevalue("unverifiable_object")
        if kind == "unverifiable"
        else bad_objects(tmp_path)[kind]
    )
    d = echod_factory(mode="auto", args=["--bpf-object", str(obj)])
    st = d.status()
    assert st["mode"] == "user"
    assert st["requested_mode"] == "auto"
    assert st["fallback_reason"]
    # libbpf's own error codes (4000 and up) are described, never "Unknown error 4001".
    assert "Unknown error" not in st["fallback_reason"]
    if kind == "not_elf":
        assert "BPF object format invalid" in st["fallback_reason"]
    assert not st["bpf"]["attached"]
    assert "service.fallback_to_user" in d.log()
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, os.urandom(5000))


@pytest.mark.bpf
@pytest.mark.parametrize("kind", ["missing", "corrupt", "unverifiable"])
def test_explicit_kernel_mode_fails_clearly(
    tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    obj = (
        request.getfixturevalue("unverifiable_object")
        if kind == "unverifiable"
        else bad_objects(tmp_path)[kind]
    )
    progs_before, maps_before = loaded_bpf_ids(ours=True)
    d = spawn(tmp_path, "kernel", ["--bpf-object", str(obj)], wait=False)
    code = d.proc.wait(20)
    assert code == 1
    # One plain line besides the JSON log: the reason reads the same on a terminal or not.
    plain = [line for line in d.log().splitlines() if line.startswith("echod: ")]
    assert len(plain) == 1, d.log()
    assert plain[0].startswith("echod: kernel mode unavailable: "), plain
    assert "Unknown error" not in plain[0]
    assert '"event": "daemon.start_failed"' in d.log()
    assert not Path(d.control).exists(), "control socket left behind"
    progs_after, maps_after = loaded_bpf_ids(ours=True)
    assert_unloaded(progs_after - progs_before, maps_after - maps_before)


@pytest.mark.bpf
def test_auto_is_kernel_when_possible(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="auto")
    st = d.status()
    assert st["mode"] == "kernel"
    assert st["fallback_reason"] is None
    assert st["bpf"]["attached"]
    assert st["bpf"]["programs"]


def test_port_in_use_exits_nonzero(echod_factory: Callable[..., Echod], tmp_path: Path) -> None:
    first = echod_factory(mode="user")
    d = spawn(tmp_path, "user", ["--port", str(first.port)], wait=False)
    # spawn() picked a fresh port; the later --port wins and collides with the first daemon.
    assert d.proc.wait(20) == 1
    assert '"event": "daemon.start_failed"' in d.log()
    plain = [line for line in d.log().splitlines() if line.startswith("echod: ")]
    assert plain == [
        f"echod: cannot listen on 127.0.0.1 port {first.port}: Address already in use"
    ], d.log()


@pytest.mark.bpf
def test_sigint_is_graceful_and_leaves_nothing(echod_factory: Callable[..., Echod]) -> None:
    d = echod_factory(mode="kernel")
    progs, maps = d.bpf_ids
    assert progs
    assert maps
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"x" * 1000)
        d.proc.send_signal(2)
        assert d.proc.wait(20) == 0
        assert sock.recv(1) == b"", "connection not closed on shutdown"
    assert_unloaded(progs, maps)
    assert not Path(d.control).exists()
    log = d.log()
    for event in ("daemon.signal", "service.stopping", "bpf.detached", "daemon.exited"):
        assert event in log


def test_no_fd_leak_over_many_connections(daemon: Echod) -> None:
    baseline = daemon.stats()["process"]["open_fds"]
    for _ in range(5):
        with contextlib.ExitStack() as stack:
            socks = [stack.enter_context(connect("127.0.0.1", daemon.port)) for _ in range(40)]
            for sock in socks:
                roundtrip(sock, b"ping")
    wait_for(
        lambda: daemon.stats()["process"]["open_fds"] <= baseline,
        what="fds to return to the baseline",
    )


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A scratch directory an unprivileged uid can write (pytest's own are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="echod-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.bpf
def test_least_privilege_kernel_mode(world_dir: Path) -> None:
    """uid 65534 with only CAP_BPF + CAP_NET_ADMIN serves in kernel mode."""
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed")
    tmp_path = world_dir
    prefix = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=+bpf,+net_admin",
        "--ambient-caps=+bpf,+net_admin",
    ]
    d = spawn(tmp_path, "kernel", [], prefix=prefix)
    try:
        st = d.status()
        assert st["mode"] == "kernel"
        with open(f"/proc/{st['pid']}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        assert fields["Uid"].split()[0] == "65534"
        assert int(fields["CapEff"], 16) == (1 << 39) | (1 << 12)  # CAP_BPF | CAP_NET_ADMIN
        with connect("127.0.0.1", d.port) as sock:
            roundtrip(sock, os.urandom(70000))
        assert d.stats()["kernel"]["redirected_bytes"] >= 70000
    finally:
        assert d.stop() == 0, d.log()


@pytest.mark.bpf
def test_shutdown_waits_for_inflight_echo(echod_factory: Callable[..., Echod]) -> None:
    """A client whose echo is still in flight when SIGTERM arrives gets all of it back."""
    d = echod_factory(mode="kernel")
    with connect("127.0.0.1", d.port) as sock:
        payload = os.urandom(4 * 1024 * 1024)
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        sender.join(10)
        assert not sender.is_alive(), "the payload was not all sent before the stop"
        d.proc.send_signal(15)
        got = bytearray()
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
    assert bytes(got) == payload
    assert d.proc.wait(20) == 0


def test_restart_to_kernel_without_bpf_is_refused_and_keeps_serving(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    d = echod_factory(mode="user", args=["--bpf-object", str(tmp_path / "absent.bpf.o")])
    with connect("127.0.0.1", d.port) as sock:
        roundtrip(sock, b"before")
        proc = subprocess.run(
            [str(BIN / "echoctl"), "--control", d.control, "--json", "restart", "--mode", "kernel"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 1
        assert '"not_supported"' in proc.stdout + proc.stderr
        roundtrip(sock, b"after")
    st = d.status()
    assert st["mode"] == "user"
    assert st["state"] == "serving"


def _stale_socket(path: Path) -> Path:
    """A socket file nobody answers on, as a crashed daemon leaves it."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


def _bad_setting_cases(tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str], str]]:
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 50_000 + "]" * 50_000 + "\n")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes(b"# caf\xe9\nport = 1\n")
    too_long = "/tmp/" + "x" * 95
    options = "option --control='relative.sock'"
    variable = "environment variable ECHOD_CONTROL='relative.sock'"
    return {
        "metrics": (["--metrics", "bogus"], {}, "option --metrics='bogus': 'bogus' is not HOST"),
        "host": (["--host", "999.1.1.1"], {}, "option --host='999.1.1.1': "),
        "host-name": (
            ["--host", "nosuch.invalid"],
            {},
            "is not an IP address and does not resolve",
        ),
        "control": (["--control", "relative.sock"], {}, f"{options}: must be an absolute path"),
        "control-env": (
            [],
            {"ECHOD_CONTROL": "relative.sock"},
            f"{variable}: must be an absolute path",
        ),
        "control-long": (["--control", too_long], {}, "is too long (100 bytes)"),
        "dev-null": (["--config", "/dev/null"], {}, "/dev/null: is a character device, not a"),
        "directory": (["--config", str(tmp_path)], {}, f"{tmp_path}: is a directory, not a"),
        "deep": (["--config", str(deep)], {}, f"{deep}: invalid TOML: arrays or tables are nested"),
        "not-utf8": (["--config", str(latin1)], {}, f"{latin1}:1: not UTF-8 text (byte 0xe9"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "metrics",
        "host",
        "host-name",
        "control",
        "control-env",
        "control-long",
        "dev-null",
        "directory",
        "deep",
        "not-utf8",
    ],
)
def test_bad_setting_exits_2_before_anything_is_bound(tmp_path: Path, case: str) -> None:
    """Flags, environment and file go through the same validators, before any side effect."""
    args, extra_env, needle = _bad_setting_cases(tmp_path)[case]
    stale = _stale_socket(tmp_path / "control.sock")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")} | extra_env
    argv = [str(BIN / "echod"), "--mode", "auto", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--control", str(stale), "--log-level", "debug", "--log-format", "json", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 2, proc.stderr
    # One line, naming the setting and the value: no log line, so nothing was bound or attached.
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("echod: configuration error: "), proc.stderr
    assert needle in proc.stderr
    assert stale.is_socket(), "the old control socket was removed before the config was checked"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_unreadable_config_file_is_named(world_dir: Path) -> None:
    cfg = world_dir / "echod.toml"
    cfg.write_text("port = 1\n")
    cfg.chmod(0o600)  # root's; the daemon runs as nobody
    argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(BIN / "echod")]
    argv += ["--config", str(cfg), "--control", str(world_dir / "c.sock")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"echod: configuration error: {cfg}: cannot read: Permission denied\n"


def _serving(d: Echod) -> bool:
    assert d.proc.poll() is None, f"echod exited with {d.proc.returncode}:\n{d.log()}"
    try:
        return bool(d.status()["state"] == "serving")
    except OSError:
        return False


def _wait_serving(d: Echod) -> None:
    wait_for(lambda: _serving(d), START_TIMEOUT, what="echod to become ready")


def test_longest_control_path_serves(world_dir: Path) -> None:
    """94 bytes is the limit: the socket is bound as .NAME.PID.tmp (PID up to 7 digits) first."""
    directory = str(world_dir)
    control = os.path.join(directory, "c" * (94 - len(directory) - 1))
    assert len(control) == 94
    d = spawn(world_dir, "user", ["--control", control], wait=False)
    d.control = control
    try:
        _wait_serving(d)
    finally:
        assert d.stop() == 0, d.log()
    assert not Path(control).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_work_after_the_stderr_reader_is_gone(tmp_path: Path, sig: int) -> None:
    """Logging into a pipe nobody reads (EPIPE) drops records; it never wedges the daemon."""
    port = free_port()
    control = tmp_path / "control.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
    argv = [str(BIN / "echod"), "--mode", "user", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--control", str(control), "--log-format", "json", "--log-level", "debug"]
    r, w = os.pipe()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w, env=env
    )
    os.close(w)
    try:
        seen = b""
        deadline = time.monotonic() + START_TIMEOUT
        while b"daemon.ready" not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"echod did not become ready: {seen!r}"
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 65536)
                assert chunk, f"echod closed stderr: {seen!r}"
                seen += chunk
        os.close(r)
        r = -1
        for _ in range(3):  # each connection logs, into the broken pipe
            with connect("127.0.0.1", port) as sock:
                roundtrip(sock, b"still echoing")
        proc.send_signal(sig)
        assert proc.wait(20) == 0
    finally:
        if r >= 0:
            os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not control.exists()
