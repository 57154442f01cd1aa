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
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import require_bpf

REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 660  # seconds, for the whole container run

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
TimeoutStartSec=540
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

echo_once() {  # two echo round trips on one connection to 127.0.0.1:8888
    # (the short circuit takes a connection once its first echo is back)
    python3 - <<'EOF'
import socket
with socket.create_connection(("127.0.0.1", 8888), timeout=5) as s:
    s.settimeout(5)
    data = b"hello from nspawn\n" * 100
    for _ in range(2):
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
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels

# An interpreter only root can reach, as pyenv under /root is: install must refuse to say "next:".
chmod 0700 /root
install -d -m 0700 /root/py/bin
cp /usr/bin/python3.11 /root/py/bin/python3
make -f mk/ops.mk ECHOD_PYTHON=/root/py/bin/python3 install > /out/install_private.log 2>&1
put private_python_rc $?
said() { grep -q "$1" "$2" && echo yes || echo no; }
put private_python_said_why "$(said 'echod user cannot start' /out/install_private.log)"
put private_python_said_next "$(said '^next:' /out/install_private.log)"

# The default interpreter, over the refused install: the venv is rebuilt on /usr/bin/python3.
make -f mk/ops.mk install > /out/install.log 2>&1
put install "$([ $? = 0 ] && echo ok || echo FAIL)"
cat /out/install.log
grep -q "^install=ok" $R || exit 1
put install_checked "$(said '^check: echod, version' /out/install.log)"
put install_said_next "$(said '^next:' /out/install.log)"
put venv_python "$(readlink -f /opt/echod/bin/python3)"
put system_python "$(readlink -f /usr/bin/python3)"
put plot_installed "$(/opt/echod/bin/python3 -c \
    'import importlib.util as u; print(u.find_spec("matplotlib") is not None)')"
check user_created getent passwd echod
check config_installed test -f /etc/echod/echod.toml
check linked test -x /usr/local/bin/echod -a -x /usr/local/bin/echoctl

# Metrics are off in the shipped file; an admin group is unset. Turn both on the way the
# operations guide says: a drop-in.
groupadd echoadm
useradd -U -M -G echod,echoadm alice   # admin only through a supplementary group
useradd -U -M -G echod bob             # may connect (socket group), not an admin
useradd -U -M carol                    # neither
useradd -M -g echoadm -G echod dave    # admin through the primary group: the control case
put alice_groups "$(id -Gn alice | tr ' ' ,)"
mkdir -p /etc/systemd/system/echod.service.d
printf '[Service]\nEnvironment=ECHOD_METRICS=127.0.0.1:9108 ECHOD_ADMIN_GROUP=echoadm\n' \
    > /etc/systemd/system/echod.service.d/test.conf
systemctl daemon-reload

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

# The same-host bypass, switched on live under the unit (two capabilities, read-only cgroups).
/usr/local/bin/echoctl --control $SOCK restart --bypass --json > /out/bypass_on.json 2>&1
put bypass_on_rc $?
check echo_bypassed echo_once
/usr/local/bin/echoctl --control $SOCK stats --json > /out/bypass_stats.json
/usr/local/bin/echoctl --control $SOCK restart --no-bypass > /dev/null 2>&1
put bypass_off_rc $?
check echo_after_bypass echo_once

pid_before=$(systemctl show -P MainPID echod)
check reload systemctl reload echod
put active_after_reload "$(systemctl is-active echod)"
pid_after=$(systemctl show -P MainPID echod)
put same_pid_after_reload "$([ "$pid_after" = "$pid_before" ] && echo yes || echo no)"
check echo_after_reload echo_once

# A reload with a file that does not validate fails, and the daemon serves on unchanged.
cp /etc/echod/echod.toml /tmp/good.toml
sed -i 's/^mode = "auto"/mode = "bogus"/' /etc/echod/echod.toml
systemctl reload echod
put bad_reload_rc $?
put active_after_bad_reload "$(systemctl is-active echod)"
pid_after=$(systemctl show -P MainPID echod)
put same_pid_after_bad_reload "$([ "$pid_after" = "$pid_before" ] && echo yes || echo no)"
check echo_after_bad_reload echo_once
cp /tmp/good.toml /etc/echod/echod.toml
check reload_after_fix systemctl reload echod

# Mutating calls: refused to a socket-group member and to a stranger, allowed to an admin
# whose admin group is supplementary.
ctl_as() { local who=$1; shift; runuser -u "$who" -- /usr/local/bin/echoctl --control $SOCK "$@"; }
ctl_as bob stop > /out/bob_stop.txt 2>&1
put bob_stop_rc $?
ctl_as carol stop > /out/carol_stop.txt 2>&1
put carol_stop_rc $?
ctl_as bob status > /dev/null 2>&1
put serving_after_refusals_rc $?
ctl_as dave stop > /dev/null 2>&1
put dave_stop_rc $?
ctl_as dave start > /dev/null 2>&1
put dave_start_rc $?
ctl_as alice stop > /out/alice_stop.txt 2>&1
put alice_stop_rc $?
ctl_as alice status > /dev/null 2>&1
put status_after_alice_stop_rc $?
ctl_as alice start > /out/alice_start.txt 2>&1
put alice_start_rc $?
check echo_after_alice_start echo_once

check stop systemctl stop echod
put result_after_stop "$(systemctl show -P Result echod)"
put active_after_stop "$(systemctl is-active echod)"

# A config error (exit 2) is not restarted.
sed -i 's/^mode = "auto"/mode = "bogus"/' /etc/echod/echod.toml
systemctl start echod > /dev/null 2>&1
put bad_config_start_rc $?
sleep 5  # more than RestartSec=
put bad_config_exit_status "$(systemctl show -P ExecMainStatus echod)"
put bad_config_restarts "$(systemctl show -P NRestarts echod)"
put bad_config_state "$(systemctl is-active echod)"
cp /tmp/good.toml /etc/echod/echod.toml
systemctl reset-failed echod

# A start that keeps failing (port busy) gives up at the start limit instead of looping.
python3 -c 'import socket, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8888)); s.listen(); time.sleep(120)' &
squatter=$!
sleep 1
systemctl start --no-block echod
for _ in $(seq 60); do  # "activating" while it waits to restart, "failed" once it gives up
    [ "$(systemctl is-active echod)" = failed ] && break
    sleep 1
done
put busy_result "$(systemctl show -P Result echod)"
journalctl -u echod --no-pager > /tmp/busy.txt
put busy_limit_logged "$(said 'Start request repeated too quickly' /tmp/busy.txt)"
put busy_state "$(systemctl is-active echod)"
put busy_restarts "$(systemctl show -P NRestarts echod)"
sleep 5
put busy_restarts_later "$(systemctl show -P NRestarts echod)"
kill $squatter
systemctl reset-failed echod
journalctl -u echod --no-pager -o short-monotonic > /out/journal.txt 2>&1

rm -r /etc/systemd/system/echod.service.d
systemctl daemon-reload
check uninstall make -f mk/ops.mk uninstall
put user_removed "$(getent passwd echod >/dev/null && echo no || echo yes)"
put opt_removed "$([ -e /opt/echod ] && echo no || echo yes)"
put unit_removed "$([ -e /etc/systemd/system/echod.service ] && echo no || echo yes)"
put config_removed "$([ -e /etc/echod/echod.toml ] && echo no || echo yes)"
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
def privileged() -> None:
    """Booting needs root, and the checks need kernel mode: a skip, or a failure in CI."""
    require_bpf()
    for tool in ("systemd-nspawn", "unshare", "runuser"):
        assert shutil.which(tool), f"{tool} missing: apt-get install systemd-container util-linux"


@pytest.fixture(scope="module")
def wheelhouse(privileged: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
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


@dataclass
class Run:
    """What one container boot left behind: the driver's results, and its logs for messages."""

    results: dict[str, str]
    outdir: Path
    context: str

    def get(self, *keys: str) -> dict[str, str | None]:
        """The results for these keys (None for a check that never ran)."""
        return {key: self.results.get(key) for key in keys}


@pytest.fixture(scope="module")
def run(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Boot the container once, run DRIVER in it, and collect its results for every test."""
    base = tmp_path_factory.mktemp("nspawn")
    # in/ (driver, read-only), out/ (results), top/ (overlay mount point).
    indir, outdir, top = (base / name for name in ("in", "out", "top"))
    for d in (indir, outdir, top):
        d.mkdir()
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

    def show(name: str) -> str:
        path = outdir / name
        return f"--- {name}\n{path.read_text()[-6000:] if path.exists() else '(none)'}\n"

    names = ("results", "driver.log", "install_private.log", "journal.txt", "console.log")
    context = "".join(show(n) for n in names)
    results = _results(outdir / "results")
    assert proc.returncode == 0, f"container exited {proc.returncode}\n{context}"
    assert results.get("done") == "yes", context
    return Run(results, outdir, context)


pytestmark = [pytest.mark.slow, pytest.mark.bpf, pytest.mark.timeout(BOOT_TIMEOUT + 300)]


def test_install_and_uninstall(run: Run) -> None:
    """install builds /opt/echod on the system interpreter, without plotting; uninstall is exact."""
    assert run.get(
        "install", "install_checked", "install_said_next", "user_created", "config_installed",
        "linked", "plot_installed", "uninstall", "user_removed", "opt_removed", "unit_removed",
        "config_removed",
    ) == {
        "install": "ok",
        "install_checked": "yes",
        "install_said_next": "yes",
        "user_created": "ok",
        "config_installed": "ok",
        "linked": "ok",
        "plot_installed": "False",
        "uninstall": "ok",
        "user_removed": "yes",
        "opt_removed": "yes",
        "unit_removed": "yes",
        "config_removed": "yes",
    }, run.context  # fmt: skip
    assert run.results["venv_python"] == run.results["system_python"], run.context


def test_install_refuses_an_interpreter_the_service_cannot_run(run: Run) -> None:
    """A venv built on a python under /root fails install loudly instead of saying "next:"."""
    assert run.results["private_python_rc"] != "0", run.context
    assert run.get("private_python_said_why", "private_python_said_next") == {
        "private_python_said_why": "yes",
        "private_python_said_next": "no",
    }, run.context


def test_unit_serves_in_kernel_mode(run: Run) -> None:
    """Type=notify start as the echod user with two capabilities; echo, status and metrics."""
    assert run.get(
        "start", "active", "main_pid_user", "status_rc", "echo", "metrics_rc", "stop",
        "result_after_stop", "active_after_stop",
    ) == {
        "start": "ok",
        "active": "active",
        "main_pid_user": "echod",
        "status_rc": "0",
        "echo": "ok",
        "metrics_rc": "0",
        "stop": "ok",
        "result_after_stop": "success",
        "active_after_stop": "inactive",
    }, run.context  # fmt: skip
    # Only CAP_BPF (39) and CAP_NET_ADMIN (12) are effective in the daemon.
    assert int(run.results["caps"], 16) == (1 << 39) | (1 << 12), run.context
    status = json.loads((run.outdir / "status.json").read_text())
    assert status["mode"] == "kernel", status
    metrics = (run.outdir / "metrics.txt").read_text()
    assert 'echod_mode{mode="kernel"} 1.0' in metrics
    assert "echod_connections_accepted_total" in metrics


def test_bypass_works_under_the_unit(run: Run) -> None:
    """The short circuit attaches with CAP_BPF + CAP_NET_ADMIN and ProtectControlGroups=yes."""
    assert run.get(
        "bypass_on_rc", "echo_bypassed", "bypass_off_rc", "echo_after_bypass"
    ) == {
        "bypass_on_rc": "0",
        "echo_bypassed": "ok",
        "bypass_off_rc": "0",
        "echo_after_bypass": "ok",
    }, run.context  # fmt: skip
    on = json.loads((run.outdir / "bypass_on.json").read_text())
    assert on["bypass"]["enabled"] is True, on
    assert on["bypass"]["path"] == "short_circuit", on
    stats = json.loads((run.outdir / "bypass_stats.json").read_text())
    assert stats["bypass"]["bypassed_conns"] >= 1, stats["bypass"]
    assert stats["bypass"]["short_bytes"] >= 1800, stats["bypass"]


def test_reload_reports_a_rejected_config(run: Run) -> None:
    """`systemctl reload` succeeds on a good file, fails on a bad one; the daemon serves on."""
    assert run.get(
        "reload", "active_after_reload", "same_pid_after_reload", "echo_after_reload",
        "active_after_bad_reload", "same_pid_after_bad_reload", "echo_after_bad_reload",
        "reload_after_fix",
    ) == {
        "reload": "ok",
        "active_after_reload": "active",
        "same_pid_after_reload": "yes",
        "echo_after_reload": "ok",
        "active_after_bad_reload": "active",
        "same_pid_after_bad_reload": "yes",
        "echo_after_bad_reload": "ok",
        "reload_after_fix": "ok",
    }, run.context  # fmt: skip
    assert run.results["bad_reload_rc"] not in ("0", None), run.context


def test_admin_group_as_supplementary_group(run: Run) -> None:
    """Under the shipped unit (ProtectProc=invisible), admin_group works as a supplementary group.

    alice is in the admin group only as a supplementary group; bob may connect (socket group)
    but is no admin; carol is in neither group; dave has the admin group as his primary group.
    """
    assert run.results.get("alice_groups", "").split(",")[0] == "alice", run.context
    # The admin group itself is in effect: a primary-group member may stop and start.
    assert run.get("dave_stop_rc", "dave_start_rc") == {
        "dave_stop_rc": "0",
        "dave_start_rc": "0",
    }, run.context
    assert run.get(
        "bob_stop_rc", "carol_stop_rc", "serving_after_refusals_rc", "alice_stop_rc",
        "status_after_alice_stop_rc", "alice_start_rc", "echo_after_alice_start",
    ) == {
        "bob_stop_rc": "4",  # permission denied
        "carol_stop_rc": "4",
        "serving_after_refusals_rc": "0",
        "alice_stop_rc": "0",
        "status_after_alice_stop_rc": "3",  # stopped
        "alice_start_rc": "0",
        "echo_after_alice_start": "ok",
    }, run.context + "".join(
        f"--- {n}\n{(run.outdir / n).read_text() if (run.outdir / n).exists() else '(none)'}\n"
        for n in ("bob_stop.txt", "carol_stop.txt", "alice_stop.txt", "alice_start.txt")
    )  # fmt: skip


def test_failed_start_does_not_loop(run: Run) -> None:
    """A config error (exit 2) is not restarted; a busy port stops at the start limit."""
    assert run.results["bad_config_start_rc"] != "0", run.context
    assert run.get(
        "bad_config_exit_status", "bad_config_restarts", "bad_config_state", "busy_state",
        "busy_limit_logged",
    ) == {
        "bad_config_exit_status": "2",
        "bad_config_restarts": "0",
        "bad_config_state": "failed",
        "busy_state": "failed",
        "busy_limit_logged": "yes",
    }, run.context  # fmt: skip
    # systemd 252 keeps the last exit's result; later versions say start-limit-hit.
    assert run.results["busy_result"] in ("start-limit-hit", "exit-code"), run.context
    restarts = int(run.results["busy_restarts"])
    assert 1 <= restarts <= 5, run.context  # StartLimitBurst=5 starts, the first is no restart
    assert run.results["busy_restarts_later"] == run.results["busy_restarts"], run.context
