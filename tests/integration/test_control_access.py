"""Who may use a real daemon's control socket: other uids, the control and admin groups."""

from __future__ import annotations

import grp
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import Factory
from tests.integration.control_util import ECHOCTL, NOBODY, reachable_by_others, still_serving
from tests.integration.echo_util import wait_for


def test_daemon_that_may_not_probe_the_socket_leaves_it(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with reachable_by_others(d.control):
        # The live daemon's socket is root:root 0660, so nobody's probe connect gets EACCES.
        other = echod_factory(
            mode="user",
            args=["--control", d.control],
            wait=False,
            prefix=["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
        )
        assert other.proc.wait(15) != 0
    other.proc.returncode = 0  # reported; keep the factory's clean-exit check for `d`
    assert f"{d.control} exists and cannot be probed (Permission denied)" in other.log()
    assert "Traceback" not in other.log()
    still_serving(d)


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """Run echoctl as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", ECHOCTL, *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
    )


def test_unprivileged_client(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    with reachable_by_others(d.control):
        # Default 0660 root:root: the kernel refuses the connect itself.
        assert stat.S_IMODE(os.stat(d.control).st_mode) == 0o660
        r = as_nobody("--control", d.control, "status")
        assert r.returncode == 4, r
        assert f"cannot connect to {d.control}: Permission denied" in r.stderr
        # An admin opens the socket to everyone: reading works, changing does not.
        os.chmod(d.control, 0o666)
        r = as_nobody("--control", d.control, "status", "--json")
        assert r.returncode == 0, r
        assert '"state": "serving"' in r.stdout
        for cmd in (["stats"], ["watch", "--count", "2", "--interval", "0.1"]):
            r = as_nobody("--control", d.control, *cmd)
            assert r.returncode == 0, r
        for cmd in (["stop"], ["start"], ["restart", "--mode", "user"], ["reload"]):
            r = as_nobody("--control", d.control, *cmd)
            assert r.returncode == 4, r
            assert "permission_denied" in r.stderr
            # No admin group is configured: the refusal names only who may.
            assert "needs an admin: root" in r.stderr, r
            assert "group" not in r.stderr, r
        r = as_nobody("--control", d.control, "--json", "stop")
        assert r.returncode == 4
        assert '"code": "permission_denied"' in r.stdout
    still_serving(d)
    wait_for(lambda: '"uid": 65534' in d.log() and "control.denied" in d.log(), what="denial log")


def test_control_and_admin_group(echod_factory: Factory, tmp_path: Path) -> None:
    group = "adm"
    gid = grp.getgrnam(group).gr_gid
    conf = tmp_path / "echod.toml"
    conf.write_text(f'[control]\ngroup = "{group}"\nadmin_group = "{group}"\n')
    d = echod_factory(mode="user", args=["--config", str(conf)])
    st = os.stat(d.control)
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, gid)

    def member(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                f"--groups={gid}",
                ECHOCTL,
                "--control",
                d.control,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin"},
        )

    with reachable_by_others(d.control):
        # Outside the group: cannot even connect.
        assert as_nobody("--control", d.control, "status").returncode == 4
        # A supplementary member of the admin group may change the daemon.
        r = member("stop")
        assert r.returncode == 0, r
        assert member("status").returncode == 3
        r = member("start", "--mode", "user")
        assert r.returncode == 0, r
    still_serving(d)


@pytest.mark.timeout(60)
def test_admin_group_from_the_socket_with_proc_hidden(
    echod_factory: Factory, tmp_path: Path
) -> None:
    gid = grp.getgrnam("adm").gr_gid
    # What ProtectProc=invisible does for the echod user: a private /proc with hidepid=invisible,
    # and a daemon without CAP_SYS_PTRACE, so other users' /proc/<pid> are not there for it.
    # (gid= names a group the daemon is not in: the default, 0, would exempt this root daemon.)
    prefix = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        'mount -t proc -o hidepid=invisible,gid=65533 proc /proc && exec "$@"',
        "sh",
        "setpriv",
        "--bounding-set=-sys_ptrace",
        "--inh-caps=-sys_ptrace",
    ]
    conf = tmp_path / "echod.toml"
    conf.write_text('[control]\nadmin_group = "adm"\n')
    d = echod_factory(mode="user", args=["--config", str(conf)], prefix=prefix)
    mounts = Path(f"/proc/{d.proc.pid}/mounts").read_text().splitlines()
    assert any(m.split()[1] == "/proc" and "hidepid=invisible" in m for m in mounts), mounts

    def stop_as_nobody(*groups: int) -> subprocess.CompletedProcess[str]:
        ids = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", *ids, ECHOCTL]
            + ["--control", d.control, "stop"],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        )

    with reachable_by_others(d.control):
        os.chmod(d.control, 0o666)
        for groups in ((), (gid + 1000,)):
            r = stop_as_nobody(*groups)
            assert r.returncode == 4, r
            assert "permission_denied" in r.stderr
            assert "a member of group 'adm'" in r.stderr, r
        r = stop_as_nobody(gid + 1000, gid)
        assert r.returncode == 0, r
    assert d.status()["state"] == "stopped"
    assert d.call("start", {"mode": "user"})["state"] == "serving"
