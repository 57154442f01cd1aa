"""The daemon's configuration: one schema, one ConfigError, the validators every source uses.

Each setting is a row of SCHEMA: its Config field, type, default, validator, whether reload
applies it live, and where it may come from (TOML key, ECHOD_* variable, command-line flag).
`echod.configsource.resolve` reads the sources and sends every value through its row's
validator; build() fills in the defaults, validated the same way, and checks the whole.
"""

from __future__ import annotations

import dataclasses
import grp
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echod.config import validators as v
from echod.config.validators import Invalid

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
    "Setting",
    "build",
    "default_control_path",
]

EFFECTIVE_MODES = ("kernel", "user")  # what a running service is in
MODES = ("auto", *EFFECTIVE_MODES)  # what may be asked for: auto picks kernel when it can
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
DEFAULT_CONFIG_FILE = "/etc/echod/echod.toml"


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
        # One line, whatever a value or key held: it goes to a terminal, a log and systemd.
        super().__init__(" ".join(message.splitlines()))
        self.path = path
        self.key = key
        self.line = line


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
    parse: Callable[[str], Any] = v.text  # environment or flag text -> what `check` takes
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
        key="hosts", type="list[str]", default=lambda: ["127.0.0.1", "::1"], check=v.hosts,
        live=False, toml=("", "host"), env="ECHOD_HOST", flag="--host", parse=v.text_list,
        help="Listen address (IP or host name); repeat or comma-separate for several.",
        metavar="HOST",
    ),
    Setting(
        key="port", type="int", default=_const(8888), check=v.integer(1, v.MAX_PORT), live=False,
        toml=("", "port"), env="ECHOD_PORT", flag="--port", parse=v.text_int,
        help="Listen port (default 8888).", metavar="PORT",
    ),
    Setting(
        key="mode", type="str", default=_const("auto"), check=v.choice(MODES), live=False,
        toml=("", "mode"), env="ECHOD_MODE", flag="--mode",
        help="Echo mode (default auto).", metavar="|".join(MODES),
    ),
    Setting(
        key="bypass", type="bool", default=_const(False), check=v.boolean, live=False,
        toml=("", "bypass"), env="ECHOD_BYPASS", flag="--bypass", parse=v.text_bool,
        help="Same-host bypass (sock_ops + sk_msg) alongside the mode (default off).",
    ),
    Setting(
        key="bypass_cgroup", type="str | None", default=_const(None), check=v.cgroup_dir,
        live=False, toml=("", "bypass_cgroup"), env="ECHOD_BYPASS_CGROUP",
        flag="--bypass-cgroup",
        help="cgroup v2 directory the bypass attaches to (default: the hierarchy's root).",
        metavar="DIR",
    ),
    Setting(
        key="workers", type="int", default=_const("auto"), check=v.workers, live=False,
        toml=("", "workers"), env="ECHOD_WORKERS", flag="--workers", parse=v.text_workers,
        help="Worker processes (default auto: one per CPU; 1: a single process).",
        metavar="N|auto",
    ),
    Setting(
        key="max_connections", type="int", default=_const(10000),
        check=v.integer(1, v.MAX_CONNECTIONS, ceiling=True), live=True,
        toml=("", "max_connections"), env="ECHOD_MAX_CONNECTIONS", flag="--max-connections",
        parse=v.text_int,
        help="Connection limit (default 10000).", metavar="N",
    ),
    Setting(
        key="max_connections_per_ip", type="int", default=_const(0),
        check=v.integer(0, v.MAX_CONNECTIONS, ceiling=True), live=True,
        toml=("", "max_connections_per_ip"), env="ECHOD_MAX_CONNECTIONS_PER_IP",
        flag="--max-connections-per-ip", parse=v.text_int,
        help="Connections one client address may hold (default 0: no limit).", metavar="N",
    ),
    Setting(
        key="allow", type="list[str]", default=list, check=v.allow, live=True,
        toml=("", "allow"), env="ECHOD_ALLOW", flag="--allow", parse=v.text_list,
        help="Accept clients only from these CIDRs (comma-separated or repeated; default: all).",
        metavar="CIDR",
    ),
    Setting(
        key="udp", type="bool", default=_const(False), check=v.boolean, live=False,
        toml=("", "udp"), env="ECHOD_UDP", flag="--udp", parse=v.text_bool,
        help="UDP echo (RFC 862) on the same addresses and port (default off).",
    ),
    Setting(
        key="udp_rate_per_source", type="int", default=_const(2000),
        check=v.integer(0, v.MAX_UDP_RATE, ceiling=True), live=True,
        toml=("", "udp_rate_per_source"), env="ECHOD_UDP_RATE_PER_SOURCE",
        flag="--udp-rate-per-source", parse=v.text_int,
        help="UDP datagrams echoed per second to one source address (default 2000; 0: no limit).",
        metavar="N",
    ),
    Setting(
        key="udp_drop_ports", type="list[int]", default=lambda: [7, 13, 17, 19, 37],
        check=v.ports, live=True, toml=("", "udp_drop_ports"), env="ECHOD_UDP_DROP_PORTS",
        flag="--udp-drop-ports", parse=v.text_ports,
        help="Never answer a UDP datagram from these source ports (comma-separated or repeated; "
        "default 7,13,17,19,37).",
        metavar="PORT",
    ),
    Setting(
        key="control", type="str", default=default_control_path, check=v.control_path, live=False,
        toml=("control", "path"), env="ECHOD_CONTROL", flag="--control",
        help="Control socket path (absolute).", metavar="PATH",
    ),
    Setting(
        key="control_group", type="str | None", default=_const(None), check=v.group,
        live=False, toml=("control", "group"), env="ECHOD_CONTROL_GROUP",
        flag="--control-group", help="Group owning the control socket, mode 0660.",
        metavar="GROUP",
    ),
    Setting(
        key="admin_group", type="str | None", default=_const(None), check=v.group, live=False,
        toml=("control", "admin_group"), env="ECHOD_ADMIN_GROUP", flag="--admin-group",
        help="Group whose members may start, stop, restart and reload.", metavar="GROUP",
    ),
    Setting(
        key="metrics", type="str | None", default=_const(None), check=v.metrics_address, live=True,
        toml=("metrics", "address"), env="ECHOD_METRICS", flag="--metrics",
        help="Prometheus /metrics address (default off).", metavar="HOST:PORT",
    ),
    Setting(
        key="log_format", type="str", default=_const("auto"), check=v.choice(LOG_FORMATS),
        live=True, toml=("log", "format"), env="ECHOD_LOG_FORMAT", flag="--log-format",
        help="Log format (default auto: console on a terminal, else JSON).",
        metavar="|".join(LOG_FORMATS),
    ),
    Setting(
        key="log_level", type="str", default=_const("info"), check=v.choice(LOG_LEVELS),
        live=True, toml=("log", "level"), env="ECHOD_LOG_LEVEL", flag="--log-level",
        help="Log level (default info).", metavar="|".join(LOG_LEVELS),
    ),
    Setting(
        key="shutdown_grace", type="float", default=_const(5.0), check=v.seconds(v.MAX_GRACE),
        live=True, toml=("", "shutdown_grace"), env="ECHOD_SHUTDOWN_GRACE",
        flag="--shutdown-grace", parse=v.text_float,
        help="Seconds a stop waits for connections to drain (default 5).", metavar="SECONDS",
    ),
    Setting(
        key="kernel_backlog_limit", type="int", default=_const(32 * 1024 * 1024),
        check=v.integer(65536, v.MAX_BACKLOG, ceiling=True), live=True,
        toml=("", "kernel_backlog_limit"),
        env="ECHOD_KERNEL_BACKLOG_LIMIT", flag="--kernel-backlog-limit", parse=v.text_int,
        help="Reset a kernel-mode connection whose unread echo exceeds this many bytes.",
        metavar="BYTES",
    ),
    Setting(
        key="kernel_backlog_total", type="int", default=_const(256 * 1024 * 1024),
        check=v.integer(65536, v.MAX_BACKLOG, ceiling=True), live=True,
        toml=("", "kernel_backlog_total"),
        env="ECHOD_KERNEL_BACKLOG_TOTAL", flag="--kernel-backlog-total", parse=v.text_int,
        help="Reset the largest kernel-mode backlogs while their sum exceeds this many bytes.",
        metavar="BYTES",
    ),
    Setting(
        key="bpf_object", type="str | None", default=_const(None), check=v.file_path,
        live=False, toml=None, env=None, flag="--bpf-object",
        help="Load this BPF object instead of the packaged one.", metavar="FILE",
    ),
    Setting(
        key="bypass_object", type="str | None", default=_const(None), check=v.file_path,
        live=False, toml=None, env=None, flag="--bypass-object",
        help="Load this bypass object instead of the packaged one.", metavar="FILE",
    ),
    Setting(
        key="udp_object", type="str | None", default=_const(None), check=v.file_path,
        live=False, toml=None, env=None, flag="--udp-object",
        help="Load this UDP echo object instead of the packaged one.", metavar="FILE",
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
    bypass: bool = _default("bypass")
    bypass_cgroup: str | None = _default("bypass_cgroup")
    workers: int = field(default_factory=lambda: v.workers("auto"))
    max_connections: int = _default("max_connections")
    max_connections_per_ip: int = _default("max_connections_per_ip")
    allow: list[str] = _default("allow")
    udp: bool = _default("udp")
    udp_rate_per_source: int = _default("udp_rate_per_source")
    udp_drop_ports: list[int] = _default("udp_drop_ports")
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
    bypass_object: str | None = _default("bypass_object")
    udp_object: str | None = _default("udp_object")
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
