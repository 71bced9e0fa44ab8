"""One database writer at a time on SQLite: across the threads of a process, and across processes.

SQLite has one writer. A thread that finds it busy polls (its busy handler sleeps up to 100 ms between tries),
so under load some writers wait for seconds while newcomers slip in between their tries. Writers queue on a
lock first instead: a re-entrant lock among the threads of a process, then an ``flock`` on a file beside the
database (``<database>.writer``) among processes: the workers of ``runpop3 --workers N``, other servers and
``deliver``. A blocked ``flock`` sleeps in the kernel until the holder lets go, which is fair and quick where
SQLite's busy handler polls. Writers that do not take it (the admin, a site's own code) still meet SQLite's busy
timeout. Where the file cannot be opened (a read-only folder) the lock is per process only. Other databases
have row locks: there this is a no-op.

Hold it around a whole write transaction (``with one_writer(), transaction.atomic(): ...``) or a single
autocommit write, and never around anything that waits for something else.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from contextlib import AbstractContextManager, nullcontext

from django.db import DEFAULT_DB_ALIAS, connections

logger = logging.getLogger("popserver.storage")


class SqliteWriter:
    """The writer lock of one SQLite database file (re-entrant within a thread)."""

    def __init__(self, database: str):
        self.path = f"{database}.writer"
        self._threads = threading.RLock()
        self._depth = 0  # guarded by _threads: only its owner changes it
        self._fd: int | None = None
        self._fd_pid = 0

    def __enter__(self) -> SqliteWriter:
        self._threads.acquire()
        if self._depth == 0:
            try:
                fd = self._file()
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                self._threads.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc_info) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._fd is not None and self._fd_pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _file(self) -> int | None:
        """This process's descriptor of the lock file (a forked child opens its own: flock is per open file)."""
        if self._fd_pid != os.getpid():
            self._fd, self._fd_pid = None, os.getpid()
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o660)
            except OSError as exc:
                logger.warning(
                    "SQLite writer lock %s unavailable (%s): writers queue per process", self.path, exc
                )
        return self._fd

    def _after_fork(self) -> None:
        self._threads = threading.RLock()
        self._depth = 0
        if self._fd is not None:  # the parent's open file: ours would share its lock
            os.close(self._fd)
        self._fd, self._fd_pid = None, 0


_writers: dict[str, SqliteWriter] = {}
_writers_guard = threading.Lock()


_vendors: dict[tuple[str, str], str] = {}  # (alias, ENGINE) -> the backend's vendor


def one_writer(using: str = DEFAULT_DB_ALIAS) -> AbstractContextManager:
    # From the settings, not the thread's connection (Django's per-thread look-up): every write asks.
    settings_dict = connections.settings[using]  # the connection's own settings_dict (test databases too)
    key = (using, settings_dict["ENGINE"])
    vendor = _vendors.get(key)
    if vendor is None:
        vendor = _vendors[key] = connections[using].vendor
    if vendor != "sqlite":
        return nullcontext()
    name = str(settings_dict["NAME"])
    if not name or name == ":memory:" or name.startswith("file:"):
        name = ""  # an in-memory database has no file to lock beside; the threads still queue
    with _writers_guard:
        writer = _writers.get(name)
        if writer is None:
            writer = _writers[name] = SqliteWriter(name) if name else _ThreadsOnly()
    return writer


class _ThreadsOnly(SqliteWriter):
    def __init__(self) -> None:
        super().__init__("")

    def _file(self) -> int | None:
        return None


def _after_fork_in_child() -> None:
    global _writers_guard
    _writers_guard = threading.Lock()
    for writer in _writers.values():
        writer._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
