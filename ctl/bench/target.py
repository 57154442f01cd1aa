"""Finding the target: resolving host and port, or reading them from a daemon's `status`."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from echoctl.bench.config import BenchError
from echoctl.client import ControlClient


def resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """Resolve host:port to (family, sockaddr); any address, as a load generator must."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise BenchError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _listen_hosts(listen: list[str]) -> list[str]:
    """Return the addresses of `status.listen` entries ("host:port", "[v6]:port")."""
    return [entry.rpartition(":")[0].strip("[]") for entry in listen]


def control_target(path: str, host: str | None, port: int | None) -> tuple[str, int]:
    """Return the host and port the daemon behind `path` listens on, checked against overrides."""
    try:
        with ControlClient(path, timeout=10.0) as client:
            status = client.call("status")
    except Exception as exc:  # ControlError or OSError
        raise BenchError(f"control socket {path}: {exc}") from exc
    return status_target(status, path, host, port)


def status_target(
    status: dict[str, Any], path: str, host: str | None, port: int | None
) -> tuple[str, int]:
    """Return the loopback host and port from a daemon's `status`; explicit ones must match.

    Without this a run with --control could load whatever listens on the default port while
    reporting the daemon's figures.
    """
    daemon_port = status.get("port")
    if not isinstance(daemon_port, int):
        raise BenchError(f"control socket {path}: status has no port")
    if port is not None and port != daemon_port:
        raise BenchError(
            f"--port {port} is not the port of the daemon behind {path} ({daemon_port})"
        )
    hosts = _listen_hosts(status.get("listen") or [])
    if host is not None:
        wanted = resolve(host, daemon_port)[1][0]
        if hosts and wanted not in hosts and not {"0.0.0.0", "::"} & set(hosts):
            raise BenchError(f"the daemon behind {path} does not listen on {host}")
        return host, daemon_port
    for h in hosts:
        if ipaddress.ip_address(h).is_loopback:
            return h, daemon_port
    if "0.0.0.0" in hosts:
        return "127.0.0.1", daemon_port
    if "::" in hosts:
        return "::1", daemon_port
    shown = ", ".join(status.get("listen") or []) or "nothing"
    raise BenchError(f"the daemon behind {path} listens on {shown}, not on loopback")
