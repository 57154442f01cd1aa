"""echod.config: one schema, and every source validated the same way.

Every rejection names its source (file and line, variable, flag), the setting and the value.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from echod.config import schema as configmod
from echod.config import sources as configsource
from echod.config.schema import (
    LIVE_KEYS,
    RESTART_KEYS,
    SCHEMA,
    Config,
    ConfigError,
)
from echod.config.sources import resolve
from echod.config.validators import PID_MAX_LIMIT, SUN_PATH_MAX, control_temp_path, parse_address

REPO = Path(__file__).resolve().parents[2]

# Every Config field an operator can set; the shipped file documents each one.
FIELDS = {f.name for f in dataclasses.fields(Config)} - {
    "bpf_object",
    "bypass_object",
    "udp_object",
    "config_file",
}


@pytest.fixture(autouse=True)
def _no_default_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """resolve() must not pick up this machine's /etc/echod/echod.toml."""
    monkeypatch.setattr(configsource, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "echod.toml"
    path.write_text(text)
    return path


def _error(tmp_path: Path, text: str) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        configsource.load_file(path)
    return info.value


def test_shipped_config_sets_every_field() -> None:
    values = configsource.load_file(REPO / "systemd" / "echod.toml")
    assert set(values) == FIELDS
    assert values["control"] == "/run/echod/control.sock"
    assert values["metrics"] is None
    assert values["admin_group"] is None


def test_full_file_is_normalised(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
host = ["127.0.0.1", "[::1]", "127.0.0.1", "localhost"]
port = 7
mode = "KERNEL"
max_connections = 5
max_connections_per_ip = 0
allow = ["10.0.0.0/8", "2001:DB8::/32", "192.0.2.7"]
shutdown_grace = 2

[control]
path = "/run/x.sock"
group = "ops"
admin_group = ""

[metrics]
address = "[::1]:9108"

[log]
format = "json"
level = "Warning"
""",
    )
    assert configsource.load_file(path) == {
        "hosts": ["127.0.0.1", "::1", "localhost"],
        "port": 7,
        "mode": "kernel",
        "max_connections": 5,
        "max_connections_per_ip": 0,
        "allow": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"],
        "shutdown_grace": 2.0,
        "control": "/run/x.sock",
        "control_group": "ops",
        "admin_group": None,
        "metrics": "[::1]:9108",
        "log_format": "json",
        "log_level": "warning",
    }


def test_only_keys_present_are_returned(tmp_path: Path) -> None:
    # Absent keys must not shadow the defaults (or the environment) in the Config merge.
    assert configsource.load_file(_write(tmp_path, "port = 9\n")) == {"port": 9}
    assert configsource.load_file(_write(tmp_path, "")) == {}


@pytest.mark.parametrize(
    ("text", "key", "line", "reason"),
    [
        ("# c\n\nport = 0\n", "port", 3, "from 1 to 65535, got 0"),
        ("port = 65536\n", "port", 1, "from 1 to 65535, got 65536"),
        ('port = "8888"\n', "port", 1, "must be an integer, got a string"),
        ("port = true\n", "port", 1, "got a boolean"),
        ("port = 8888.0\n", "port", 1, "got a float"),
        ('mode = "fast"\n', "mode", 1, "one of auto, kernel, user"),
        ("max_connections = 0\n", "max_connections", 1, ">= 1 and <= 10000000, got 0"),
        (
            "max_connections_per_ip = -1\n",
            "max_connections_per_ip",
            1,
            ">= 0 and <= 10000000, got -1",
        ),
        ("x = 1\nhost = 5\n", "x", 1, "unknown key"),
        ("port = 1\nhost = 5\n", "host", 2, "string or a list of strings"),
        ("host = []\n", "host", 1, "at least one"),
        ('host = ["127.0.0.1", 5]\n', "host", 1, "list of strings"),
        ('host = "999.1.1.1"\n', "host", 1, "not an IP address or host name"),
        ('host = "bad host"\n', "host", 1, "not an IP address or host name"),
        ('allow = "10.0.0.0/8"\n', "allow", 1, "list of CIDR strings"),
        ('allow = ["10.0.0.0/33"]\n', "allow", 1, "not a valid CIDR"),
        ('allow = ["fe80::/129"]\n', "allow", 1, "not a valid CIDR"),
        ('allow = ["example.com/8"]\n', "allow", 1, "not a valid CIDR"),
        ("shutdown_grace = 0\n", "shutdown_grace", 1, "> 0 and <= 600, got 0"),
        ("shutdown_grace = inf\n", "shutdown_grace", 1, "> 0 and <= 600, got inf"),
        ('shutdown_grace = "5s"\n', "shutdown_grace", 1, "number of seconds"),
        ('[control]\npath = "relative.sock"\n', "control.path", 2, "absolute path"),
        ("[control]\npath = 1\n", "control.path", 2, "must be a string"),
        ('[control]\npath = "/' + "x" * 120 + '"\n', "control.path", 2, "107 bytes"),
        ('[control]\ngroup = "no such!"\n', "control.group", 2, "not a valid group name"),
        ("[control]\nadmin_group = 0.5\n", "control.admin_group", 2, "group name"),
        ('[control]\nsocket = "/run/x"\n', "control.socket", 2, "unknown key"),
        ('[metrics]\naddress = "localhost:9108"\n', "metrics.address", 2, "not an IP address"),
        ('[metrics]\naddress = "127.0.0.1:0"\n', "metrics.address", 2, "from 1 to 65535"),
        ('[metrics]\naddress = "::1:9108"\n', "metrics.address", 2, "[::1]:9108"),
        ("[metrics]\naddress = 9108\n", "metrics.address", 2, "must be a string"),
        ('[log]\nformat = "xml"\n', "log.format", 2, "one of auto, console, json"),
        ('[log]\nlevel = "trace"\n', "log.level", 2, "one of debug, info, warning, error"),
        ('metrics = "127.0.0.1:9108"\n', "metrics", 1, "must be a table"),
        ("\n[logging]\nlevel = 1\n", "[logging]", 2, "unknown table"),
    ],
)
def test_rejection_names_file_key_and_line(
    tmp_path: Path, text: str, key: str, line: int, reason: str
) -> None:
    err = _error(tmp_path, text)
    path = str(tmp_path / "echod.toml")
    assert str(err).startswith(f"{path}:{line}: {key}: "), str(err)
    assert reason in str(err)
    assert (err.path, err.key, err.line) == (path, key, line)


def test_line_of_a_key_in_a_later_table(tmp_path: Path) -> None:
    # `level` appears twice; the one under [log] is the one that is wrong.
    text = '# level = "x"\nport = 1\n\n[control]\npath = "/run/a"\n\n[log]\nformat = "json"\n'
    err = _error(tmp_path, text + 'level = "loud"\n')
    assert err.line == 9


def test_line_points_at_the_bad_element_of_a_multiline_array(tmp_path: Path) -> None:
    text = 'allow = [\n  "127.0.0.0/8",\n  "10.1.2.3/8",  # typo\n  "::1/128",\n]\n'
    err = _error(tmp_path, text)
    assert err.line == 3
    assert "'10.1.2.3/8'" in str(err)
    assert "host bits set" in str(err)


def test_dotted_and_inline_table_keys_are_located(tmp_path: Path) -> None:
    assert _error(tmp_path, "port = 1\ncontrol.path = 3\n").line == 2
    assert _error(tmp_path, "port = 1\n\ncontrol = { path = 3 }\n").line == 3


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    err = _error(tmp_path, "port = 1\nmode = kernel\n")
    assert err.line == 2
    assert str(err).startswith(f"{tmp_path / 'echod.toml'}:2: invalid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        configsource.load_file(tmp_path / "nope.toml")


def test_from_env_parses_and_normalises() -> None:
    env = {
        "ECHOD_HOST": "127.0.0.1, ::1,",
        "ECHOD_PORT": " 9000 ",
        "ECHOD_MODE": "user",
        "ECHOD_MAX_CONNECTIONS": "10",
        "ECHOD_MAX_CONNECTIONS_PER_IP": "2",
        "ECHOD_ALLOW": "127.0.0.0/8,::1",
        "ECHOD_CONTROL": "/tmp/c.sock",
        "ECHOD_CONTROL_GROUP": "",
        "ECHOD_ADMIN_GROUP": "wheel",
        "ECHOD_METRICS": "9200",
        "ECHOD_LOG_LEVEL": "DEBUG",
        "ECHOD_LOG_FORMAT": "console",
        "ECHOD_SHUTDOWN_GRACE": "0.5",
        "ECHOD_REQUIRE_BPF": "1",  # a test switch, not a setting: ignored
        "PATH": "/bin",
    }
    assert configsource.from_env(env) == {
        "hosts": ["127.0.0.1", "::1"],
        "port": 9000,
        "mode": "user",
        "max_connections": 10,
        "max_connections_per_ip": 2,
        "allow": ["127.0.0.0/8", "::1/128"],
        "control": "/tmp/c.sock",
        "control_group": None,
        "admin_group": "wheel",
        "metrics": "127.0.0.1:9200",
        "log_level": "debug",
        "log_format": "console",
        "shutdown_grace": 0.5,
    }


def test_from_env_empty_values_switch_things_off() -> None:
    assert configsource.from_env({"ECHOD_METRICS": "", "ECHOD_ALLOW": ""}) == {
        "metrics": None,
        "allow": [],
    }
    assert configsource.from_env({}) == {}


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("ECHOD_PORT", "eighty", "must be an integer, got 'eighty'"),
        ("ECHOD_PORT", "0", "from 1 to 65535"),
        ("ECHOD_MODE", "turbo", "one of auto, kernel, user"),
        ("ECHOD_MAX_CONNECTIONS", "0", ">= 1"),
        ("ECHOD_MAX_CONNECTIONS_PER_IP", "-3", ">= 0"),
        ("ECHOD_HOST", "", "at least one"),
        ("ECHOD_HOST", "127.0.0.1,300.0.0.1", "'300.0.0.1' is not an IP address"),
        ("ECHOD_ALLOW", "10.0.0.0/8,1.2.3.4/33", "'1.2.3.4/33' is not a valid CIDR"),
        ("ECHOD_CONTROL", "control.sock", "absolute path"),
        ("ECHOD_METRICS", "0.0.0.0:99999", "from 1 to 65535"),
        ("ECHOD_LOG_LEVEL", "verbose", "one of debug"),
        ("ECHOD_LOG_FORMAT", "xml", "one of auto, console, json"),
        ("ECHOD_SHUTDOWN_GRACE", "soon", "number of seconds"),
        ("ECHOD_SHUTDOWN_GRACE", "-1", "> 0"),
    ],
)
def test_from_env_rejection_names_the_variable(name: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        configsource.from_env({name: value})
    assert str(info.value).startswith(f"environment variable {name}={value!r}: ")
    assert reason in str(info.value)
    assert info.value.key == name


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, 'port = 1\nmode = "user"\n[log]\nlevel = "debug"\n')
    env = {"ECHOD_PORT": "2", "ECHOD_LOG_FORMAT": "json", "ECHOD_MODE": "kernel"}
    cfg = resolve({"mode": "auto", "hosts": (), "metrics": None}, str(path), env)
    assert (cfg.port, cfg.mode, cfg.log_level, cfg.log_format) == (2, "auto", "debug", "json")
    assert cfg.hosts == Config().hosts  # an empty repeated flag and None do not count
    assert set(configmod.ENV_VARS) >= {"ECHOD_HOST", "ECHOD_PORT", "ECHOD_METRICS"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[::1]:9108", ("::1", 9108)),
        (" 127.0.0.2:1 ", ("127.0.0.2", 1)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


def test_schema_is_the_config() -> None:
    """Each setting is one row: a Config field with the same type, live or restart, not both."""
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    assert fields.pop("config_file") == "str | None"
    assert {s.key: s.type for s in SCHEMA} == fields
    assert set(LIVE_KEYS) | set(RESTART_KEYS) == set(fields)
    assert not set(LIVE_KEYS) & set(RESTART_KEYS)
    assert configmod.MODES == ("auto", *configmod.EFFECTIVE_MODES)


# (setting, TOML text, environment variable, flag key, bad value, what the reason says)
BAD_IN_EVERY_SOURCE = [
    ("metrics.address", '[metrics]\naddress = "bogus"\n', "ECHOD_METRICS", "metrics", "bogus",
     "is not HOST:PORT"),
    ("host", 'host = "999.1.1.1"\n', "ECHOD_HOST", "hosts", "999.1.1.1",
     "not an IP address or host name"),
    ("host", 'host = "nosuch.invalid"\n', "ECHOD_HOST", "hosts", "nosuch.invalid",
     "does not resolve"),
    ("control.path", '[control]\npath = "relative.sock"\n', "ECHOD_CONTROL", "control",
     "relative.sock", "absolute path"),
    ("port", "port = 0\n", "ECHOD_PORT", "port", "0", "from 1 to 65535"),
    ("mode", 'mode = "turbo"\n', "ECHOD_MODE", "mode", "turbo", "one of auto, kernel, user"),
    ("log.level", '[log]\nlevel = "loud"\n', "ECHOD_LOG_LEVEL", "log_level", "loud",
     "one of debug"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("dotted", "toml", "env", "flag", "value", "reason"),
    BAD_IN_EVERY_SOURCE,
    ids=[f"{row[0]}={row[4]}" for row in BAD_IN_EVERY_SOURCE],
)
def test_every_source_goes_through_the_same_validator(
    tmp_path: Path, dotted: str, toml: str, env: str, flag: str, value: str, reason: str
) -> None:
    path = _write(tmp_path, toml)
    setting = next(s for s in SCHEMA if s.key == flag)
    flags: dict[str, Any] = {flag: (value,) if setting.type.startswith("list") else value}
    cases = [
        (lambda: resolve({}, str(path), {}), f"{path}:{toml.count(chr(10))}: {dotted}: "),
        (lambda: resolve({}, None, {env: value}), f"environment variable {env}={value!r}: "),
        (lambda: resolve(flags, None, {}), f"option {setting.flag}={value!r}: "),
    ]
    for call, prefix in cases:
        with pytest.raises(ConfigError) as info:
            call()
        message = str(info.value)
        assert message.startswith(prefix), message
        assert reason in message
        assert "\n" not in message


def test_python_values_as_flags_are_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"^option --port=70000: .*from 1 to 65535"):
        resolve({"port": 70000}, None, {})
    assert resolve({"port": 7000, "hosts": ["::1"]}, None, {}).port == 7000


def test_host_names_that_resolve_are_kept() -> None:
    assert resolve({"hosts": ("localhost",)}, None, {}).hosts == ["localhost"]


def test_control_path_fits_the_temporary_name() -> None:
    """The socket is bound as .NAME.PID.tmp first: the longest such name must fit sun_path."""
    base = "/run/"
    longest_ok = base + "x" * (94 - len(base))
    assert len(control_temp_path(longest_ok, PID_MAX_LIMIT)) == SUN_PATH_MAX
    assert resolve({"control": longest_ok}, None, {}).control == longest_ok
    for size in (95, 100, 107):
        with pytest.raises(ConfigError, match=rf"too long \({size} bytes\).*at most 94"):
            resolve({"control": base + "x" * (size - len(base))}, None, {})
    with pytest.raises(ConfigError, match="not a directory"):
        resolve({"control": "/run/echod/"}, None, {})


def test_control_temp_path_is_the_name_the_server_binds() -> None:
    """The length check and the socket file use one definition of the private name."""
    from echod.control import socketfile as sockfile

    assert sockfile.control_temp_path is control_temp_path
    assert control_temp_path("/run/echod/control.sock", 42) == "/run/echod/.control.sock.42.tmp"


def test_deep_nesting_is_a_config_error(tmp_path: Path) -> None:
    depth = 50_000
    path = _write(tmp_path, "x = " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match="invalid TOML: arrays or tables are nested too deeply"):
        resolve({}, str(path), {})


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda tmp: "/dev/null", "/dev/null: is a character device, not a regular file"),
        (lambda tmp: str(tmp), "is a directory, not a config file"),
        (lambda tmp: str(tmp / "absent.toml"), "absent.toml: config file not found"),
    ],
    ids=["dev-null", "directory", "absent"],
)
def test_config_file_problems_are_named(tmp_path: Path, make: Any, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({}, make(tmp_path), {})
    assert reason in str(info.value)


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "echod.toml"
    path.write_bytes(b"port = 1\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        resolve({}, str(path), {})
    assert str(info.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at offset 14)"
    assert info.value.line == 2


def test_the_config_file_may_come_from_the_environment(tmp_path: Path) -> None:
    path = _write(tmp_path, "port = 4242\n")
    assert resolve({}, None, {"ECHOD_CONFIG": str(path)}).port == 4242
    assert resolve({}, None, {"ECHOD_CONFIG": str(path)}).config_file == str(path)


def test_cross_checks_name_where_each_value_came_from(tmp_path: Path) -> None:
    path = _write(tmp_path, "kernel_backlog_total = 70000\n")
    with pytest.raises(ConfigError) as info:
        resolve({}, str(path), {"ECHOD_KERNEL_BACKLOG_LIMIT": "80000"})
    message = str(info.value)
    assert message.startswith(f"{path}:1: kernel_backlog_total: 70000 is below")
    assert "environment variable ECHOD_KERNEL_BACKLOG_LIMIT='80000'" in message
    with pytest.raises(ConfigError, match=r"^environment variable ECHOD_ADMIN_GROUP=.*no such"):
        resolve({}, None, {"ECHOD_ADMIN_GROUP": "nosuchgroupxyz"})


def test_unknown_flag_is_an_error() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'turbo'"):
        resolve({"turbo": "1"}, None, {})


def test_defaults_are_valid() -> None:
    assert resolve({}, None, {}) == Config()
