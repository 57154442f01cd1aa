"""The daemon's configuration: one schema, one ConfigError, the validators every source uses.

Each setting is a row of SCHEMA: its Config field, type, default, validator, whether reload
applies it live, and where it may come from (TOML key, ECHOD_* variable, command-line flag).
`echod.configsource.resolve` reads the sources and sends every value through its row's
validator; build() fills in the defaults, validated the same way, and checks the whole.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "EFFECTIVE_MODES",
    "ENV_VARS",
    "LIVE_KEYS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MODES",
    "RESTART_KEYS",
    "SCHEMA",
    "Config",
    "ConfigError",
    "Invalid",
    "Setting",
    "build",
    "control_temp_path",
    "default_control_path",
    "parse_address",
]

EFFECTIVE_MODES = ("kernel", "user")  # what a running service is in
MODES = ("auto", *EFFECTIVE_MODES)  # what may be asked for: auto picks kernel when it can
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
DEFAULT_CONFIG_FILE = "/etc/echod/echod.toml"
METRICS_DEFAULT_HOST = "127.0.0.1"

# sockaddr_un.sun_path is 108 bytes, the last one the NUL.
SUN_PATH_MAX = 107
# The kernel's ceiling for pid_max (PID_MAX_LIMIT): the longest pid a temporary name can hold.
PID_MAX_LIMIT = 4 * 1024 * 1024


def control_temp_path(path: str, pid: int | str) -> str:
    """The private name the control socket is bound and chmod-ed under before its rename."""
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{pid}.tmp")


def default_control_path() -> str:
    """/run/echod/control.sock for root, else under $XDG_RUNTIME_DIR (or /tmp)."""
    if os.geteuid() == 0:
        return "/run/echod/control.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/echod-{os.geteuid()}"
    return str(Path(base) / "echod" / "control.sock")


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its source, the setting and the value.

    `path` and `line` locate it in a config file; `key` is the dotted TOML key, the ECHOD_*
    variable or the flag it came from.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.key = key
        self.line = line


class Invalid(ValueError):
    """Raised by a validator; `needle` is text that locates the bad list element."""

    def __init__(self, reason: str, needle: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.needle = needle


# --- validators: a raw value (TOML, or parsed from text) -> the normalised value, or Invalid ----


def type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), "a " + type(value).__name__
    )


def _int(lo: int, hi: int | None = None) -> Callable[[object], int]:
    def check(value: object) -> int:
        # bool is an int subclass, and `port = true` is always a mistake.
        if not isinstance(value, int) or isinstance(value, bool):
            raise Invalid(f"must be an integer, got {type_name(value)}")
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise Invalid(f"must be an integer {bound}, got {value}")
        return value

    return check


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str):
            raise Invalid(f"must be a string, got {type_name(value)}")
        if value.lower() not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
        return value.lower()

    return check


def _str_list(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise Invalid(f"must be a string or a list of strings, got {type_name(value)}")
    for item in items:
        if not isinstance(item, str):
            raise Invalid(f"must be a list of strings, found {type_name(item)}", str(item))
    return list(items)


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+")


def _host(value: str) -> str:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(text) or text.replace(".", "").isdigit():
        raise Invalid(f"{value!r} is not an IP address or host name", value)
    # Resolve now: a name that does not resolve would otherwise fail after BPF is attached.
    try:
        socket.getaddrinfo(text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise Invalid(
            f"{value!r} is not an IP address and does not resolve: {reason}", value
        ) from None
    return text


def _hosts(value: object) -> list[str]:
    hosts = [_host(item) for item in _str_list(value)]
    if not hosts:
        raise Invalid("must name at least one listen address")
    return list(dict.fromkeys(hosts))


def _allow(value: object) -> list[str]:
    if isinstance(value, str):
        raise Invalid('must be a list of CIDR strings, e.g. ["127.0.0.0/8", "::1/128"]')
    nets = []
    for item in _str_list(value):
        try:
            nets.append(str(ipaddress.ip_network(item.strip(), strict=True)))
        except ValueError as exc:
            raise Invalid(f"{item!r} is not a valid CIDR: {exc}", item) from None
    return list(dict.fromkeys(nets))


def _control(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, got {type_name(value)}")
    if not value.startswith("/"):
        raise Invalid(f"must be an absolute path, got {value!r}")
    if not os.path.basename(value):
        raise Invalid(f"must name a socket file, not a directory: {value!r}")
    # The daemon binds a longer private name first, then renames it: that name must fit too.
    size = len(value.encode())
    overhead = len(control_temp_path(value, PID_MAX_LIMIT).encode()) - size
    if size + overhead > SUN_PATH_MAX:
        temp = control_temp_path(os.path.basename(value), "<pid>")
        raise Invalid(
            f"is too long ({size} bytes): the daemon binds it first as {temp!r} in the same "
            f"directory, and a Unix socket path holds at most {SUN_PATH_MAX} bytes; use at most "
            f"{SUN_PATH_MAX - overhead}"
        )
    return value


def _group(value: object) -> str | None:
    if not isinstance(value, str):
        raise Invalid(f"must be a group name, got {type_name(value)}")
    if value == "":
        return None
    if not _GROUP.fullmatch(value):
        raise Invalid(f"{value!r} is not a valid group name")
    return value


def parse_address(
    value: str, default_host: str = METRICS_DEFAULT_HOST, min_port: int = 1
) -> tuple[str, int]:
    """Split "HOST:PORT", "[V6]:PORT" or a bare "PORT" into (host, port); ValueError if bad."""
    text = value.strip()
    if text.isdigit():
        host, port_text = default_host, text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise Invalid(f"{value!r} is not HOST:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise Invalid(f"{value!r} is not HOST:PORT (write IPv6 as [::1]:9108)")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise Invalid(f"{host!r} in {value!r} is not an IP address") from None
    if not port_text.isdigit() or not min_port <= int(port_text) <= 65535:
        raise Invalid(f"port in {value!r} must be from {min_port} to 65535")
    return host, int(port_text)


def _metrics(value: object) -> str | None:
    if not isinstance(value, str):
        raise Invalid(f'must be a string like "127.0.0.1:9108", got {type_name(value)}')
    if value.strip() == "":
        return None
    host, port = parse_address(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _grace(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise Invalid(f"must be a number of seconds, got {type_name(value)}")
    if not math.isfinite(value) or value <= 0:
        raise Invalid(f"must be a number of seconds > 0, got {value}")
    return float(value)


def _file_path(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(f"must be a path, got {type_name(value)}")
    return value or None


# --- text (environment variables, flags) -> what the validator takes ----------------------------


def _text(text: str) -> str:
    return text.strip()


def _text_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _text_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise Invalid(f"must be an integer, got {text!r}") from None


def _text_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise Invalid(f"must be a number of seconds, got {text!r}") from None


# --- the schema ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One setting: where it lives, what it may hold, and when a change takes effect."""

    key: str  # the Config field
    type: str  # the Config field's annotation
    default: Callable[[], Any]
    check: Callable[[Any], Any]  # raw value -> normalised value, or Invalid
    live: bool  # reload applies it while serving; otherwise it needs a restart
    toml: tuple[str, str] | None  # (table, key) in the file; table "" is the top level
    env: str | None  # ECHOD_* variable
    flag: str | None = None  # command-line option
    parse: Callable[[str], Any] = _text  # environment or flag text -> what `check` takes
    help: str = ""  # the flag's help text
    metavar: str = "TEXT"  # the flag's value in --help

    @property
    def dotted(self) -> str:
        """The key as written in the file: `port`, `control.path`."""
        assert self.toml is not None
        table, key = self.toml
        return f"{table}.{key}" if table else key


