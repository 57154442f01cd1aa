"""The sources of settings: the TOML file, the ECHOD_* environment and the flags; resolve().

Each source is read into a layer of values, every one sent through its setting's validator in
the schema (echod.config.schema), and remembered with where it came from (file and line,
variable, flag) so that a message can name it. resolve() layers them over the defaults.
"""

from __future__ import annotations

import errno
import json
import os
import re
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
from echod.config.validators import SHOWN_MAX, Invalid, shown, type_name

__all__ = ["find_line", "from_env", "load_file", "loads", "resolve"]

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


def syntax_error_line(exc: tomllib.TOMLDecodeError) -> int | None:
    """The 1-based line a TOMLDecodeError points at, if it says."""
    match = re.search(r"line (\d+)", str(exc))
    return int(match.group(1)) if match else None


# tomllib reports no positions for values, so the line of a bad key is found in the text. This
# is a scanner, not a regular expression: nothing from the file ever becomes a pattern, and
# each line is read once, left to right.
_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_BLANK = " \t"


def _skip_blank(line: str, i: int) -> int:
    while i < len(line) and line[i] in _BLANK:
        i += 1
    return i


def _string_end(line: str, i: int) -> int | None:
    """The index just past the one-line TOML string that opens at line[i]."""
    quote, j = line[i], i + 1
    while j < len(line):
        if line[j] == "\\" and quote == '"':
            j += 2
        elif line[j] == quote:
            return j + 1
        else:
            j += 1
    return None


def _unquote(token: str) -> str:
    if token[0] == '"' and "\\" in token:
        try:  # escapes are decoded as tomllib decodes them, so the key compares equal
            return str(tomllib.loads(f"k = {token}")["k"])
        except tomllib.TOMLDecodeError:
            pass
    return token[1:-1]


def _key_path(line: str, i: int) -> tuple[tuple[str, ...], int] | None:
    """The dotted key starting at line[i] (after blanks), and the index after it; or None."""
    parts: list[str] = []
    while True:
        i = _skip_blank(line, i)
        if i < len(line) and line[i] in "\"'":
            end = _string_end(line, i)
            if end is None:
                return None
            parts.append(_unquote(line[i:end]))
        else:
            end = i
            while end < len(line) and line[end] in _BARE:
                end += 1
            if end == i:
                return None
            parts.append(line[i:end])
        i = _skip_blank(line, end)
        if i < len(line) and line[i] == ".":
            i += 1
            continue
        return tuple(parts), i


def _header(line: str) -> tuple[str, ...] | None:
    """The key of a `[table]` or `[[table]]` header line."""
    i = _skip_blank(line, 0)
    if not line.startswith("[", i):
        return None
    i += 2 if line.startswith("[[", i) else 1
    found = _key_path(line, i)
    if found is None or not line.startswith("]", found[1]):
        return None
    return found[0]


def _assignment(line: str, i: int = 0) -> tuple[tuple[str, ...], int] | None:
    """The key of `key = ...` at line[i], and the index after the `=`."""
    found = _key_path(line, i)
    if found is None or not line.startswith("=", found[1]):
        return None
    return found[0], found[1] + 1


def _in_inline_table(line: str, start: int, key: str) -> bool:
    """Whether `key = ...` appears in the inline table that follows line[start]."""
    for i in range(start, len(line)):
        if line[i] in "{,":
            found = _assignment(line, i + 1)
            if found is not None and found[0] == (key,):
                return True
    return False


def find_line(raw: str, table: str, key: str | None, needle: str | None = None) -> int | None:
    """The 1-based line of `table.key` (of the [table] header when key is None).

    With `needle`, the line of a multi-line array's element that contains it.
    """
    current: tuple[str, ...] = ()
    want = (table,) if table else ()
    found: int | None = None
    lines = raw.splitlines()
    for number, line in enumerate(lines, start=1):
        header = _header(line)
        if header is not None:
            current = header
            if key is None and current == want:
                return number
            continue
        assign = _assignment(line) if key is not None else None
        if assign is None:
            continue
        full = current + assign[0]
        # `key = ...` inside [table], `table.key = ...` at the top, or `table = { key = ... }`.
        if full == (*want, key) or (
            table and full == want and key is not None and _in_inline_table(line, assign[1], key)
        ):
            found = number
            break
    if found is None:
        return None
    if needle is not None:
        for number in range(found, len(lines) + 1):
            line = lines[number - 1]
            if needle in line:
                return number
            if number > found and (_assignment(line) or _header(line) is not None):
                break
    return found


def show_key(*parts: str) -> str:
    """A dotted key as TOML writes it: bare where it can be, else quoted (and short)."""
    shown = []
    for part in parts:
        if part and all(c in _BARE for c in part) and len(part) <= SHOWN_MAX:
            shown.append(part)
        else:
            text = json.dumps(part)
            shown.append(text if len(text) <= SHOWN_MAX else f'{text[: SHOWN_MAX - 4]}..."')
    return ".".join(shown)


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
