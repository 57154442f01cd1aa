"""The flags for allow, max_connections_per_ip, shutdown_grace and the control groups.

A list flag reads like its variable (comma-separated) and may be repeated; the flag wins over
the file and the environment, and is checked by the same validator.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from echod.__main__ import EXIT_CONFIG, cli
from echod.config.schema import ConfigError
from echod.config.sources import resolve

# autouse: resolve() must not pick up this machine's /etc/echod/echod.toml.
from tests.unit.test_configfile import _no_default_file  # noqa: F401


def test_new_flags_override_file_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_text(
        'allow = ["10.0.0.0/8"]\nmax_connections_per_ip = 5\nshutdown_grace = 9\n'
        "kernel_backlog_limit = 65536\nkernel_backlog_total = 1048576\n"
        '[control]\ngroup = "0"\nadmin_group = "0"\n'
    )
    env = {"ECHOD_ALLOW": "192.0.2.0/24", "ECHOD_SHUTDOWN_GRACE": "8"}
    flags = {
        "allow": ("127.0.0.0/8,::1", "192.0.2.0/24"),
        "max_connections_per_ip": "3",
        "shutdown_grace": "0.5",
        "kernel_backlog_total": "2097152",
        "control_group": "",
        "admin_group": "1",
    }
    cfg = resolve(flags, str(path), env)
    assert cfg.allow == ["127.0.0.0/8", "::1/128", "192.0.2.0/24"]
    assert cfg.max_connections_per_ip == 3
    assert cfg.shutdown_grace == 0.5
    assert cfg.kernel_backlog_total == 2097152
    assert (cfg.control_group, cfg.admin_group) == (None, "1")


def test_an_empty_allow_flag_lets_everyone_in(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_text('allow = ["10.0.0.0/8"]\n')
    assert resolve({"allow": ("",)}, str(path), {}).allow == []


def test_hosts_flag_reads_like_its_variable() -> None:
    assert resolve({"hosts": ("127.0.0.1, ::1",)}, None, {}).hosts == ["127.0.0.1", "::1"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--allow", "10.0.0.0/8,10.1.2.3/8"], "option --allow='10.1.2.3/8': "),
        (["--max-connections-per-ip", "-1"], "option --max-connections-per-ip='-1': "),
        (["--shutdown-grace", "1e300"], "option --shutdown-grace='1e300': "),
        (["--shutdown-grace", "nan"], "option --shutdown-grace='nan': "),
        (["--control-group", "99999999999999999999"], "option --control-group="),
        (["--admin-group", "no such!"], "option --admin-group='no such!': "),
        (["--kernel-backlog-total", "1"], "option --kernel-backlog-total='1': "),
    ],
)
def test_bad_new_flags_exit_2_with_one_line(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("ECHOD_CONFIG", "ECHOD_ALLOW", "ECHOD_SHUTDOWN_GRACE"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == EXIT_CONFIG, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"echod: configuration error: {message}"), lines[0]


def test_flag_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^option --allow='10.0.0.1/8': .*host bits set"):
        resolve({"allow": ("10.0.0.1/8",)}, None, {})
