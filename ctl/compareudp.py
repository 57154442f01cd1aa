"""UDP's paths for `echoctl compare --udp`: the user path and the kernel path (TCX).

The bypass is a sockmap between TCP sockets: it has nothing to do with UDP, so the paths are
the two modes. A daemon in kernel mode echoes UDP in the kernel unless that path could not be
attached (`status.udp.fallback_reason`); a switch is checked against `status.udp.path`, and a
run against the daemon's UDP counters (`stats.udp`), path by path: the path claimed must have
echoed at least the datagrams the bench got back.
"""

from __future__ import annotations

from typing import Any

from echoctl.bench.config import UDP_MAX_SIZE, BenchConfig
from echoctl.bench.udpreport import UDP_PATHS, udp_failures
from echoctl.bench.udpwire import HSIZE as UDP_HEADER
from echoctl.comparepaths import (
    BYPASS_SUFFIX,
    CompareError,
    check_mode,
    check_run,
    control_call,
    restart_into,
)

# The private daemon echoes UDP, and without a rate limit per source: the bench's flows all
# come from one address, and the default limit (2,000 datagrams/s) would be what is measured.
SPAWN_ARGS = ("--udp", "--udp-rate-per-source", "0")
DROPS = ("loop", "allow", "rate")


class UdpPaths:
    """UDP's paths: user and kernel."""

    protocol = "udp"
    bulk = "flood"
    spawn_args = SPAWN_ARGS

    def validate(self, modes: tuple[str, ...], sizes: tuple[int, ...]) -> None:
        """Raise ValueError for a +bypass path, another path, or a size no datagram can have."""
        if any(m.endswith(BYPASS_SUFFIX) for m in modes):
            raise ValueError(
                "the bypass is TCP's (a sockmap between TCP sockets): with --udp the paths are "
                "user and kernel"
            )
        if not modes or any(m not in UDP_PATHS for m in modes):
            raise ValueError(f"with --udp, modes must be a list of {', '.join(UDP_PATHS)}")
        if any(not UDP_HEADER <= s <= UDP_MAX_SIZE for s in sizes):
            raise ValueError(f"with --udp, sweep sizes are {UDP_HEADER} to {UDP_MAX_SIZE} bytes")

    def preflight(self, control: str) -> None:
        """Raise CompareError unless the daemon echoes UDP."""
        status = control_call(control, "status")
        if not (status.get("udp") or {}).get("enabled"):
            raise CompareError(
                f"the daemon behind {control} does not echo UDP: start it with --udp "
                "(or udp = true in its config file)"
            )

    def switch(self, control: str, path: str) -> dict[str, Any]:
        """Restart the daemon in mode `path` (its bypass as it was); check that UDP takes it."""

        def check(status: dict[str, Any]) -> None:
            check_mode(status, path)
            udp = status.get("udp") or {}
            if udp.get("path") != path:
                reason = udp.get("fallback_reason") or "no reason given"
                raise CompareError(
                    f"asked for the UDP {path} path, the daemon echoes UDP on the "
                    f"{udp.get('path')} path: {reason}"
                )

        return restart_into(control, {"mode": path}, check)

    def check(self, b: BenchConfig, report: dict[str, Any], path: str) -> None:
        """The path held, and the daemon's counters of that path moved by at least the echoes.

        The figures go into the report as `path_check`. Other clients may add to a path's
        count, so this can catch too few, never too many.
        """
        server = report["server"]
        check_run(server, path, path)
        if server.get("path_end") != path:
            raise CompareError(f"{path} path: UDP was echoed on the {server.get('path_end')} path")
        moved = server.get("udp") or {}
        echoed = {p: (moved.get(p) or {}).get("echoed_packets") for p in UDP_PATHS}
        mine = moved.get(path) or {}
        got = report["datagrams_echoed"]
        report["path_check"] = {
            "path": path,
            "bench_echoed": got,
            "daemon_echoed": echoed,
            "dropped": {r: mine.get(f"dropped_{r}", 0) for r in DROPS},
        }
        if echoed[path] is None or echoed[path] < got:
            counts = ", ".join(f"{p} {_count(echoed[p])}" for p in UDP_PATHS)
            raise CompareError(
                f"{path} path: the bench got {got:,} datagrams back, but the daemon's {path} "
                f"path echoed {_count(echoed[path])} (echoed by path: {counts})"
            )

    def failures(self, report: dict[str, Any]) -> list[str]:
        """As `bench --udp`: mismatches, duplicates, loss beyond --max-loss, socket errors;
        with the daemon's own rate-limit drops named when there was a failure to explain."""
        reasons = udp_failures(report)
        rate = ((report.get("path_check") or {}).get("dropped") or {}).get("rate")
        if reasons and rate:
            reasons.append(
                f"the daemon dropped {rate:,} datagrams over its udp_rate_per_source "
                "(0 turns the limit off)"
            )
        return reasons


def _count(n: int | None) -> str:
    return "none (not attached)" if n is None else f"{n:,}"
