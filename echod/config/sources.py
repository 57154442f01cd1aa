"""The sources of settings: the TOML file, the ECHOD_* environment and the flags; resolve().

Each source is read into a layer of values, every one sent through its setting's validator in
the schema (echod.config.schema), and remembered with where it came from (file and line,
variable, flag) so that a message can name it. resolve() layers them over the defaults.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echod.config.schema import (
    DEFAULT_CONFIG_FILE,
    SCHEMA,
    SETTINGS,
    TOML_KEYS,
    TOML_TABLES,
    Config,
    ConfigError,
    build,
)
from echod.config.tomlpos import find_line, show_key, syntax_error_line
from echod.config.validators import Invalid, shown, type_name

__all__ = ["from_env", "load_file", "loads", "resolve"]

_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
)


class NotAFile(OSError):
    """The path names something other than a regular file; strerror says what."""


class TooDeep(tomllib.TOMLDecodeError):
    """The TOML nests arrays or tables deeper than the parser can follow."""


def read_text(path: str) -> str:
    """The UTF-8 text of a regular file; NotAFile, OSError or UnicodeDecodeError otherwise."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise NotAFile(errno.EISDIR, "is a directory, not a config file", path)
    if not stat.S_ISREG(st.st_mode):
        # Reading a pipe or a device could block, or yield nothing and pass for an empty file.
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a file")
        raise NotAFile(errno.EINVAL, f"is {kind}, not a regular file", path)
    with open(path, "rb") as f:
        data = f.read()
    return data.decode("utf-8")


class TooLong(tomllib.TOMLDecodeError):
    """The TOML holds an integer with more digits than Python converts."""


def parse(raw: str) -> dict[str, Any]:
    """The TOML document as a dict; TOMLDecodeError (TooDeep, TooLong) if invalid."""
    try:
        return tomllib.loads(raw)
    except RecursionError:
        # tomllib recurses once per level of `x = [[[[...`: a deep enough value exhausts the
        # interpreter's stack instead of failing as a syntax error.
        raise TooDeep("arrays or tables are nested too deeply") from None
    except tomllib.TOMLDecodeError:
        raise
    except ValueError:
        # int() refuses a decimal string over sys.get_int_max_str_digits() (4300) digits, and
        # tomllib lets that ValueError through.
        line = _long_number_line(raw)
        where = f" (at line {line})" if line else ""
        raise TooLong(f"an integer has too many digits{where}") from None


def _long_number_line(raw: str) -> int | None:
    """The first line with a run of digits too long for int()."""
    limit = sys.get_int_max_str_digits()
    for number, line in enumerate(raw.splitlines(), start=1):
        run = 0
        for char in line:
            run = run + 1 if char.isdigit() or char == "_" else 0
            if run > limit:
                return number
    return None


# --- the sources, each validated by the schema --------------------------------------------------


@dataclass
class _Layer:
    """The settings one source carries: validated values, and where each one came from."""

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)


def _read_file(path: str) -> str:
    try:
        return read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found", path=path) from None
    except NotAFile as exc:
        raise ConfigError(f"{path}: {exc.strerror}", path=path) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}", path=path) from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        byte = exc.object[exc.start]
        raise ConfigError(
            f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x} at offset {exc.start})",
            path=path,
            line=line,
        ) from None


