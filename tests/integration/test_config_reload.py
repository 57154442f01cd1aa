"""`reload` without a config file, and with one that has gone (issue 19, item 8).

Reload re-reads the sources the daemon started from. Without a file, nothing can have changed:
the reload succeeds and changes nothing. A file read at start and gone now is invalid_config.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from echod.config.schema import DEFAULT_CONFIG_FILE
from tests.integration.conftest import BIN, Echod
from tests.integration.control_util import still_serving
from tests.integration.echo_util import wait_for


def echoctl(d: Echod, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "echoctl"), "--control", d.control, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_reload_without_a_config_file_changes_nothing(
    echod_factory: Callable[..., Echod],
) -> None:
    if os.path.lexists(DEFAULT_CONFIG_FILE):
        pytest.skip(f"{DEFAULT_CONFIG_FILE} exists: the daemon would read it")
    d = echod_factory(mode="user", args=["--max-connections", "7"])
    r = echoctl(d, "reload")
    assert (r.returncode, r.stdout.strip(), r.stderr) == (0, "configuration unchanged", "")
    r = echoctl(d, "--json", "reload")
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"applied": [], "needs_restart": []}
    os.kill(d.proc.pid, signal.SIGHUP)
    wait_for(lambda: d.log().count("config.reloaded") == 3, what="the SIGHUP reload")
    assert "config.reload_rejected" not in d.log()
    still_serving(d)


def test_reload_of_a_config_file_gone_since_start_is_invalid_config(
    echod_factory: Callable[..., Echod], tmp_path: Path
) -> None:
    cfg = tmp_path / "echod.toml"
    cfg.write_text("max_connections = 100\n")
    d = echod_factory(mode="user", args=["--config", str(cfg)])
    cfg.unlink()
    r = echoctl(d, "--json", "reload")
    assert r.returncode == 1
    error = json.loads(r.stdout)["error"]
    assert error == {"code": "invalid_config", "message": f"{cfg}: config file not found"}
    still_serving(d)
