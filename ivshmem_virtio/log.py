"""structlog set-up: readable console lines by default, JSON lines with ``--log-json``.

Events have stable names and keys (``peer joined id=0``) so scripts and tests can wait for them.
"""

from __future__ import annotations

import logging
import sys

import structlog


def setup_logging(json: bool = False, level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0,
                                                        sort_keys=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


class RateLimiter:
    """Let a peer-triggerable log line through at most ``burst`` times per ``period`` seconds."""

    def __init__(self, burst: int = 5, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._window = 0.0
        self._count = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if now - self._window >= self.period:
            self._window = now
            self._count = 0
        self._count += 1
        if self._count <= self.burst:
            return True
        self.suppressed += 1
        return False
