"""The budget of database connections: at most N threads of a server process hold one at a time.

POPSERVER_DB_CONNECTIONS is what one ``runpop3`` promises its database, all workers together; each worker
gets an equal share (``conf.worker_share``). A thread takes a slot when it first runs queries
(``using_database()``) and keeps it, with its connection, until it is about to wait for something other than
the database (``release_connection()``): its client, a password-check slot, the failed-login delay. So a
connection is never held while a client is awaited, and a session whose commands come quickly does not
reconnect for each. A thread waits at most POPSERVER_DB_CONNECTION_WAIT for a slot, then ``ServerBusy``
(``-ERR [SYS/TEMP]``), logged once per interval for all sessions (``popserver.overload``).

Only threads inside ``ConnectionGate.budgeted()`` are counted (a server's session and heartbeat threads);
elsewhere (``deliver``, the web process, a test's own thread) ``using_database()`` does nothing.

Order of waits: a password-check slot, then a connection slot, then SQLite's writer lock; a thread holding a
connection slot gives it back before it waits for a password-check slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DatabaseError, connections
from django.db.backends.signals import connection_created

from ..conf import get_setting, worker_share
from ..exceptions import ServerBusy
from ..overload import refused

logger = logging.getLogger("popserver.storage")

_local = threading.local()  # gate: the thread's ConnectionGate; holding: has a slot; depth: using_database()


class ConnectionGate:
    """Slots for the budgeted threads of one server process: this process's share of
    POPSERVER_DB_CONNECTIONS, read when a slot is wanted (like every setting), or a fixed ``size``."""

    def __init__(self, size: int | None = None, wait: float | None = None):
        self._size, self._wait = size, wait
        self._guard = threading.Lock()
        self._freed = threading.Condition(self._guard)
        self._waiting = 0
        self._in_use = 0
        self.peak = 0  # the most slots ever in use at once (tests and the bench read it)

    @property
    def size(self) -> int:
        return self._size if self._size is not None else worker_share("DB_CONNECTIONS")

    @property
    def wait(self) -> float:
        return self._wait if self._wait is not None else get_setting("DB_CONNECTION_WAIT")

    @contextmanager
    def budgeted(self) -> Iterator[None]:
        """Count this thread's database connections against the budget until the block ends."""
        previous = getattr(_local, "gate", None)
        _local.gate, _local.holding, _local.depth = self, False, 0
        try:
            yield
        finally:
            _release(self, force=True)
            _local.gate = previous

    @property
    def waiting(self) -> int:
        """Threads queued for a slot now."""
        return self._waiting

    @property
    def in_use(self) -> int:
        return self._in_use

    def _acquire(self) -> None:
        size, wait = self.size, self.wait
        with self._guard:
            if self._in_use >= size:
                deadline = time.monotonic() + wait
                self._waiting += 1
                try:
                    while self._in_use >= size:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._freed.wait(remaining)
                finally:
                    self._waiting -= 1
                if self._in_use >= size:
                    refused(
                        "db-budget",
                        f"no database connection came free within {wait:g} s "
                        f"({size} per process, POPSERVER_DB_CONNECTIONS): answered [SYS/TEMP]",
                    )
                    raise ServerBusy()
            self._in_use += 1
            self.peak = max(self.peak, self._in_use)

    def _give_back(self) -> None:
        with self._guard:
            self._in_use -= 1
            self._freed.notify()


@contextmanager
def using_database() -> Iterator[None]:
    """Run queries within the budget: take a slot first if this thread has none (re-entrant)."""
    gate = getattr(_local, "gate", None)
    if gate is None:
        yield
        return
    if not _local.holding:
        gate._acquire()
        _local.holding = True
    _local.depth += 1
    try:
        yield
    finally:
        _local.depth -= 1


def release_connection() -> None:
    """This thread is about to wait for something other than the database: close its connections and give
    its slot back (outside ``using_database()`` only; a no-op for threads outside a budget)."""
    gate = getattr(_local, "gate", None)
    if gate is not None:
        _release(gate)


def holding_connection() -> bool:
    """True if this budgeted thread holds a slot (and perhaps an open connection)."""
    return bool(getattr(_local, "holding", False)) and getattr(_local, "gate", None) is not None


def connection_wanted() -> bool:
    """True if another thread of this thread's budget is queued for a slot."""
    gate = getattr(_local, "gate", None)
    return gate is not None and gate.waiting > 0


def _release(gate: ConnectionGate, force: bool = False) -> None:
    if not _local.holding or (_local.depth and not force):
        if force:
            _close_connections()
        return
    try:
        _close_connections()
    finally:
        _local.holding = False
        gate._give_back()


def _close_connections() -> None:
    keep_sqlite = getattr(_local, "keep_sqlite", False)
    for connection in connections.all(initialized_only=True):
        # SQLite's connections are the thread's own open file, not one of a database server's: a thread that
        # keeps them (server/threads.py) gives back its slot but not its connection, unless it is broken.
        if keep_sqlite and connection.vendor == "sqlite" and not connection.errors_occurred:
            continue
        try:
            connection.close()
        except DatabaseError:  # a broken connection is gone either way
            pass


@contextmanager
def keep_sqlite_connections() -> Iterator[None]:
    """Within the block, giving back a slot leaves this thread's SQLite connections open (a session thread
    that serves connection after connection); the caller closes them when the thread ends."""
    _local.keep_sqlite = True
    try:
        yield
    finally:
        _local.keep_sqlite = False


def _check_budgeted(sender, connection, **kwargs) -> None:
    """A budgeted thread that connects without a slot is a bug (a query outside ``using_database()``)."""
    if getattr(_local, "gate", None) is not None and not _local.holding:
        refused(
            "db-unbudgeted",
            f"a database connection was opened outside the budget by {threading.current_thread().name}",
            level=logging.ERROR,
        )


connection_created.connect(_check_budgeted, weak=False, dispatch_uid="popserver.storage.gate")
