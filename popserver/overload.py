"""Quiet logs under load: at most one line per kind of refusal per interval, with a count.

An overloaded server refuses the same way hundreds of times a second (no room, no database connection within
the wait, a database that refuses connections). A line per refusal would bury everything else, so
``refused(kind, message)`` logs the first of a kind at once and then at most one line per ``INTERVAL`` with
the number that followed (Dovecot logs its process-limit refusals the same way, once per interval).
Expected conditions never get a traceback.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

INTERVAL = 10.0  # seconds between two lines of one kind

logger = logging.getLogger("popserver.overload")


@dataclass
class _Kind:
    message: str
    level: int
    last_line: float  # when the last line of this kind was logged
    suppressed: int = 0  # events since then
    timer: threading.Timer | None = field(default=None, repr=False)


class SummaryLog:
    """Rate-limited lines per kind. ``clock`` and ``timers`` are injectable for tests."""

    def __init__(
        self,
        log: logging.Logger = logger,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        timers: bool = True,
    ):
        self.log, self.interval, self.clock, self.timers = log, interval, clock, timers
        self._kinds: dict[str, _Kind] = {}
        self._guard = threading.Lock()

    def note(self, kind: str, message: str, *, level: int = logging.WARNING) -> None:
        """One event of ``kind``: logged at once if the kind has been quiet for an interval, else counted."""
        now = self.clock()
        line = None
        with self._guard:
            entry = self._kinds.get(kind)
            if entry is None or (not entry.suppressed and now - entry.last_line >= self.interval):
                self._kinds[kind] = _Kind(message, level, now)
                line = (level, message)
            else:
                entry.message, entry.level = message, level
                entry.suppressed += 1
                if now - entry.last_line >= self.interval:
                    line = self._summary(entry, now)
                elif self.timers and entry.timer is None:
                    entry.timer = threading.Timer(
                        self.interval - (now - entry.last_line), self.flush, (kind,)
                    )
                    entry.timer.daemon = True
                    entry.timer.start()
        if line is not None:
            self.log.log(*line)

    def flush(self, kind: str | None = None) -> None:
        """Log the count of suppressed events now (of one kind, or of all: at shutdown)."""
        now = self.clock()
        lines = []
        with self._guard:
            for name, entry in self._kinds.items():
                if kind in (None, name):
                    entry.timer = None
                    if entry.suppressed:
                        lines.append(self._summary(entry, now))
        for line in lines:
            self.log.log(*line)

    def _summary(self, entry: _Kind, now: float) -> tuple[int, str]:
        count, since = entry.suppressed, now - entry.last_line
        entry.suppressed, entry.last_line = 0, now
        return entry.level, f"{entry.message} ({count} more in the last {since:.0f} s)"

    def _forget(self) -> None:
        self._guard = threading.Lock()
        self._kinds = {}


summary = SummaryLog()
os.register_at_fork(after_in_child=summary._forget)  # a worker starts with its own counts and no timers


def refused(kind: str, message: str, *, level: int = logging.WARNING) -> None:
    """Log a refusal of ``kind`` through the process's summary log."""
    summary.note(kind, message, level=level)


# Called with every error ``database_unavailable`` is told of, before the summary log thins them out (the
# server's metrics count them: ``popserver.server.metrics``).
database_error_observers: list[Callable[[BaseException], None]] = []


def database_unavailable(exc: BaseException, what: str) -> None:
    """A database error that load explains (too many connections, a pool or lock timeout): one summary
    line per interval, no traceback."""
    for observe in database_error_observers:
        observe(exc)
    text = " ".join(str(exc).split())[:200] or type(exc).__name__
    refused("database", f"database unavailable ({what}): {type(exc).__name__}: {text}")