def _file_layer(raw: str, name: str) -> _Layer:
    try:
        data = parse(raw)
    except tomllib.TOMLDecodeError as exc:
        line = syntax_error_line(exc)
        where = f"{name}:{line}" if line else name
        raise ConfigError(f"{where}: invalid TOML: {exc}", path=name, line=line) from None

    def fail(table: str, key: str | None, reason: str, needle: str | None = None) -> ConfigError:
        line = find_line(raw, table, key, needle)
        parts = [p for p in (table, key) if p]
        dotted = show_key(*parts) if key else f"[{show_key(table)}]"
        where = f"{name}:{line}" if line else name
        return ConfigError(f"{where}: {dotted}: {reason}", path=name, key=dotted, line=line)

    layer = _Layer()
    for top, value in data.items():
        if top in TOML_TABLES:
            if not isinstance(value, dict):
                raise fail("", top, f"must be a table ([{show_key(top)}]), got {type_name(value)}")
            items = [(top, k, v) for k, v in value.items()]
        elif isinstance(value, dict):
            tables = ", ".join(sorted(TOML_TABLES))
            raise fail(top, None, f"unknown table; known tables: {tables}")
        else:
            items = [("", top, value)]
        for table, key, item in items:
            setting = TOML_KEYS.get((table, key))
            if setting is None:
                known = sorted(k for t, k in TOML_KEYS if t == table)
                raise fail(table, key, f"unknown key; known keys here: {', '.join(known)}")
            try:
                layer.values[setting.key] = setting.check(item)
            except Invalid as exc:
                raise fail(table, key, exc.reason, exc.needle) from None
            line = find_line(raw, table, key)
            layer.origins[setting.key] = f"{name}:{line}: {setting.dotted}"
    return layer


def _env_layer(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    for setting in SCHEMA:
        text = environ.get(setting.env) if setting.env else None
        if text is None:
            continue
        origin = f"environment variable {setting.env}={shown(text)}"
        try:
            layer.values[setting.key] = setting.check(setting.parse(text))
        except Invalid as exc:
            raise ConfigError(f"{origin}: {exc.reason}", key=setting.env) from None
        layer.origins[setting.key] = origin
    return layer


def _flag_layer(flags: Mapping[str, Any]) -> _Layer:
    layer = _Layer()
    for key, value in flags.items():
        if value is None or value == ():
            continue
        setting = SETTINGS.get(key)
        if setting is None:
            raise ConfigError(f"unknown setting {key!r}")
        name = setting.flag or key
        origin = f"option {name}={shown(value)}"
        try:
            if isinstance(value, list | tuple):  # a repeated flag: each as its variable reads
                raw: Any = [
                    p for v in value for p in (setting.parse(v) if isinstance(v, str) else [v])
                ]
                listed = ", ".join(map(shown, value[:3]))
                more = f", ... ({len(value)} values)" if len(value) > 3 else ""
                origin = f"option {name}={listed}{more}"
            else:
                raw = setting.parse(value) if isinstance(value, str) else value
            layer.values[key] = setting.check(raw)
        except Invalid as exc:
            if exc.needle is not None and isinstance(value, list | tuple):
                origin = f"option {name}={shown(exc.needle)}"
            raise ConfigError(f"{origin}: {exc.reason}", key=name) from None
        layer.origins[key] = origin
    return layer


def load_file(path: str | Path) -> dict[str, Any]:
    """The settings a TOML file sets, validated, under Config field names."""
    name = str(path)
    return _file_layer(_read_file(name), name).values


def loads(raw: str, name: str = "<string>") -> dict[str, Any]:
    """Like load_file() for TOML text already read; `name` is used in messages."""
    return _file_layer(raw, name).values


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings the ECHOD_* variables carry, validated, under Config field names."""
    return _env_layer(environ).values


def _config_path(config_file: str | None, environ: Mapping[str, str]) -> str | None:
    path = config_file or environ.get("ECHOD_CONFIG")
    if path is None and os.path.lexists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    return path


def resolve(
    flags: Mapping[str, Any],
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the Config: defaults < file < environment < flags (None in flags means unset).

    Flags may be text, as typed on the command line, or values. An explicit config_file (or
    $ECHOD_CONFIG) must be a readable file; the default /etc/echod/echod.toml is read if present.
    Raises ConfigError, naming the source, the setting and the value.
    """
    environ = os.environ if environ is None else environ
    path = _config_path(config_file, environ)
    layers = [_file_layer(_read_file(path), path)] if path is not None else []
    layers += [_env_layer(environ), _flag_layer(flags)]
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for layer in layers:
        values.update(layer.values)
        origins.update(layer.origins)
    return build(values, origins, config_file=path)
