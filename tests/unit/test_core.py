"""Unit tests for the pieces that need no privileges: config precedence, libbpf errors, logs."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest

from echod import logs
from echod.config.schema import Config, ConfigError
from echod.config.sources import resolve
from echod.kernel import bypass, bypass_paths, libbpf
from echod.kernel.echo import COUNTER_FIELDS, COUNTERS_STRUCT, default_object
from echod.kernel.errors import NotSupported
from echod.logs import RateLimited

ROOT = Path(__file__).resolve().parents[2]


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    cfg_file = tmp_path / "echod.toml"
    cfg_file.write_text('port = 7000\nmode = "user"\nmax_connections = 50\n')
    env = {"ECHOD_PORT": "7100", "ECHOD_MAX_CONNECTIONS": "60"}
    cfg = resolve({"port": 7200, "mode": None}, str(cfg_file), env)
    assert cfg.port == 7200  # flag beats env and file
    assert cfg.max_connections == 60  # env beats file
    assert cfg.mode == "user"  # file beats default; an unset flag does not count
    assert cfg.log_level == Config().log_level  # default
    assert cfg.config_file == str(cfg_file)


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("echod.config.sources.DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    cfg = resolve({}, None, {})
    assert cfg.hosts == ["127.0.0.1", "::1"]
    assert cfg.port == 8888
    assert cfg.mode == "auto"


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        resolve({}, str(tmp_path / "nope.toml"), {})


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"mode": "turbo"}, "^option --mode='turbo': "),
        ({"port": 0}, "^option --port=0: "),
        ({"max_connections": 0}, "^option --max-connections=0: "),
        ({"kernel_backlog_limit": 10}, "^option --kernel-backlog-limit=10: "),
        ({"log_level": "loud"}, "^option --log-level='loud': "),
    ],
)
def test_bad_values_name_the_setting(flags: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve(flags, None, {})


def test_negative_rc_becomes_oserror_with_call_name() -> None:
    with pytest.raises(OSError, match="bpf_thing") as info:
        libbpf.check(-errno.EBADF, "bpf_thing")
    assert info.value.errno == errno.EBADF
    assert type(info.value) is OSError


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EPERM])
def test_unsupported_errnos_become_not_supported(code: int) -> None:
    with pytest.raises(NotSupported):
        libbpf.check(-code, "bpf_prog_load")


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (4000, "Something wrong in libelf"),
        (4001, "BPF object format invalid"),
        (4006, "Load program failure for unknown reason"),
        (4007, "Kernel verifier blocks program loading"),
        (4013, "Incorrect netlink message parsing"),
        (4050, "libbpf error 4050"),
    ],
)
def test_libbpf_codes_are_described(code: int, words: str) -> None:
    with pytest.raises(OSError, match="bpf_object__open_file") as info:
        libbpf.check(-code, "bpf_object__open_file(x.o)")
    assert info.value.errno == code
    assert info.value.strerror == words


def test_libbpf_table_matches_libbpf_strerror() -> None:
    """The fallback table says what libbpf_strerror says, where a libbpf exports it."""
    path = "/usr/lib/x86_64-linux-gnu/libbpf.so.1"
    if not Path(path).exists():
        pytest.skip("no shared libbpf that exports libbpf_strerror")
    shared = libbpf.Library(path)
    for offset, words in enumerate(libbpf._LIBBPF_ERRORS):
        said = shared.strerror(libbpf.LIBBPF_ERRNO_START + offset)
        assert said in (words, None), (offset, said)
    assert libbpf.strerror(errno.EINVAL) == os.strerror(errno.EINVAL)


def test_log_write_to_a_closed_pipe_is_dropped_and_counted() -> None:
    r, w = os.pipe()
    os.close(r)
    with open(w, "w") as sink:
        before = logs.dropped_records()
        assert logs.write_line("lost", sink) is False
        assert logs.write_line("lost too", sink) is False
        assert logs.dropped_records() == before + 2


def test_log_write_reaches_a_live_pipe() -> None:
    r, w = os.pipe()
    with open(w, "w") as sink, open(r, "rb") as source:
        before = logs.dropped_records()
        assert logs.write_line('{"event": "x"}', sink) is True
        assert source.read1(100) == b'{"event": "x"}\n'
        assert logs.dropped_records() == before


def test_check_passes_non_negative() -> None:
    assert libbpf.check(7, "x") == 7


def test_fd_holder_close_is_idempotent() -> None:
    r, w = os.pipe()
    holder = libbpf.FdHolder(r)
    holder.close()
    assert holder.fd == -1
    holder.close()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(r)
    os.close(w)


def test_library_search_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOD_LIBBPF", "/opt/custom/libbpf.so")
    found = libbpf.candidates()
    assert found[0] == "/opt/custom/libbpf.so"
    assert any("pylibbpf" in p for p in found[1:-1]), found
    assert "bpf" in found[-1]


def test_counters_struct_mirrors_header() -> None:
    header = (ROOT / "bpf" / "echo.h").read_text()
    body = re.search(r"struct echo_counters \{(.*?)\};", header, re.S)
    assert body is not None
    fields = re.findall(r"__u64 (\w+);", body.group(1))
    assert tuple(fields) == COUNTER_FIELDS
    assert COUNTERS_STRUCT.size == 8 * len(fields)


def test_packaged_object_exists() -> None:
    assert default_object().is_file()
    assert default_object().read_bytes()[:4] == b"\x7fELF"


def test_rate_limiter_counts_suppressed() -> None:
    rl = RateLimited(burst=2, period=1.0)
    assert rl.allow("e", now=0.0) == (True, 0)
    assert rl.allow("e", now=0.1) == (True, 0)
    assert rl.allow("e", now=0.2) == (False, 0)
    assert rl.allow("e", now=0.3) == (False, 0)
    assert rl.allow("other", now=0.3) == (True, 0)
    assert rl.allow("e", now=1.5) == (True, 2)


def test_bypass_constants_mirror_their_header() -> None:
    header = (ROOT / "bpf" / "bypass.h").read_text()
    body = re.search(r"struct bypass_counters \{(.*?)\};", header, re.S)
    assert body is not None
    assert tuple(re.findall(r"__u64 (\w+);", body.group(1))) == bypass.COUNTER_FIELDS
    defines = {k: int(v) for k, v in re.findall(r"#define (BYPASS_\w+) (\d+)", header)}
    assert bypass.SETTINGS == {
        "user": defines["BYPASS_SETTING_USER"],
        "kernel": defines["BYPASS_SETTING_KERNEL"],
    }
    assert bypass_paths.PATHS == {
        defines["BYPASS_PATH_UNDECIDED"]: "undecided",
        defines["BYPASS_PATH_TCP"]: "tcp",
        defines["BYPASS_PATH_INGRESS"]: "ingress",
        defines["BYPASS_PATH_SHORT"]: "short_circuit",
    }
    assert bypass_paths.PATH_INGRESS == defines["BYPASS_PATH_INGRESS"]
    assert bypass_paths.ROLES == {
        defines["BYPASS_ROLE_SERVER"]: "server",
        defines["BYPASS_ROLE_CLIENT"]: "client",
        defines["BYPASS_ROLE_LISTENER"]: "listener",
    }
    assert bypass_paths.ROLE_LISTENER == defines["BYPASS_ROLE_LISTENER"]
    key = re.search(r"struct bypass_key \{(.*?)\};", header, re.S)
    assert key is not None
    assert bypass.KEY_STRUCT.size == 8 + 16 + 16 + 4 + 4  # netns, two addresses, two ports
    sock = re.search(r"struct bypass_sock \{(.*?)\};", header, re.S)
    assert sock is not None
    assert re.findall(r"(__u\d+) (\w+);", sock.group(1)) == [
        ("__u32", "role"),
        ("__u32", "path"),
        ("__u64", "sent"),
        ("__u64", "echoed"),
    ]
    assert bypass_paths.SOCK_STRUCT.size == 24
    listener = re.search(r"struct bypass_listener \{(.*?)\};", header, re.S)
    assert listener is not None
    assert bypass.LISTENER_STRUCT.size == 8 + 16 + 4 + 4  # netns, address, port, pad


def test_bypass_object_ships() -> None:
    assert bypass.default_object().is_file()


def test_cgroup2_root_is_read_from_the_mounts(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    assert bypass.cgroup2_root(str(mounts)) == "/sys/fs/cgroup/unified"
    mounts.write_text("tmpfs /sys/fs/cgroup tmpfs rw 0 0\n")
    with pytest.raises(NotSupported, match="no cgroup v2 hierarchy"):
        bypass.cgroup2_root(str(mounts))
