"""Logging: silent as a library, structlog lines on stderr in our own commands.

The code logs with structlog (stable event names and keys, ``peer joined id=0``, so scripts and
tests can wait for them). As a library (python-can's ``interface="ivshmem"``, ``BlkClient``)
those events go through the standard ``logging`` module under the ``ivshmem_virtio`` logger,
which carries a ``NullHandler``: an application sees nothing unless it configures logging, as
for any library. :func:`setup_logging`, called only by our CLI and daemons, switches structlog
to readable console lines (or JSON with ``--log-json``) on stderr.
"""

from __future__ import annotations

import logging
import sys

import structlog
from structlog.typing import Processor

LIBRARY_LOGGER = "ivshmem_virtio"


def library_logging() -> None:
    """Route structlog through stdlib ``logging``, unless the application configured structlog.

    Runs at import of ``ivshmem_virtio``: a process that set structlog up itself keeps its
    set-up; our own entry points replace this with :func:`setup_logging`.
    """
    logging.getLogger(LIBRARY_LOGGER).addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0, sort_keys=False),
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def setup_logging(json: bool = False, level: str = "info") -> None:
    """Our commands' logs: one structlog line per event on stderr, at ``level`` and above."""
    lvl = getattr(logging, level.upper(), logging.INFO)
    processors: list[Processor] = [
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