def _const(value: Any) -> Callable[[], Any]:
    return lambda: value


SCHEMA: tuple[Setting, ...] = (
    Setting(
        key="hosts", type="list[str]", default=lambda: ["127.0.0.1", "::1"], check=_hosts,
        live=False, toml=("", "host"), env="ECHOD_HOST", flag="--host", parse=_text_list,
        help="Listen address (IP or host name); repeat for several.", metavar="HOST",
    ),
    Setting(
        key="port", type="int", default=_const(8888), check=_int(1, 65535), live=False,
        toml=("", "port"), env="ECHOD_PORT", flag="--port", parse=_text_int,
        help="Listen port (default 8888).", metavar="PORT",
    ),
    Setting(
        key="mode", type="str", default=_const("auto"), check=_choice(MODES), live=False,
        toml=("", "mode"), env="ECHOD_MODE", flag="--mode",
        help="Echo mode (default auto).", metavar="|".join(MODES),
    ),
    Setting(
        key="max_connections", type="int", default=_const(10000), check=_int(1), live=True,
        toml=("", "max_connections"), env="ECHOD_MAX_CONNECTIONS", flag="--max-connections",
        parse=_text_int, help="Connection limit.", metavar="N",
    ),
    Setting(
        key="max_connections_per_ip", type="int", default=_const(0), check=_int(0), live=True,
        toml=("", "max_connections_per_ip"), env="ECHOD_MAX_CONNECTIONS_PER_IP",
        parse=_text_int,
    ),
    Setting(
        key="allow", type="list[str]", default=list, check=_allow, live=True,
        toml=("", "allow"), env="ECHOD_ALLOW", parse=_text_list,
    ),
    Setting(
        key="control", type="str", default=default_control_path, check=_control, live=False,
        toml=("control", "path"), env="ECHOD_CONTROL", flag="--control",
        help="Control socket path (absolute).", metavar="PATH",
    ),
    Setting(
        key="control_group", type="str | None", default=_const(None), check=_group,
        live=False, toml=("control", "group"), env="ECHOD_CONTROL_GROUP",
    ),
    Setting(
        key="admin_group", type="str | None", default=_const(None), check=_group, live=False,
        toml=("control", "admin_group"), env="ECHOD_ADMIN_GROUP",
    ),
    Setting(
        key="metrics", type="str | None", default=_const(None), check=_metrics, live=True,
        toml=("metrics", "address"), env="ECHOD_METRICS", flag="--metrics",
        help="Prometheus /metrics address (default off).", metavar="HOST:PORT",
    ),
    Setting(
        key="log_format", type="str", default=_const("auto"), check=_choice(LOG_FORMATS),
        live=True, toml=("log", "format"), env="ECHOD_LOG_FORMAT", flag="--log-format",
        help="Log format (default auto: console on a terminal, else JSON).",
        metavar="|".join(LOG_FORMATS),
    ),
    Setting(
        key="log_level", type="str", default=_const("info"), check=_choice(LOG_LEVELS),
        live=True, toml=("log", "level"), env="ECHOD_LOG_LEVEL", flag="--log-level",
        help="Log level (default info).", metavar="|".join(LOG_LEVELS),
    ),
    Setting(
        key="shutdown_grace", type="float", default=_const(5.0), check=_grace, live=True,
        toml=("", "shutdown_grace"), env="ECHOD_SHUTDOWN_GRACE", parse=_text_float,
    ),
    Setting(
        key="kernel_backlog_limit", type="int", default=_const(32 * 1024 * 1024),
        check=_int(65536), live=True, toml=("", "kernel_backlog_limit"),
        env="ECHOD_KERNEL_BACKLOG_LIMIT", flag="--kernel-backlog-limit", parse=_text_int,
        help="Reset a kernel-mode connection whose unread echo exceeds this many bytes.",
        metavar="BYTES",
    ),
    Setting(
        key="kernel_backlog_total", type="int", default=_const(256 * 1024 * 1024),
        check=_int(65536), live=True, toml=("", "kernel_backlog_total"),
        env="ECHOD_KERNEL_BACKLOG_TOTAL", parse=_text_int,
    ),
    Setting(
        key="bpf_object", type="str | None", default=_const(None), check=_file_path,
        live=False, toml=None, env=None, flag="--bpf-object",
        help="Load this BPF object instead of the packaged one.", metavar="FILE",
    ),
)  # fmt: skip
SETTINGS = {s.key: s for s in SCHEMA}
LIVE_KEYS = tuple(s.key for s in SCHEMA if s.live)
RESTART_KEYS = tuple(s.key for s in SCHEMA if not s.live)
ENV_VARS = tuple(s.env for s in SCHEMA if s.env)
TOML_KEYS = {s.toml: s for s in SCHEMA if s.toml}
TOML_TABLES = {table for table, _ in TOML_KEYS if table}


