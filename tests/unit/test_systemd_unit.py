"""systemd/echod.service passes `systemd-analyze verify`, scores 2.5 or better offline, and keeps
the restart and reload behaviour operators rely on; systemd/echod.toml shows the defaults."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from echod.config.schema import Config
from echod.config.sources import load_file

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "echod.service"
SHIPPED_CONFIG = REPO / "systemd" / "echod.toml"
OPS_MK = REPO / "mk" / "ops.mk"
MAX_EXPOSURE = 2.5


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing: apt-get install systemd")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def _sections() -> dict[str, dict[str, list[str]]]:
    """[section] -> key -> values, in file order."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(section, {}).setdefault(key.strip(), []).append(value.strip())
    return out


def _directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for keys in _sections().values():
        for key, values in keys.items():
            out.setdefault(key, []).extend(values)
    return out


def _seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    match = re.fullmatch(r"([0-9.]+)\s*([a-z]*)", value)
    assert match, value
    assert match.group(2) in units, value
    return float(match.group(1)) * units[match.group(2)]


def _make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)$", OPS_MK.read_text(), re.MULTILINE)
    assert match, f"{name} not set in {OPS_MK}"
    return match.group(1)


def test_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart= and ExecReload= exist; the installed paths do not exist here.
    text = re.sub(
        r"^(Exec[A-Za-z]*=)/usr/local/bin/\S+", r"\1/bin/true", UNIT.read_text(), flags=re.M
    )
    copy = tmp_path / "echod.service"
    copy.write_text(text)
    result = _analyze("verify", str(copy))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_offline_security_score() -> None:
    result = _analyze("security", "--offline=true", "--no-pager", str(UNIT))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for echod\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_kernel_mode_stays_possible() -> None:
    """The hardening must leave what the BPF sockmap echo needs."""
    unit = _directives()
    assert unit["Type"] == ["notify"]
    assert unit["User"] == ["echod"]
    assert set(unit["CapabilityBoundingSet"][0].split()) == {"CAP_BPF", "CAP_NET_ADMIN"}
    assert set(unit["AmbientCapabilities"][0].split()) == {"CAP_BPF", "CAP_NET_ADMIN"}
    # bpf(2) is not in @system-service; a later ~@privileged would take it away again.
    assert "bpf" in unit["SystemCallFilter"][0].split()
    assert not any("@privileged" in f for f in unit["SystemCallFilter"][1:])
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["RuntimeDirectory"] == ["echod"]
    # ProcSubset=pid hides /proc/stat, which psutil needs for process start times.
    assert "ProcSubset" not in unit


def test_failed_start_does_not_loop() -> None:
    """A start that keeps failing (port busy) hits a start limit; a config error never retries."""
    unit = _sections()
    assert unit["Service"]["Restart"] == ["on-failure"]
    # Start limits belong in [Unit]; systemd ignores them with a warning in [Service].
    assert "StartLimitIntervalSec" not in unit["Service"]
    assert "StartLimitBurst" not in unit["Service"]
    interval = _seconds(unit["Unit"]["StartLimitIntervalSec"][-1])
    burst = int(unit["Unit"]["StartLimitBurst"][-1])
    restart_sec = _seconds(unit["Service"]["RestartSec"][-1])
    assert 0 < interval, "0 turns the start limit off"
    # Restarts every RestartSec must fit `burst` times into the interval, or the limit never hits.
    assert burst >= 1
    assert burst * restart_sec < interval, (burst, restart_sec, interval)
    # echod exits 2 on a configuration error.
    prevented = " ".join(unit["Service"]["RestartPreventExitStatus"]).split()
    assert "2" in prevented


def test_reload_is_synchronous() -> None:
    """ExecReload= waits for the daemon's verdict, so `systemctl reload` fails on a bad file."""
    unit = _directives()
    assert len(unit["ExecReload"]) == 1
    argv = shlex.split(unit["ExecReload"][0])
    # No "+": it runs as User=echod, which the daemon lets call reload like root.
    assert argv[0] == f"{_make_variable('ECHOD_BINDIR')}/echoctl", argv
    assert argv[-1] == "reload", argv
    assert "$MAINPID" not in unit["ExecReload"][0], "kill -HUP returns before the reload is done"
    control = argv[argv.index("--control") + 1]
    shipped = load_file(SHIPPED_CONFIG)
    assert control == shipped["control"], (control, shipped["control"])
    assert Path(control).parent == Path("/run") / unit["RuntimeDirectory"][0]
    # The unit's other half of the same path.
    assert unit["ExecStart"][0].split()[0] == f"{_make_variable('ECHOD_BINDIR')}/echod"


def test_shipped_config_shows_the_defaults() -> None:
    """echod.toml says it shows the built-in defaults: metrics stay off, as the README says."""
    shipped = load_file(SHIPPED_CONFIG)
    defaults = dataclasses.asdict(Config())
    assert shipped["metrics"] is None
    # Only [control] is set for the unit: the daemon runs as echod, not root, so its own default
    # path would be under $XDG_RUNTIME_DIR; the group is the daemon's own group under the unit.
    assert shipped.pop("control") == "/run/echod/control.sock"
    assert shipped.pop("control_group") == "echod"
    assert {key: defaults[key] for key in shipped} == shipped


def test_shipped_config_names_every_mutating_call() -> None:
    """The admin_group comment lists what the group unlocks, reload included."""
    from echod.control.protocol import MUTATING_METHODS

    text = SHIPPED_CONFIG.read_text()
    comment = text[: text.index("admin_group =")].rsplit("\n\n", 1)[-1]
    for method in MUTATING_METHODS:
        assert method in comment, (method, comment)
