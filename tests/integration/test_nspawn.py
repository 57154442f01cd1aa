"""The real thing: boot systemd in a container, `make install`, run echod as a Type=notify unit.

How the container is made (each point was needed on the development VM):

- The root is an overlayfs: the host's / read-only below, a tmpfs above. `make install`,
  useradd and the unit all land in the tmpfs and vanish at power-off; the host is untouched.
  (`--volatile=overlay` refuses `-D /`; `--volatile=yes` leaves /usr read-only.)
- It runs in a private mount and PID namespace (`unshare`), where a tmpfs covers
  /run/systemd/nspawn: nspawn refuses to clean up its propagation directory on a disk file
  system, and /run is not a tmpfs on a host that did not boot systemd.
- `--register=no --keep-unit`: there is no host systemd/machined bus to talk to.
- `--capability=CAP_BPF,CAP_NET_ADMIN`: nspawn's default bounding set lacks both, so the unit's
  AmbientCapabilities= could not grant them.
- `--system-call-filter=bpf`: nspawn's own seccomp filter denies bpf(2) otherwise (EPERM).
- `--private-network`: the echo port and the metrics port are the container's own loopback.
  Because of that, pip installs offline from a wheelhouse built on the host beforehand.

Inside, a oneshot unit runs DRIVER and powers the container off; results come back in a bound
directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 600  # seconds, for the whole container run

NSPAWN_FLAGS = [
    "--quiet",
    "--register=no",
    "--keep-unit",
    "--private-network",
    "--capability=CAP_BPF,CAP_NET_ADMIN",
    "--system-call-filter=bpf",
    "--machine=echod-test",
]

# A private mount namespace for the overlay, and a PID namespace whose death (--kill-child,
# when the test kills unshare on a timeout) takes the whole container with it. Without it a
# killed nspawn leaves the container's systemd running, orphaned.
UNSHARE = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child",
           "--mount-proc"]  # fmt: skip

DRIVER_UNIT = """\
[Unit]
Description=echod nspawn test driver
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/bin/bash /in/driver.sh
StandardOutput=file:/out/driver.log
StandardError=inherit
TimeoutStartSec=480
"""

# Runs as root inside the container. Each check appends "name=value" to /out/results;
# a step that fails records its output in /out/driver.log and the test reports it.
DRIVER = r"""
set -u
# SuccessAction=poweroff did not fire for this oneshot under systemd 252; power off by hand.
trap 'systemctl --no-block poweroff' EXIT
R=/out/results
: > $R
put() { echo "$1=$2" >> $R; }
check() { local name=$1; shift; if "$@"; then put "$name" ok; else put "$name" "FAIL(rc=$?)"; fi; }
SOCK=/run/echod/control.sock

echo_once() {  # an echo round trip on 127.0.0.1:8888
    python3 - <<'EOF'
import socket
with socket.create_connection(("127.0.0.1", 8888), timeout=5) as s:
    s.settimeout(5)
    data = b"hello from nspawn\n" * 100
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    assert got == data, (len(got), len(data))
EOF
}

# A copy of the checkout: pip writes build/ and *.egg-info next to the sources.
mkdir -p /tmp/src
tar -C /src --exclude=./.venv --exclude=./.git --exclude=./build --exclude='./*.egg-info' \
    -cf - . | tar -C /tmp/src -xf -
cd /tmp/src

check install env PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels make -f mk/ops.mk PY=python3 install
grep -q "^install=ok" $R || exit 1
check user_created getent passwd echod
check config_installed test -f /etc/echod/echod.toml
check linked test -x /usr/local/bin/echod -a -x /usr/local/bin/echoctl

check start systemctl start echod
put active "$(systemctl is-active echod)"
put main_pid_user "$(ps -o user= -p "$(systemctl show -P MainPID echod)")"
put caps "$(grep CapEff /proc/$(systemctl show -P MainPID echod)/status | cut -f2)"
put status_text "$(systemctl show -P StatusText echod)"
runuser -u echod -- /usr/local/bin/echoctl --control $SOCK status --json > /out/status.json
put status_rc $?
check echo echo_once
python3 -c 'import urllib.request as u; print(u.urlopen(u.Request(
    "http://127.0.0.1:9108/metrics"), timeout=5).read().decode())' > /out/metrics.txt
put metrics_rc $?

pid_before=$(systemctl show -P MainPID echod)
check reload systemctl reload echod
put active_after_reload "$(systemctl is-active echod)"
pid_after=$(systemctl show -P MainPID echod)
put same_pid_after_reload "$([ "$pid_after" = "$pid_before" ] && echo yes || echo no)"
check echo_after_reload echo_once

