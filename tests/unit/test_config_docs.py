"""docs/operations.md's settings table and the schema say the same: keys, variables, bounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from echod.config import validators as v
from echod.config.schema import SCHEMA, Setting

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = REPO / "docs" / "operations.md"


def settings_table() -> dict[str, dict[str, str]]:
    """The rows of the table under "## 2. Configure", by dotted key, by column."""
    text = OPERATIONS.read_text()
    section = text[text.index("## 2. Configure") :].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("| key |"))
    header = [cell.strip() for cell in section[start].strip("|").split("|")]
    rows: dict[str, dict[str, str]] = {}
    for line in section[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        table = cells["table"].strip("`[]")
        key = cells["key"].strip("`")
        rows[f"{table}.{key}" if table else key] = cells
    return rows


FILE_SETTINGS = [s for s in SCHEMA if s.toml]


def row(setting: Setting) -> dict[str, str]:
    return settings_table()[setting.dotted]


def test_the_table_lists_every_key() -> None:
    assert set(settings_table()) == {s.dotted for s in FILE_SETTINGS}


@pytest.mark.parametrize("setting", FILE_SETTINGS, ids=[s.dotted for s in FILE_SETTINGS])
def test_each_row_names_its_variable(setting: Setting) -> None:
    assert f"`{setting.env}`" in row(setting)["environment"]


# The bound each numeric row states, as the validators hold it.
DOCUMENTED_BOUNDS = {
    "port": ("int 1–65535", v.MAX_PORT),
    "workers": ("int 1–256", v.MAX_WORKERS),
    "max_connections": ("int 1–10000000", v.MAX_CONNECTIONS),
    "max_connections_per_ip": ("int 0–10000000", v.MAX_CONNECTIONS),
    "shutdown_grace": ("> 0 and ≤ 600", v.MAX_GRACE),
    "kernel_backlog_limit": ("65536 to 2^40", v.MAX_BACKLOG),
    "kernel_backlog_total": ("to 2^40", v.MAX_BACKLOG),
    "control.group": ("gid ≤ 4294967294", v.MAX_GID),
    "control.admin_group": ("gid ≤ 4294967294", v.MAX_GID),
    "host": ("at most 64", v.MAX_HOSTS),
    "allow": ("at most 1024", v.MAX_ALLOW),
    "udp_rate_per_source": ("int 0–1000000", v.MAX_UDP_RATE),
    "udp_drop_ports": ("at most 256", v.MAX_DROP_PORTS),
}


@pytest.mark.parametrize("dotted", list(DOCUMENTED_BOUNDS))
def test_documented_bounds_are_the_code_s(dotted: str) -> None:
    words, bound = DOCUMENTED_BOUNDS[dotted]
    assert words in settings_table()[dotted]["type"]
    number = re.findall(r"2\^(\d+)|(\d+)(?!.*\d)", words)[-1]
    assert (2 ** int(number[0]) if number[0] else int(number[1])) == bound


def test_every_number_is_documented_with_its_bound() -> None:
    numeric = {s.dotted for s in FILE_SETTINGS if s.type in ("int", "float")}
    assert numeric <= set(DOCUMENTED_BOUNDS)


def test_the_stop_timeout_named_in_the_docs_is_the_unit_s() -> None:
    unit = (REPO / "systemd" / "echod.service").read_text()
    timeout = re.search(r"^TimeoutStopSec=(\d+)s$", unit, re.M)
    assert timeout is not None
    text = " ".join(OPERATIONS.read_text().split())
    seconds = timeout.group(1)
    assert f"`TimeoutStopSec=` ({seconds} s in the shipped unit) is the outer limit" in text
    assert f"at most {v.MAX_GRACE:g})" in text


# --- flags: every key has one (issue 19, item 13) ----------------------------------------------


def test_every_key_has_a_flag_and_the_table_names_it() -> None:
    for setting in FILE_SETTINGS:
        assert setting.flag, f"{setting.dotted} has no flag"
        assert f"`{setting.flag}`" in row(setting)["flag"], setting.dotted


def test_help_lists_every_flag() -> None:
    from click.testing import CliRunner

    from echod.__main__ import cli

    text = CliRunner().invoke(cli, ["--help"], terminal_width=200).output
    for setting in SCHEMA:
        if setting.flag:
            assert f"{setting.flag} " in text or f"{setting.flag}/" in text, setting.flag


# --- reload without a config file (issue 19, item 8) -------------------------------------------

PROTOCOL = REPO / "docs" / "protocol.md"


def test_protocol_says_what_reload_does_without_a_file() -> None:
    """The code reloads a file-less daemon as a no-op success; the docs must say the same."""
    text = " ".join(PROTOCOL.read_text().split())
    invalid_config = next(
        line for line in PROTOCOL.read_text().splitlines() if line.startswith("| `invalid_config`")
    )
    assert "no config" not in invalid_config
    assert "A daemon started without a config file has nothing that can have changed" in text
    assert '`{"applied": [], "needs_restart": []}` (`echoctl reload` prints' in text
    assert "`configuration unchanged` and exits 0" in text


def test_reload_without_a_file_reads_the_default_file_once_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `reload` calls for a daemon started without a file: resolve(flags, None)."""
    from echod.config import sources as configsource

    default = tmp_path / "echod.toml"
    monkeypatch.setattr(configsource, "DEFAULT_CONFIG_FILE", str(default))
    before = configsource.resolve({"port": "9000"}, None, {})
    assert before.config_file is None
    assert configsource.resolve({"port": "9000"}, None, {}) == before
    default.write_text("max_connections = 5\n")
    after = configsource.resolve({"port": "9000"}, None, {})
    assert (after.config_file, after.max_connections, after.port) == (str(default), 5, 9000)
