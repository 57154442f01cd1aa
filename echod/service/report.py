"""What one process's echo service reports: its status, stats and rates (Service's figures).

The counters are the service's own (service.Service keeps them); this class only reads them,
in the shapes echod.control.replies types.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from echod.control.replies import ProcessStatus, Stats, Status, Totals
from echod.figures import METER, Rates, process_figures, worker_entry
from echod.kernel.echo import SocketMaps
from echod.kernel.path import KernelPath
from echod.service.admission import Admission, listen_address
from echod.service.lifecycle import Lifecycle

if TYPE_CHECKING:
    from echod.service.accept import Acceptor
    from echod.service.connection import Connection


class Report(Lifecycle):
    """status, stats, counters and rates, from the fields a Service holds."""

    acceptor: Acceptor  # its listeners
    conns: set[Connection]
    admission: Admission
    counts: Counter[str]
    insert_failed: Counter[str]
    kpath: KernelPath
    maps: SocketMaps | None
    _rates: Rates

    def status_now(self) -> ProcessStatus:
        """status()."""
        return self.status()

    def status(self) -> ProcessStatus:
        """State, modes, listen addresses, connections, BPF attach state."""
        return {
            **self.base_status(),
            "listen": [listen_address(sock) for sock in self.acceptor.listeners],
            "connections": len(self.conns),
            "connections_by_path": {
                "kernel": self.kpath.sockets,
                "user": len(self.conns) - self.kpath.sockets,
            },
        }

    def counters(self) -> dict[str, int]:
        """Flat monotonic counters (for rates)."""
        out = {
            "accepted": self.counts["accepted"],
            "user_bytes": self.counts["user_bytes"],
            "user_messages": self.counts["user_messages"],
        }
        out.update(self.bpf_counters())
        out.update(self.udp.counters())
        return out

    async def report_status(self) -> Status:
        """status(), with this process as the one worker (what the daemon reports)."""
        st = self.status()
        return {**st, "workers": [worker_entry(0, st)]}

    async def report_stats(self) -> Stats:
        """stats() (what the daemon reports)."""
        return self.stats()

    async def sample(self) -> None:
        """The daemon's 1 s tick: take a sample of the rates."""
        self.sample_rates()

    def sample_rates(self) -> None:
        """Take a sample; rates are per second over the interval since the previous one."""
        self.rates = self._rates.sample(self.counters())
        METER.tick()

    def stats(self) -> Stats:
        """Counters, rates, kernel counters and per-program BPF figures."""
        return {
            **self.totals(),
            **self.bpf_figures(),
            "udp": self.udp.figures(),
            # The daemon's own count: walking the sockhash costs ~50 ms at 19k sockets.
            "kernel_sockets": self.kpath.sockets if self.maps is not None else 0,
            "rates": dict(self.rates),
            "process": (own := process_figures()),
            "processes": [{"worker": "0", **own}],
            "workers": {"count": 1, "restarts": 0},
        }

    def totals(self) -> Totals:
        """The connection and user-path counters of stats (cheap: no system calls)."""
        return {
            "connections": {
                "accepted": self.counts["accepted"],
                "refused": self.admission.figures(),
                "active": len(self.conns),
                "closed": self.counts["closed"],
                "insert_failed": self.counts["insert_failed"],
                "insert_failed_reasons": dict(self.insert_failed),
                "aborted_backlog": self.counts["aborted_backlog"],
                "bypass_user": self.counts["bypass_user"],
            },
            "user": {"bytes": self.counts["user_bytes"], "messages": self.counts["user_messages"]},
            "udp": self.udp.totals(),
        }
