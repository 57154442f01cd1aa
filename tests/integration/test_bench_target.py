"""Which daemon `echoctl bench` and `compare` measure: the control socket's port, another host."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from echoctl.benchcmd import bench, compare
from tests.integration.bench_util import run_bench
from tests.integration.conftest import Factory, free_port
from tests.integration.echo_util import wait_for
from tests.integration.netns_util import veth_namespace


def test_bench_takes_the_port_from_the_control_socket(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    code, r = run_bench("--control", d.control, "-c", "2", "-d", "0.3")
    assert code == 0, r
    assert r["server"]["mode"] == "user"
    assert r["server"]["connections_by_path"]["user"] >= 2
    wrong = str(free_port())
    result = CliRunner().invoke(bench, ["--control", d.control, "--port", wrong, "-r", "1"])
    assert result.exit_code == 1
    assert "is not the port of the daemon" in result.stderr


def test_compare_refuses_a_port_its_daemon_does_not_serve(echod_factory: Factory) -> None:
    d = echod_factory(mode="user")
    args = ["--control", d.control, "--modes", "user", "--repeat", "1", "-c", "2", "-d", "0.3"]
    result = CliRunner().invoke(compare, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)["runs"][0]["report"]
    assert report["server"]["connections_by_path"]["user"] >= 2
    result = CliRunner().invoke(compare, [*args, "--port", str(free_port()), "--json"])
    assert result.exit_code == 1
    assert "is not the port" in json.loads(result.stdout)["error"]["message"]


def test_bench_measures_a_daemon_beyond_loopback(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with veth_namespace() as (ns, _host_ip, ns_ip):
        port = free_port()
        control = str(tmp_path / "control.sock")
        echod = str(Path(sys.executable).parent / "echod")
        argv = ["ip", "netns", "exec", ns, echod, "--mode", "user", "--host", ns_ip]
        log = open(tmp_path / "echod.log", "wb")  # noqa: SIM115 - closed in finally
        proc = subprocess.Popen(
            [*argv, "--port", str(port), "--control", control], stdout=log, stderr=log
        )
        try:
            wait_for(lambda: os.path.exists(control), 15, what="the daemon's control socket")
            args = ["--host", ns_ip, "--port", str(port), "--control", control]
            code, r = run_bench(*args, "-c", "4", "-d", "1")
            assert code == 0, (r, (tmp_path / "echod.log").read_text())
            assert r["errors"] == r["mismatches"] == r["stalled"] == 0
            assert r["requests"] > 100
            assert r["server"]["mode"] == "user"
            code, r = run_bench(*args, "-c", "2", "-s", "1-65536", "--pattern", "stream", "-d", "1")
            assert code == 0, r
            assert r["bytes_verified"] == r["bytes_sent"] > 0
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
