"""`echoctl --help` names the control socket echoctl really uses, for root and for a user."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Runs in a private mount namespace with an empty /run, so no system daemon's socket is found;
# prints the help, then the path `status` tried, as uid 65534 with XDG_RUNTIME_DIR unset.
AS_USER = """
import subprocess, sys
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
code = (
    "import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['echoctl', *sys.argv[2:]]; "
    "from echoctl.cli import main; main()"
)
for args in (["--help"], ["--timeout", "1", "status"]):
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "env", "-u", "XDG_RUNTIME_DIR", "-u", "ECHOD_CONTROL", "COLUMNS=400",
         "/usr/bin/python3", "-c", code, sys.argv[1], *args],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    print(r.stdout + r.stderr)
    print("=====")
"""


def _flat(text: str) -> str:
    """Undo click's wrapping (which also breaks lines after a hyphen)."""
    return re.sub(r"\s+", " ", re.sub(r"(?<=\w-)\n\s*", "", text))


def test_help_names_the_socket_a_user_without_xdg_runtime_dir_gets() -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("needs a system python3 that uid 65534 can run")
    site = next(p for p in sys.path if p.endswith("site-packages"))
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", AS_USER, site],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r
    help_text, status_text, _ = r.stdout.split("=====")
    tried = re.search(r"cannot connect to (\S+):", status_text)
    assert tried, status_text
    assert tried.group(1) == "/tmp/echod-65534/echod/control.sock"
    # The help states that path (UID standing for the uid), and not the system one for it.
    assert "/tmp/echod-UID/echod/control.sock when XDG_RUNTIME_DIR is unset" in _flat(help_text)


def test_help_names_roots_default() -> None:
    from echoctl.cli import CONTROL_HELP
    from echod.config.schema import default_control_path

    assert default_control_path() == "/run/echod/control.sock"  # these tests run as root
    assert "default: /run/echod/control.sock as root" in CONTROL_HELP
