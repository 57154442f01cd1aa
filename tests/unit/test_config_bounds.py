"""Hostile config values: every number bounded, no pattern built from input, one short line.

Each case is refused as a ConfigError (exit 2 at start, `invalid_config` at reload), never as
an OverflowError, ValueError or re.error that escapes, and never by freezing the parser.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from echod.config import validators as v
from echod.config.schema import SCHEMA, ConfigError
from echod.config.sources import resolve
from echod.config.tomlpos import find_line

# autouse: resolve() must not pick up this machine's /etc/echod/echod.toml.
from tests.unit.test_configfile import _no_default_file  # noqa: F401

# What a message may grow to, whatever the value: one line a terminal and a journal can show.
MESSAGE_MAX = 400
NUMERIC = [s for s in SCHEMA if s.type in ("int", "float")]


def file_error(tmp_path: Path, text: str) -> str:
    """The one-line message a file with `text` is refused with."""
    path = tmp_path / "echod.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve({}, str(path), {})
    return one_line(info.value)


def one_line(exc: ConfigError) -> str:
    message = str(exc)
    assert "\n" not in message, message
    assert "\r" not in message, message
    assert len(message) <= MESSAGE_MAX, message
    return message


# --- upper bounds ---------------------------------------------------------------------------

BOUNDS = {
    "port": (65535, 65536),
    "workers": (256, 257),
    "max_connections": (10_000_000, 10_000_001),
    "max_connections_per_ip": (10_000_000, 10_000_001),
    "shutdown_grace": (600, 600.001),
    "kernel_backlog_limit": (1 << 40, (1 << 40) + 1),
    "kernel_backlog_total": (1 << 40, (1 << 40) + 1),
    "udp_rate_per_source": (1_000_000, 1_000_001),
}


def test_every_numeric_setting_has_a_bound() -> None:
    assert {s.key for s in NUMERIC} == set(BOUNDS)


@pytest.mark.parametrize("setting", NUMERIC, ids=[s.key for s in NUMERIC])
def test_numbers_are_bounded_above(setting: Any) -> None:
    top, over = BOUNDS[setting.key]
    assert setting.check(top) == top
    for value in (over, 10**400, int("f" * 5000, 16), -(10**400)):
        with pytest.raises(v.Invalid) as info:
            setting.check(value)
        assert len(info.value.reason) < 200, info.value.reason


@pytest.mark.parametrize("setting", NUMERIC, ids=[s.key for s in NUMERIC])
def test_huge_numbers_in_every_source_are_one_line(tmp_path: Path, setting: Any) -> None:
    """400 nines (OverflowError in a float), 5,000 digits (ValueError in int())."""
    dotted = setting.dotted
    for digits in (400, 5000):
        number = "9" * digits
        message = file_error(tmp_path, f"{dotted} = {number}\n")
        assert message.startswith(f"{tmp_path / 'echod.toml'}:1: "), message
        for call in (
            lambda n=number: resolve({}, None, {setting.env: n}),
            lambda n=number: resolve({setting.key: n}, None, {}),
        ):
            with pytest.raises(ConfigError) as info:
                call()
            assert "out of range" in one_line(info.value) or "<=" in str(info.value)


def test_a_hex_integer_too_long_to_print_is_named_by_its_size(tmp_path: Path) -> None:
    # int(..., 16) has no digit limit, but str() of the result has.
    message = file_error(tmp_path, "max_connections = 0x" + "f" * 5000 + "\n")
    assert "max_connections: must be an integer >= 1 and <= 10000000" in message
    assert "20000 bits" in message


def test_a_decimal_too_long_for_int_is_a_syntax_error_with_its_line(tmp_path: Path) -> None:
    message = file_error(tmp_path, "port = 1\n\nmax_connections = " + "9" * 5000 + "\n")
    assert message.endswith(":3: invalid TOML: an integer has too many digits (at line 3)")


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("shutdown_grace = 1e300\n", "<= 600, got 1e+300"),
        ("shutdown_grace = 601\n", "<= 600, got 601"),
        ("shutdown_grace = nan\n", "got nan"),
        ("shutdown_grace = inf\n", "got inf"),
        ("shutdown_grace = -inf\n", "got -inf"),
        ("shutdown_grace = " + "9" * 400 + "\n", "(400 digits)"),
    ],
)
def test_shutdown_grace_is_finite_and_bounded(tmp_path: Path, text: str, reason: str) -> None:
    message = file_error(tmp_path, text)
    assert "shutdown_grace: must be a number of seconds > 0 and <= 600" in message
    assert reason in message


@pytest.mark.parametrize("text", ["nan", "inf", "1e300", "600.5", "-1", "0"])
def test_shutdown_grace_env_and_flag_are_bounded(text: str) -> None:
    for call in (
        lambda: resolve({}, None, {"ECHOD_SHUTDOWN_GRACE": text}),
        lambda: resolve({"shutdown_grace": text}, None, {}),
    ):
        with pytest.raises(ConfigError, match=r"must be a number of seconds > 0 and <= 600"):
            call()
    assert resolve({"shutdown_grace": "600"}, None, {}).shutdown_grace == 600.0
    assert math.isclose(resolve({"shutdown_grace": "0.25"}, None, {}).shutdown_grace, 0.25)


@pytest.mark.parametrize(
    ("gid", "ok"),
    [("0", True), ("4294967294", True), ("4294967295", False), ("9" * 20, False)],
)
def test_numeric_groups_fit_a_gid(tmp_path: Path, gid: str, ok: bool) -> None:
    for table_key in ("group", "admin_group"):
        text = f'[control]\n{table_key} = "{gid}"\n'
        path = tmp_path / "echod.toml"
        path.write_text(text)
        if ok:
            assert resolve({}, str(path), {}) is not None
            continue
        message = file_error(tmp_path, text)
        assert f":2: control.{table_key}: gid " in message
        assert "out of range (at most 4294967294)" in message


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        ({"metrics": "127.0.0.1:\u00b2"}, "must be from 1 to 65535"),  # "²".isdigit() is true
        ({"metrics": "\u00b2"}, "is not HOST:PORT"),
        ({"metrics": "127.0.0.1:" + "9" * 5000}, "must be from 1 to 65535"),
        ({"workers": "\u00b2"}, "must be auto or a number of workers"),
        ({"workers": "9" * 5000}, "out of range"),
        ({"port": "9" * 5000}, "out of range"),
        ({"port": "x" * 5000}, "must be an integer, got 'xxxx"),
        ({"hosts": ("127.0.0.1",) * 65}, "at most 64"),
        ({"allow": ("10.0.0.0/8",) * 1025}, "at most 1024"),
        ({"allow": ("1" * 5000,)}, "is not a valid CIDR"),
        ({"mode": "x" * 100_000}, "(100000 characters)"),
    ],
)
def test_odd_text_is_one_short_line(flags: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(flags, None, {})
    assert reason in one_line(info.value)


# --- keys: no regular expression built from the file ------------------------------------------


@pytest.mark.parametrize(
    "key", ["a(", "(a|a)*$x", "[", "\\\\b", "a.b", "*", "a\\nb", 'a\\"b', "a" * 500]
)
def test_quoted_keys_are_named_not_compiled(tmp_path: Path, key: str) -> None:
    text = f'port = 1\ncontrol = {{ "{key}" = 1 }}\n'
    message = file_error(tmp_path, text)
    assert ":2: control." in message
    assert "unknown key; known keys here: admin_group, group, path" in message


def test_a_catastrophic_pattern_as_a_key_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Compiled into `\b(a|a)*$x\b` and searched in its own line, this key took 21 s with 26 a's.
    # Now no text from the file becomes a pattern: the re module is not even called.
    def no_pattern(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a regular expression was built or run: {args!r}")

    text = 'control = { "(a|a)*$x" = 1 } # ' + "a" * 40 + "\n"
    with monkeypatch.context() as m:
        for name in ("compile", "search", "match", "fullmatch", "finditer", "findall", "sub"):
            m.setattr(re, name, no_pattern)
        message = file_error(tmp_path, text)
    assert ':1: control."(a|a)*$x": unknown key' in message


def _lines_run(fn: Callable[[], object]) -> int:
    """How many lines of Python fn runs: a count of work that no clock or load can change."""
    count = 0

    def trace(frame: FrameType, event: str, arg: object) -> object:
        nonlocal count
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        fn()
    finally:
        sys.settrace(None)
    return count


KEYS_LOOKED_UP = (("control", "x"), ("", "port"), ("control", None))


def test_locating_keys_is_linear_in_the_line() -> None:
    """Long lines of blanks, brackets, quotes and commas: each one read once."""

    def text(n: int) -> str:
        lines = [
            "[" + " " * n,
            "[ " + "a." * (n // 2),
            "control = {" + ',"' * (n // 2),
            "control = {" + ", a" * (n // 2),
            "a" * n + " ",
            '"' + "\\" * n,
        ]
        return "\n".join(lines) + "\n"

    def work(n: int) -> int:
        raw = text(n)
        return _lines_run(
            lambda: [
                find_line(raw, t, k) for t, k in (("control", "x"), ("", "port"), ("control", None))
            ]
        )

    small, large = work(2_000), work(8_000)
    # Four times the text: four times the work when each character is read once, sixteen
    # times when a scan starts again at every position.
    assert large < 4.5 * small, (small, large)


@pytest.mark.parametrize(
    ("raw", "table", "key", "line"),
    [
        ('x = 1\n[control]\npath = "/a"\n', "control", "path", 3),
        ('x = 1\ncontrol.path = "/a"\n', "control", "path", 2),
        ('x = 1\ncontrol = { group = "a", path = "/a" }\n', "control", "path", 2),
        ('x = 1\ncontrol = { pathx = 1 }\ncontrol2 = { path = "/a" }\n', "control", "path", None),
        ('x = 1\n[ "control" ]\n"path" = 1\n', "control", "path", 3),
        ("x = 1\n[control]\n'we(ird' = 1\n", "control", "we(ird", 3),
        ('x = 1\n[control]\n"a\\"b" = 1\n', "control", 'a"b', 3),
        ("x = 1\n[control] # c\n", "control", None, 2),
        ("x = 1\n[[control]]\n", "control", None, 2),
    ],
)
def test_find_line(raw: str, table: str, key: str | None, line: int | None) -> None:
    assert find_line(raw, table, key) == line


def test_a_key_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    message = file_error(tmp_path, '"a\\nb" = 1\n')
    assert ': "a\\nb": unknown key' in message
