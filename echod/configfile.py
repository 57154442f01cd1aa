"""The TOML config file and the ECHOD_* environment: parse, validate, normalise."""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "load", "from_env", "parse_address", "DEFAULT_PATH"]

DEFAULT_PATH = "/etc/echod/echod.toml"
MODES = ("auto", "kernel", "user")
LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
METRICS_DEFAULT_HOST = "127.0.0.1"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|[0-9]+")


class ConfigError(ValueError):
    """A config value is wrong; the message names the file and line, or the variable."""

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


class _Invalid(ValueError):
    """Raised by a validator; `needle` is text that locates the bad list element."""

    def __init__(self, reason: str, needle: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.needle = needle


# --- validators: raw TOML value -> normalised value, or _Invalid ---------------------------------


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}.get(
        type(value), "a " + type(value).__name__
    )


def _int(value: object, lo: int, hi: int | None = None) -> int:
    # bool is an int subclass, and `port = true` is always a mistake.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"must be an integer, got {_type_name(value)}")
    if value < lo or (hi is not None and value > hi):
        bound = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
        raise _Invalid(f"must be an integer {bound}, got {value}")
    return value


def _choice(value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_type_name(value)}")
    if value.lower() not in choices:
        raise _Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
    return value.lower()


def _str_list(value: object) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Invalid(f"must be a string or a list of strings, got {_type_name(value)}")
    for item in items:
        if not isinstance(item, str):
            raise _Invalid(f"must be a list of strings, found {_type_name(item)}", str(item))
    return items


def _host(value: str) -> str:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(text) and not text.replace(".", "").isdigit():
        return text
    raise _Invalid(f"{value!r} is not an IP address or host name", value)


def _hosts(value: object) -> list[str]:
    hosts = [_host(item) for item in _str_list(value)]
    if not hosts:
        raise _Invalid("must name at least one listen address")
    return list(dict.fromkeys(hosts))


def _allow(value: object) -> list[str]:
    if isinstance(value, str):
        raise _Invalid('must be a list of CIDR strings, e.g. ["127.0.0.0/8", "::1/128"]')
    nets = []
    for item in _str_list(value):
        try:
            nets.append(str(ipaddress.ip_network(item.strip(), strict=True)))
        except ValueError as exc:
            raise _Invalid(f"{item!r} is not a valid CIDR: {exc}", item) from None
    return list(dict.fromkeys(nets))


def _control(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_type_name(value)}")
    if not value.startswith("/"):
        raise _Invalid(f"must be an absolute path, got {value!r}")
    if len(value.encode()) > 107:
        # sockaddr_un.sun_path is 108 bytes including the NUL.
        raise _Invalid(f"is longer than a Unix socket path may be (107 bytes): {value!r}")
    return value