check stop systemctl stop echod
put result_after_stop "$(systemctl show -P Result echod)"
put active_after_stop "$(systemctl is-active echod)"
journalctl -u echod --no-pager -o short-monotonic > /out/journal.txt 2>&1

check uninstall make -f mk/ops.mk uninstall
put user_removed "$(getent passwd echod >/dev/null && echo no || echo yes)"
put opt_removed "$([ -e /opt/echod ] && echo no || echo yes)"
put unit_removed "$([ -e /etc/systemd/system/echod.service ] && echo no || echo yes)"
put done yes
"""

# Mount namespace + overlay root + nspawn; "$@" are the nspawn arguments after -D ROOT.
BOOT = r"""
set -eu
top=$1; shift
if [ "$(stat -f -c %T /run/systemd/nspawn 2>/dev/null || echo none)" != tmpfs ]; then
    mkdir -p /run/systemd/nspawn
    mount -t tmpfs tmpfs /run/systemd/nspawn
fi
mount -t tmpfs tmpfs "$top"
mkdir "$top/upper" "$top/work" "$top/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$top/upper,workdir=$top/work" "$top/root"
exec systemd-nspawn -D "$top/root" "$@"
"""


def _results(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            out[key] = value
    return out


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels for echod and every dependency, so the container installs offline."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(
        REPO,
        src,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__"),
    )
    wheels = tmp_path_factory.mktemp("wheels")
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(wheels)]
    subprocess.run([*pip, "setuptools>=68", "wheel", str(src)], check=True, timeout=600)
    return wheels


@pytest.fixture
def container_dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """in/ (driver, read-only), out/ (results), top/ (overlay mount point)."""
    indir, outdir, top = (tmp_path / name for name in ("in", "out", "top"))
    for d in (indir, outdir, top):
        d.mkdir()
    return indir, outdir, top


@pytest.mark.slow
@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_systemd_unit_in_nspawn(wheelhouse: Path, container_dirs: tuple[Path, Path, Path]) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to boot a container")
    for tool in ("systemd-nspawn", "unshare"):
        assert shutil.which(tool), f"{tool} missing: apt-get install systemd-container"
    indir, outdir, top = container_dirs
    (indir / "driver.sh").write_text(DRIVER)
    (indir / "echod-test.service").write_text(DRIVER_UNIT)
    cmd = [
        *UNSHARE, "sh", "-c", BOOT, "boot", str(top),
        *NSPAWN_FLAGS,
        f"--bind-ro={REPO}:/src",
        f"--bind-ro={wheelhouse}:/wheels",
        f"--bind-ro={indir}:/in",
        f"--bind={outdir}:/out",
        f"--bind-ro={indir / 'echod-test.service'}:/etc/systemd/system/echod-test.service",
        "-b", "systemd.firstboot=off", "systemd.wants=echod-test.service",
    ]  # fmt: skip
    console = outdir / "console.log"
    with console.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=BOOT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()  # unshare: its PID namespace, and so the container, dies with it
            proc.wait(timeout=30)
    results = _results(outdir / "results")

    def show(name: str) -> str:
        path = outdir / name
        return f"--- {name}\n{path.read_text()[-6000:] if path.exists() else '(none)'}\n"

    context = "".join(show(n) for n in ("results", "driver.log", "journal.txt", "console.log"))
    assert proc.returncode == 0, f"container exited {proc.returncode}\n{context}"
    assert results.get("done") == "yes", context

    expected = {
        "install": "ok",
        "user_created": "ok",
        "config_installed": "ok",
        "linked": "ok",
        "start": "ok",
        "active": "active",
        "main_pid_user": "echod",
        "status_rc": "0",
        "echo": "ok",
        "metrics_rc": "0",
        "reload": "ok",
        "active_after_reload": "active",
        "same_pid_after_reload": "yes",
        "echo_after_reload": "ok",
        "stop": "ok",
        "result_after_stop": "success",
        "active_after_stop": "inactive",
        "uninstall": "ok",
        "user_removed": "yes",
        "opt_removed": "yes",
        "unit_removed": "yes",
    }
    got = {key: results.get(key) for key in expected}
    assert got == expected, context

    # Only CAP_BPF (39) and CAP_NET_ADMIN (12) are effective in the daemon.
    assert int(results["caps"], 16) == (1 << 39) | (1 << 12), context

    status = json.loads((outdir / "status.json").read_text())
    assert status["mode"] == "kernel", status
    metrics = (outdir / "metrics.txt").read_text()
    assert 'echod_mode{mode="kernel"} 1.0' in metrics
    assert "echod_connections_accepted_total" in metrics
