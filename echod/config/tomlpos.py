"""Where a key sits in TOML text: the line a message names, since tomllib reports none.

A scanner, not a regular expression: nothing from the file ever becomes a pattern, and each
line is read once, left to right.
"""

from __future__ import annotations

import json
import re
import tomllib

from echod.config.validators import SHOWN_MAX

__all__ = ["find_line", "show_key", "syntax_error_line"]


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
