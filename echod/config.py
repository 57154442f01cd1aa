"""The daemon's configuration: one dataclass; defaults < TOML file < ECHOD_* env < flags."""

from __future__ import annotations

import dataclasses
import grp
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODES = ("auto", "kernel", "user")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "console", "json")
DEFAULT_CONFIG_FILE = "/etc/echod/echod.toml"


def default_control_path() -> str:
    """/run/echod/control.sock for root, else under $XDG_RUNTIME_DIR (or /tmp)."""
    if os.geteuid() == 0:
        return "/run/echod/control.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/echod-{os.geteuid()}"
    return str(Path(base) / "echod" / "control.sock")


@dataclass
class Config:
    """Everything the daemon reads at start-up; reload re-reads the file into a new one."""

    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "::1"])
    port: int = 8888
    mode: str = "auto"
    max_connections: int = 10000
    max_connections_per_ip: int = 0
    allow: list[str] = field(default_factory=list)
    control: str = field(default_factory=default_control_path)
    control_group: str | None = None
    admin_group: str | None = None
    metrics: str | None = None
    log_format: str = "auto"
    log_level: str = "info"
    shutdown_grace: float = 5.0
    kernel_backlog_limit: int = 32 * 1024 * 1024
    kernel_backlog_total: int = 256 * 1024 * 1024
    bpf_object: str | None = None
    config_file: str | None = None

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names its source."""


def _validate(cfg: Config) -> Config:
    if cfg.mode not in MODES:
        raise ConfigError(f"mode: {cfg.mode!r} is not one of {', '.join(MODES)}")
    if not 1 <= cfg.port <= 65535:
        raise ConfigError(f"port: {cfg.port} is outside 1..65535")
    if not cfg.hosts:
        raise ConfigError("host: at least one listen address is needed")
    if cfg.max_connections < 1:
        raise ConfigError(f"max_connections: {cfg.max_connections} must be at least 1")
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: {cfg.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if cfg.log_format not in LOG_FORMATS:
        raise ConfigError(f"log_format: {cfg.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    if cfg.kernel_backlog_limit < 65536:
        raise ConfigError(f"kernel_backlog_limit: {cfg.kernel_backlog_limit} is below 65536")
    if cfg.kernel_backlog_total < cfg.kernel_backlog_limit:
        raise ConfigError(
            f"kernel_backlog_total: {cfg.kernel_backlog_total} is below kernel_backlog_limit"
        )
    for key in ("control_group", "admin_group"):
        group = getattr(cfg, key)
        if group is not None and not group.isdigit():
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigError(f"{key}: no such group {group!r}") from None
    if cfg.shutdown_grace <= 0:
        raise ConfigError(f"shutdown_grace: {cfg.shutdown_grace} must be positive")
    return cfg


def _from_file(path: str) -> dict[str, Any]:
    from echod import configfile

    try:
        return configfile.load(path)
    except configfile.ConfigError as exc:
        raise ConfigError(str(exc)) from exc


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    from echod import configfile

    try:
        return configfile.from_env(environ)
    except configfile.ConfigError as exc:
        raise ConfigError(str(exc)) from exc


def resolve(
    flags: Mapping[str, Any],
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config: defaults < file < environment < flags (None in flags means unset).

    An explicit config_file must exist; the default /etc/echod/echod.toml is read if present.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or environ.get("ECHOD_CONFIG")
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"{path}: config file not found")
        values.update(_from_file(path))
    values.update(_from_env(environ))
    values.update({k: v for k, v in flags.items() if v is not None and v != ()})
    if "hosts" in values:
        values["hosts"] = list(values["hosts"])
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    return _validate(Config(config_file=path, **{k: v for k, v in values.items()}))
