"""structlog set-up: a console renderer on a TTY, JSON lines otherwise (journald-friendly)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Route structlog to stderr with the given level and format (auto: console on a TTY)."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if console
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


class RateLimited:
    """Lets at most `burst` events of one name through per `period`; counts the rest."""

    def __init__(self, burst: int = 10, period: float = 1.0) -> None:
        self.burst = burst
        self.period = period
        self._window: dict[str, tuple[float, int, int]] = {}

    def allow(self, event: str, now: float | None = None) -> tuple[bool, int]:
        """(whether to log this one, how many were suppressed since the last one logged)."""
        now = time.monotonic() if now is None else now
        start, count, suppressed = self._window.get(event, (now, 0, 0))
        if now - start >= self.period:
            start, count = now, 0
        if count < self.burst:
            self._window[event] = (start, count + 1, 0)
            return True, suppressed
        self._window[event] = (start, count, suppressed + 1)
        return False, 0
