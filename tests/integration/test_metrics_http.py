"""/metrics on the daemon's event loop: bounded in time, size and connections (issue 19, #25)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from echod.control import metrics_http
from echod.control.limits import METRICS_BACKLOG
from tests.integration.conftest import Echod, Factory, free_port
from tests.integration.test_abuse import NOBODY, PYTHON

PARTIAL = 50

# As uid 65534: open PARTIAL connections to the metrics port, each with a request header that
# never ends; say "ready"; then wait (at most 20 s) for the daemon to close each, and report
# how long each stayed open after its connect.
HOLD_PARTIAL = r"""
import json, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
conns = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    conns.append((time.monotonic(), s))
print("ready", flush=True)
open_for, deadline = [], time.monotonic() + 20
for start, s in conns:
    s.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        while s.recv(4096):
            pass
        open_for.append(time.monotonic() - start)
    except ConnectionResetError:
        open_for.append(time.monotonic() - start)
    except OSError:
        pass
print(json.dumps({"closed": len(open_for), "max_open_s": max(open_for, default=0)}))
"""


def threads_and_fds(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def raw(port: int, data: bytes) -> bytes:
    """Send data, then read until the daemon closes (ECONNRESET counts as closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


@pytest.fixture
def scraped(echod_factory: Factory) -> tuple[Echod, int]:
    """A user-mode daemon serving /metrics, and the metrics port."""
    port = free_port()
    return echod_factory(mode="user", args=["--metrics", f"127.0.0.1:{port}"]), port


def test_scrape_answers_once_per_connection(scraped: tuple[Echod, int]) -> None:
    _, port = scraped
    url = f"http://127.0.0.1:{port}"
    status, headers, body = fetch(f"{url}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    assert b"echod_connections_active " in body
    status, headers, head_body = fetch(f"{url}/metrics", "HEAD")
    assert (status, head_body) == (200, b"")
    assert int(headers["Content-Length"]) > 0
    assert fetch(f"{url}/")[0] == 200
    assert fetch(f"{url}/nope")[0] == 404
    status, headers, _ = fetch(f"{url}/metrics", "POST")
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert raw(port, b"hello there\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000).startswith(b"HTTP/1.1 431 ")


def test_partial_headers_from_an_unprivileged_user_are_bounded(
    scraped: tuple[Echod, int],
) -> None:
    d, port = scraped
    pid = d.proc.pid
    threads0, fds0 = threads_and_fds(pid)

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    attacker = subprocess.Popen(
        [PYTHON, "-c", HOLD_PARTIAL, str(port), str(PARTIAL)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=drop,  # noqa: PLW1509 (the tests are single-threaded here)
        cwd="/",
    )
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready", attacker.stderr
        ready = time.monotonic()
        peak_threads, peak_fds, scrapes = threads0, fds0, 0
        while attacker.poll() is None and time.monotonic() - ready < 25:
            threads, fds = threads_and_fds(pid)
            peak_threads, peak_fds = max(peak_threads, threads), max(peak_fds, fds)
            if time.monotonic() - ready < metrics_http.HEADER_TIMEOUT - 1:
                # A scraper still gets through while the partial clients hold their slots.
                assert fetch(f"http://127.0.0.1:{port}/metrics")[0] == 200
                scrapes += 1
            time.sleep(0.1)
        out, err = attacker.communicate(timeout=10)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    report = json.loads(out)
    print(f"threads {threads0} -> peak {peak_threads}; fds {fds0} -> peak {peak_fds}; {report}")
    assert scrapes >= 10
    assert report["closed"] == PARTIAL, err
    # Each partial connection ends by the header deadline (the oldest earlier, when dropped
    # to make room), and no thread nor fd per client is left behind.
    assert report["max_open_s"] < metrics_http.HEADER_TIMEOUT + 1.5
    assert peak_threads == threads0
    assert peak_fds <= fds0 + metrics_http.MAX_CLIENTS + METRICS_BACKLOG
    threads, fds = threads_and_fds(pid)
    assert (threads, fds <= fds0) == (threads0, True)
