"""`make run` serves on the embedded defaults, even where /etc/echod/echod.toml exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

# In a private mount namespace, /etc gets an overlay holding an /etc/echod/echod.toml that
# cannot start (a group that does not exist, as one kept after uninstall can name); the host's
# /etc is never touched. Then `make run` starts; the driver prints the state it reached.
DRIVER = r"""
import json, os, signal, socket, subprocess, sys, time
root, bindir, tmp, port = sys.argv[1:5]
for d in ("upper", "work"):
    os.mkdir(os.path.join(tmp, d))
subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
    f"lowerdir=/etc,upperdir={tmp}/upper,workdir={tmp}/work", "/etc"], check=True)
os.makedirs("/etc/echod", exist_ok=True)
with open("/etc/echod/echod.toml", "w") as f:
    f.write('[control]\ngroup = "no-such-group-echod-test"\n')
control = os.path.join(tmp, "control.sock")
args = f"--mode user --workers 1 --control {control} --log-format json"
env = {k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")}
proc = subprocess.Popen(["make", "-s", "-C", root, "run", f"BIN={bindir}", f"PORT={port}",
    f"ARGS={args}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    start_new_session=True, text=True)
state = "exited"
deadline = time.monotonic() + 20
while time.monotonic() < deadline and proc.poll() is None:
    if os.path.exists(control):
        sys.path.insert(0, root)
        from echoctl.client import ControlClient
        try:
            with ControlClient(control, timeout=2) as c:
                st = c.call("status")
            if st.get("state") == "serving":
                state = f"serving on {st.get('port')}"
                break
        except Exception:
            pass
    time.sleep(0.1)
if proc.poll() is None:
    os.killpg(proc.pid, signal.SIGTERM)
try:
    out, _ = proc.communicate(timeout=30)
except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
print(json.dumps({"state": state, "log_tail": out.splitlines()[-3:]}))
"""


def test_make_run_ignores_the_system_config_file(tmp_path: Path) -> None:
    etc_before = Path("/etc/echod/echod.toml").exists()
    port = free_port()
    bindir = str(Path(sys.executable).parent)
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", DRIVER]
        + [str(ROOT), bindir, str(tmp_path), str(port)],
        capture_output=True,
        text=True,
        timeout=90,
        env={k: v for k, v in os.environ.items() if not k.startswith("ECHOD_")},
    )
    assert r.returncode == 0, r
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["state"] == f"serving on {port}", out
    assert Path("/etc/echod/echod.toml").exists() == etc_before  # the host's /etc untouched