def _group(value: object) -> str | None:
    if not isinstance(value, str):
        raise _Invalid(f"must be a group name, got {_type_name(value)}")
    if value == "":
        return None
    if not _GROUP.fullmatch(value):
        raise _Invalid(f"{value!r} is not a valid group name")
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
            raise _Invalid(f"{value!r} is not HOST:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise _Invalid(f"{value!r} is not HOST:PORT (write IPv6 as [::1]:9108)")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        raise _Invalid(f"{host!r} in {value!r} is not an IP address") from None
    if not port_text.isdigit() or not min_port <= int(port_text) <= 65535:
        raise _Invalid(f"port in {value!r} must be from {min_port} to 65535")
    return host, int(port_text)


def _metrics(value: object) -> str | None:
    if not isinstance(value, str):
        raise _Invalid(f'must be a string like "127.0.0.1:9108", got {_type_name(value)}')
    if value.strip() == "":
        return None
    host, port = parse_address(value)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _grace(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _Invalid(f"must be a number of seconds, got {_type_name(value)}")
    if not math.isfinite(value) or value <= 0:
        raise _Invalid(f"must be a number of seconds > 0, got {value}")
    return float(value)


# --- the schema ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Key:
    field: str  # canonical Config field name
    env: str  # ECHOD_* variable
    check: Callable[[Any], Any]
    parse: Callable[[str], Any] = str.strip  # environment text -> what `check` takes


def _env_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _env_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _Invalid(f"must be an integer, got {text!r}") from None


def _env_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise _Invalid(f"must be a number of seconds, got {text!r}") from None


# (table, key) -> spec; table "" is the top level.
_SCHEMA: dict[tuple[str, str], _Key] = {
    ("", "host"): _Key("hosts", "ECHOD_HOST", _hosts, _env_list),
    ("", "port"): _Key("port", "ECHOD_PORT", lambda v: _int(v, 1, 65535), _env_int),
    ("", "mode"): _Key("mode", "ECHOD_MODE", lambda v: _choice(v, MODES)),
    ("", "max_connections"): _Key(
        "max_connections", "ECHOD_MAX_CONNECTIONS", lambda v: _int(v, 1), _env_int
    ),
    ("", "max_connections_per_ip"): _Key(
        "max_connections_per_ip", "ECHOD_MAX_CONNECTIONS_PER_IP", lambda v: _int(v, 0), _env_int
    ),
    ("", "allow"): _Key("allow", "ECHOD_ALLOW", _allow, _env_list),
    ("", "shutdown_grace"): _Key("shutdown_grace", "ECHOD_SHUTDOWN_GRACE", _grace, _env_float),
    ("", "kernel_backlog_limit"): _Key(
        "kernel_backlog_limit", "ECHOD_KERNEL_BACKLOG_LIMIT", lambda v: _int(v, 65536), _env_int
    ),
    ("", "kernel_backlog_total"): _Key(
        "kernel_backlog_total", "ECHOD_KERNEL_BACKLOG_TOTAL", lambda v: _int(v, 65536), _env_int
    ),
    ("control", "path"): _Key("control", "ECHOD_CONTROL", _control),
    ("control", "group"): _Key("control_group", "ECHOD_CONTROL_GROUP", _group),
    ("control", "admin_group"): _Key("admin_group", "ECHOD_ADMIN_GROUP", _group),
    ("metrics", "address"): _Key("metrics", "ECHOD_METRICS", _metrics),
    ("log", "format"): _Key("log_format", "ECHOD_LOG_FORMAT", lambda v: _choice(v, LOG_FORMATS)),
    ("log", "level"): _Key("log_level", "ECHOD_LOG_LEVEL", lambda v: _choice(v, LOG_LEVELS)),
}
_TABLES = {table for table, _ in _SCHEMA if table}
ENV_VARS = tuple(spec.env for spec in _SCHEMA.values())


def _dotted(table: str, key: str) -> str:
    return f"{table}.{key}" if table else key


# --- finding the line a key is on (tomllib reports no positions) ---------------------------------

_HEADER = re.compile(r"\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_KEY_PART = r"[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'"
_ASSIGN = re.compile(rf"\s*((?:{_KEY_PART})(?:\s*\.\s*(?:{_KEY_PART}))*)\s*=")


def _unquote_path(text: str) -> tuple[str, ...]:
    parts = re.findall(_KEY_PART, text)
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in parts)


def _find_line(raw: str, table: str, key: str | None, needle: str | None = None) -> int | None:
    """Return the 1-based line of `table.key` (or of the [table] header when key is None)."""
    current: tuple[str, ...] = ()
    want = (table,) if table else ()
    found: int | None = None
    lines = raw.splitlines()
    for number, line in enumerate(lines, start=1):
        header = _HEADER.match(line)
        if header:
            current = _unquote_path(header.group(1))
            if key is None and current == want:
                return number
            continue
        assign = _ASSIGN.match(line)
        if not assign or key is None:
            continue
        full = current + _unquote_path(assign.group(1))
        # `key = ...` inside [table], `table.key = ...` at the top, or `table = { key = ... }`.
        if full == (*want, key) or (table and full == want and re.search(rf"\b{key}\b", line)):
            found = number
            break
    if found is None:
        return None
    if needle is not None:
        # A multi-line array: point at the element that is wrong.
        for number in range(found, len(lines) + 1):
            if needle in lines[number - 1]:
                return number
            if number > found and (
                _ASSIGN.match(lines[number - 1]) or _HEADER.match(lines[number - 1])
            ):
                break
    return found


# --- public API ----------------------------------------------------------------------------------


def load(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file and return the keys it sets, validated, under Config field names."""
    name = str(path)
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror}", path=name) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{name}: not UTF-8 text", path=name) from None
    return loads(raw, name)


def loads(raw: str, name: str = "<string>") -> dict[str, Any]:
    """Like load() for TOML text already read; `name` is used in messages."""
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) if match else None
        where = f"{name}:{line}" if line else name
        raise ConfigError(f"{where}: invalid TOML: {exc}", path=name, line=line) from None

    def fail(table: str, key: str | None, reason: str, needle: str | None = None) -> ConfigError:
        line = _find_line(raw, table, key, needle)
        dotted = _dotted(table, key) if key else f"[{table}]"
        where = f"{name}:{line}" if line else name
        return ConfigError(f"{where}: {dotted}: {reason}", path=name, key=dotted, line=line)

    out: dict[str, Any] = {}
    for top, value in data.items():
        if top in _TABLES:
            if not isinstance(value, dict):
                raise fail("", top, f"must be a table ([{top}]), got {_type_name(value)}")
            items: Iterable[tuple[str, str, Any]] = ((top, k, v) for k, v in value.items())
        elif isinstance(value, dict):
            raise fail(top, None, f"unknown table; known tables: {', '.join(sorted(_TABLES))}")
        else:
            items = [("", top, value)]
        for table, key, item in items:
            spec = _SCHEMA.get((table, key))
            if spec is None:
                known = sorted(k for t, k in _SCHEMA if t == table)
                raise fail(table, key, f"unknown key; known keys here: {', '.join(known)}")
            try:
                out[spec.field] = spec.check(item)
            except _Invalid as exc:
                raise fail(table, key, exc.reason, exc.needle) from None
    return out


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Return the settings the ECHOD_* variables carry, validated, under Config field names."""
    out: dict[str, Any] = {}
    for spec in _SCHEMA.values():
        text = environ.get(spec.env)
        if text is None:
            continue
        try:
            out[spec.field] = spec.check(spec.parse(text))
        except _Invalid as exc:
            raise ConfigError(
                f"environment variable {spec.env}={text!r}: {exc.reason}", key=spec.env
            ) from None
    return out
