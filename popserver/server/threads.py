"""Session threads kept for the next connection.

Each connection is served by a thread of its own, as socketserver's ``ThreadingMixIn`` would do, but a thread
whose session has ended waits up to ``idle_seconds`` for the next connection instead of ending (at most
``keep`` threads wait at once). A busy server then starts no thread per connection, and on SQLite the
thread's database connection (Django opens one per thread: about 1 ms of CPU to open and set up, a tenth of
a short session's) serves its next sessions too (``storage.gate.keep_sqlite_connections``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from django.db import connections

from ..storage.gate import keep_sqlite_connections

logger = logging.getLogger("popserver.server")

IDLE_SECONDS = 30.0


class _Waiting:
    """An idle thread's hand: the next job is put here and the event set (a job of None: end)."""

    __slots__ = ("event", "job")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.job: tuple[Callable[[], None], str] | None = None


class SessionThreads:
    """The threads of one process's sessions (every listener of a process shares them)."""

    def __init__(self, keep: int, idle_seconds: float = IDLE_SECONDS):
        self.keep, self.idle_seconds = keep, idle_seconds
        self._guard = threading.Lock()
        self._waiting: list[_Waiting] = []  # the last one to finish is the first to be reused
        self._closed = False

    @property
    def idle(self) -> int:
        """Threads waiting for a connection now."""
        return len(self._waiting)

    def start(self, target: Callable[[], None], name: str) -> None:
        """Run ``target()`` in a waiting thread, or in a new one (RuntimeError if none can be started)."""
        with self._guard:
            if self._waiting:
                hand = self._waiting.pop()
                hand.job = (target, name)
                hand.event.set()
                return
        threading.Thread(target=self._serve, args=(target, name), daemon=True, name=name).start()

    def close(self) -> None:
        """No more reuse: waiting threads end now, busy ones when their session ends."""
        with self._guard:
            self._closed = True
            waiting, self._waiting = self._waiting, []
        for hand in waiting:
            hand.event.set()

    def _serve(self, target: Callable[[], None], name: str) -> None:
        hand = _Waiting()
        me = threading.current_thread()
        try:
            with keep_sqlite_connections():
                while True:
                    me.name = name
                    try:
                        target()
                    except Exception:  # noqa: BLE001 - the target logs its own; a thread must never die of one
                        logger.exception("unexpected error in a session thread")
                    target = None  # nothing of the last session (its socket) is kept while waiting
                    me.name = "session thread (idle)"
                    job = self._wait_for_next(hand)
                    if job is None:
                        return
                    target, name = job
        finally:
            connections.close_all()  # what the thread kept open between sessions

    def _wait_for_next(self, hand: _Waiting) -> tuple[Callable[[], None], str] | None:
        with self._guard:
            if self._closed or len(self._waiting) >= self.keep:
                return None
            hand.job = None
            hand.event.clear()
            self._waiting.append(hand)
        hand.event.wait(self.idle_seconds)
        with self._guard:
            if hand.job is None and hand in self._waiting:  # nobody came (or closed): this thread ends
                self._waiting.remove(hand)
            return hand.job
