"""What the control socket, /metrics and the echo service may hold: slots and the fd budget.

The control socket keeps MAX_CLIENTS slots for everyone and RESERVED_CLIENTS more for admins;
/metrics keeps METRICS_CLIENTS. The echo service refuses connections FD_RESERVE descriptors
below RLIMIT_NOFILE, so that the control socket and /metrics still answer when the echo side
is at the fd limit.
"""

from __future__ import annotations

import resource

import structlog

log = structlog.get_logger("echod.limits")

# Slots: MAX_CLIENTS for everyone, of which one unprivileged uid may hold MAX_CLIENTS_PER_UID;
# RESERVED_CLIENTS more are for admins only (root, the daemon's uid, the admin group).
MAX_CLIENTS = 64
MAX_CLIENTS_PER_UID = 8
RESERVED_CLIENTS = 16
# /metrics connections open at once (more: the oldest still sending its header is dropped).
METRICS_CLIENTS = 16
# The metrics listener's backlog: the loop accepts what its queue holds at one wake-up before
# the cap above sees them, so about that many more may be open for a moment.
METRICS_BACKLOG = 8
# Descriptors the echo service leaves free (it refuses connections this far below
# RLIMIT_NOFILE): every control slot, every /metrics connection (with one accept batch), plus
# the daemon's own files (BPF, epoll, listeners, ...).
FD_RESERVE = MAX_CLIENTS + RESERVED_CLIENTS + METRICS_CLIENTS + METRICS_BACKLOG + 64


def slot_refusal(admin: bool, uid: int, total: int, of_uid: int) -> str | None:
    """Why a new client gets no slot, or None; `total` and `of_uid` are the slots held now."""
    if admin:
        if total >= MAX_CLIENTS + RESERVED_CLIENTS:
            return "too many control clients"
        return None
    if total >= MAX_CLIENTS:
        return "too many control clients"
    if of_uid >= MAX_CLIENTS_PER_UID:
        return f"too many control clients for uid {uid} (at most {MAX_CLIENTS_PER_UID})"
    return None


def echo_fd_budget() -> int:
    """Descriptors the echo service may use: RLIMIT_NOFILE's soft limit less FD_RESERVE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] - FD_RESERVE


def check_fd_budget(max_connections: int) -> None:
    """Warn when max_connections cannot be reached under the fd limit."""
    budget = echo_fd_budget()
    if max_connections > budget:
        log.warning(
            "daemon.fd_limit_low",
            max_connections=max_connections,
            nofile=budget + FD_RESERVE,
            fd_reserve=FD_RESERVE,
            connections_possible=max(budget, 0),
            hint="raise LimitNOFILE= (ulimit -n) or lower max_connections",
        )