def _default(key: str) -> Any:
    return field(default_factory=SETTINGS[key].default)


@dataclass
class Config:
    """Everything the daemon reads at start-up; reload re-reads the file into a new one."""

    hosts: list[str] = _default("hosts")
    port: int = _default("port")
    mode: str = _default("mode")
    max_connections: int = _default("max_connections")
    max_connections_per_ip: int = _default("max_connections_per_ip")
    allow: list[str] = _default("allow")
    control: str = _default("control")
    control_group: str | None = _default("control_group")
    admin_group: str | None = _default("admin_group")
    metrics: str | None = _default("metrics")
    log_format: str = _default("log_format")
    log_level: str = _default("log_level")
    shutdown_grace: float = _default("shutdown_grace")
    kernel_backlog_limit: int = _default("kernel_backlog_limit")
    kernel_backlog_total: int = _default("kernel_backlog_total")
    bpf_object: str | None = _default("bpf_object")
    config_file: str | None = None  # where the file layer came from; not a setting

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def build(
    values: Mapping[str, Any], origins: Mapping[str, str], config_file: str | None = None
) -> Config:
    """A Config from the merged, validated values of every source, and defaults for the rest.

    A default goes through its setting's validator too. Then come the checks that need several
    values or the system's state. `origins` says where each value came from, for messages.
    """
    merged = dict(values)
    for setting in SCHEMA:
        if setting.key not in merged:
            default = setting.default()
            try:
                # None means "off" and needs no check; a computed default (a path) does.
                merged[setting.key] = None if default is None else setting.check(default)
            except Invalid as exc:
                raise ConfigError(f"{setting.key} (default {default!r}): {exc.reason}") from None

    def where(key: str) -> str:
        return origins.get(key, f"{key} (default)")

    limit, total = merged["kernel_backlog_limit"], merged["kernel_backlog_total"]
    if total < limit:
        raise ConfigError(
            f"{where('kernel_backlog_total')}: {total} is below kernel_backlog_limit ({limit}, "
            f"from {where('kernel_backlog_limit')})"
        )
    for key in ("control_group", "admin_group"):
        group = merged[key]
        if group is not None and not group.isdigit():
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigError(f"{where(key)}: no such group {group!r}") from None
    return Config(config_file=config_file, **merged)
