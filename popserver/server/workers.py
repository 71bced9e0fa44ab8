"""``runpop3 --workers N`` and ``runlmtp --workers N``: every core, one set of listeners, one budget of
database connections.

The parent binds every listener (POP3: plain and implicit TLS; LMTP: TCP or a UNIX socket), closes its
database connections, and forks N workers. Each worker serves the same listening sockets with the threaded
server of ``listener.py`` (``Pop3Server`` or ``lmtp.LmtpServer``: the protocol is the ``start`` callable the
command gives; its threads, lock heartbeat and connection pool are started after the fork) and gets an equal
share of the
server's limits: sessions, unauthenticated connections per IP, password checks and database connections
(``conf.worker_share``). The mailbox lock, the throttle and SQLite's writer lock are shared through the
database, the cache and a lock file, as between separate servers.

The parent only supervises: a worker that dies is logged with its exit status and replaced; SIGTERM and
SIGINT stop every worker as a single server stops (sessions told and ended without UPDATE, locks released);
SIGHUP reloads the TLS certificate in the parent (for replacements) and in every worker. Log lines of a worker
start with ``worker=N``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable

from django.db import connections

from ..conf import get_setting, set_worker_count, worker_share
from ..storage.lock import release_dead_locks
from . import metrics
from .listener import ThreadedServer, stop_servers
from .tls import TlsContextHolder

logger = logging.getLogger("popserver.server")

RESPAWN_DELAY = 1.0  # a worker that dies this soon after its start is replaced only after this long
STOP_MARGIN = 5.0
READY_TIMEOUT = 60.0  # the parent announces the server once every worker accepts, or after this long  # beyond POPSERVER_SHUTDOWN_GRACE, what a worker gets to exit before it is killed


def parse_workers(text: str) -> int:
    """``auto`` (the number of cores this process may use) or a whole number >= 1."""
    if str(text).strip().lower() == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    count = int(text)
    if count < 1:
        raise ValueError("the number of workers must be at least 1")
    return count


def workers_option(text: str) -> int:
    """``--workers`` of ``runpop3`` and ``runlmtp``: ``parse_workers``, and no more workers than
    POPSERVER_DB_CONNECTIONS (each needs a connection of its own). ValueError says what is wrong."""
    try:
        count = parse_workers(text)
    except ValueError:
        raise ValueError(f"--workers: {text!r} is not a number >= 1 or 'auto'.") from None
    if count > get_setting("DB_CONNECTIONS"):
        raise ValueError(
            f"--workers {count}: POPSERVER_DB_CONNECTIONS ({get_setting('DB_CONNECTIONS')}) is the budget of "
            "all workers together, and each needs at least one connection."
        )
    return count


class SignalFlags:
    """SIGTERM/SIGINT/SIGHUP (and SIGCHLD) for a main loop: the handlers only set flags, and a wake-up pipe
    (``signal.set_wakeup_fd``) ends the loop's wait at once. No lock is taken in a handler (an ``Event.set``
    in a handler can deadlock with the interrupted thread's own use of it)."""

    def __init__(self, *, children: bool = False):
        self.stop_requested = False
        self.reload_requested = False
        self._read, self._write = os.pipe()
        for fd in (self._read, self._write):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        # A handler of its own makes SIGCHLD write to the wake-up pipe: the supervisor reaps at once.
        signal.signal(signal.SIGCHLD, (lambda *_: None) if children else signal.SIG_DFL)

    def _stop(self, *_) -> None:
        self.stop_requested = True

    def _reload(self, *_) -> None:
        self.reload_requested = True

    def take_reload(self) -> bool:
        requested, self.reload_requested = self.reload_requested, False
        return requested

    def wait(self, timeout: float) -> None:
        """Until a signal arrives or ``timeout`` passes."""
        try:
            select.select([self._read], [], [], timeout)
        except InterruptedError:
            pass
        try:
            while os.read(self._read, 512):
                pass
        except BlockingIOError:
            pass

    def wait_for_stop(self, tls: TlsContextHolder | None = None, *, gone: Callable[[], bool] = lambda: False):
        """Until SIGTERM or SIGINT (or ``gone()``, checked twice a second): a serving process's main loop.
        SIGHUP reloads ``tls``'s certificate; without TLS it is ignored, never fatal."""
        while not self.stop_requested:
            self.wait(0.5)
            if self.take_reload() and tls is not None:
                tls.reload()
            if gone():
                return

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.close_pipe()

    def close_pipe(self) -> None:
        """The pipe only (a forked worker drops its parent's)."""
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass


def close_database_connections() -> None:
    """Before ``fork()``: a child must not share the parent's socket to the database (PITFALLS), nor a pool
    whose threads did not come along."""
    connections.close_all()
    for connection in connections.all(initialized_only=True):
        if getattr(connection, "_connection_pools", {}).get(connection.alias) is not None:
            connection.close_pool()


def use_connection_pool(size: int, wait: float) -> bool:
    """PostgreSQL: this process's connections come from psycopg's pool (Django's ``OPTIONS["pool"]``), at
    most ``size`` (the process's share of POPSERVER_DB_CONNECTIONS), so a session that gives its connection
    back between commands and takes it again does not reconnect. A pool the site configured is kept, with its
    sizes capped to the share. Nothing happens without psycopg-pool, with CONN_MAX_AGE other than 0 (Django's
    pool needs it), or on other databases: there the gate alone keeps the budget, with plain connections."""
    try:
        import psycopg_pool  # noqa: F401
    except ImportError:
        return False
    connections.close_all()  # a plain connection cannot be handed back to a pool
    used = False
    for alias in connections:
        settings_dict = connections.settings[alias]
        if settings_dict["ENGINE"] != "django.db.backends.postgresql" or settings_dict.get("CONN_MAX_AGE"):
            continue
        options = settings_dict.setdefault("OPTIONS", {})
        pool = options.get("pool")
        pool = dict(pool) if isinstance(pool, dict) else {}
        pool["max_size"] = min(pool.get("max_size", size), size)
        pool["min_size"] = min(pool.get("min_size", 1), pool["max_size"])
        pool.setdefault("timeout", wait)
        options["pool"] = pool
        used = True
    return used


def name_worker_in_logs(number: int) -> None:
    """Every log line of this process starts with ``worker=N`` (whatever the site's log format)."""
    make_record = logging.getLogRecordFactory()
    prefix = f"worker={number} "

    def record_factory(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.worker = number
        record.msg = prefix + (record.msg if isinstance(record.msg, str) else str(record.msg))
        return record

    logging.setLogRecordFactory(record_factory)


# start(stop_event, room) -> the worker's servers, on the listening sockets the parent bound: e.g.
# ``listener.start_servers(..., sockets=..., room=room)`` or ``lmtp.start_lmtp_servers(..., sockets=..., room=room)``.
StartServers = Callable[[threading.Event, tuple], list[ThreadedServer]]


class Supervisor:
    """The parent of ``runpop3 --workers N`` and ``runlmtp --workers N``: forks the workers, replaces the
    dead, stops them all. The protocol is in ``start`` alone."""

    def __init__(self, start: StartServers, count: int, *, tls: TlsContextHolder | None = None):
        """``start`` serves the listening sockets the caller bound (see ``StartServers``); ``tls``: the
        certificate SIGHUP reloads."""
        self.start, self.count, self.tls = start, count, tls
        self.workers: dict[int, tuple[int, float]] = {}  # pid -> (worker number, started at)
        self.respawn_at: dict[int, float] = {}  # worker number -> when to start its replacement
        self.parent_pid = os.getpid()
        self.signals: SignalFlags | None = None
        # Shared memory, made before the forks: which workers have a free session slot.
        self.room = multiprocessing.RawArray("b", count)
        self.serving = multiprocessing.RawArray("b", count)  # set by each worker once it accepts

    def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Start the workers, call ``ready()``, supervise until SIGTERM or SIGINT, then stop them all."""
        self.signals = signals = SignalFlags(children=True)
        try:
            for number in range(1, self.count + 1):
                self.start_worker(number)
            deadline = time.monotonic() + READY_TIMEOUT
            while not all(self.serving) and time.monotonic() < deadline and not signals.stop_requested:
                signals.wait(0.05)
                self.reap()
            ready()
            while not signals.stop_requested:
                signals.wait(0.5)
                if signals.take_reload():
                    self.reload()
                self.reap()
                now = time.monotonic()
                for number, when in list(self.respawn_at.items()):
                    if when <= now and not signals.stop_requested:
                        del self.respawn_at[number]
                        self.start_worker(number)
            self.stop_all()
        finally:
            signals.close()

    def start_worker(self, number: int) -> None:
        close_database_connections()
        for stream in logging.getLogger().handlers + logging.getLogger("popserver").handlers:
            stream.flush()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the caller's stack
            code = 1
            try:
                metrics.worker_started()
                if self.signals is not None:
                    self.signals.close_pipe()
                code = self.serve(number)
            except BaseException:
                logger.exception("worker %d failed", number)
            finally:
                metrics.worker_stopping()
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = (number, time.monotonic())
        logger.info("worker %d started (pid %d)", number, pid)

    def serve(self, number: int) -> int:
        """A worker's life: its own signal flags, log prefix, share of the limits; serve until told to stop."""
        signals = SignalFlags()
        name_worker_in_logs(number)
        set_worker_count(self.count)
        use_connection_pool(worker_share("DB_CONNECTIONS"), get_setting("DB_CONNECTION_WAIT"))
        stop = threading.Event()
        servers = self.start(stop, (self.room, number - 1))
        self.serving[number - 1] = 1  # the parent announces the server once every worker accepts
        signals.wait_for_stop(self.tls, gone=self._parent_gone)
        stop_servers(servers)
        close_database_connections()
        return 0

    def _parent_gone(self) -> bool:
        if os.getppid() == self.parent_pid:
            return False
        logger.warning("the supervising process is gone: stopping")
        return True

    def reload(self) -> None:
        if self.tls is not None:
            self.tls.reload()  # what replacements start with
        for pid in self.workers:
            self._signal(pid, signal.SIGHUP)

    def reap(self) -> list[int]:
        """Collect the workers that ended; log each with its status and plan its replacement."""
        ended = []
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid not in self.workers:
                continue
            number, started = self.workers.pop(pid)
            metrics.process_exited(pid)
            self.room[number - 1] = self.serving[number - 1] = 0
            ended.append(number)
            lived = time.monotonic() - started
            logger.warning(
                "worker %d (pid %d) %s after %.1f s; starting a new one",
                number,
                pid,
                describe_status(status),
                lived,
            )
            self.respawn_at[number] = time.monotonic() + (RESPAWN_DELAY if lived < RESPAWN_DELAY * 2 else 0)
        return ended

    def stop_all(self) -> None:
        """SIGTERM every worker; one that outlives the grace is killed, and its locks freed here."""
        for pid in self.workers:
            self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + get_setting("SHUTDOWN_GRACE") + STOP_MARGIN
        killed = False
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid:
                number, _ = self.workers.pop(pid, (0, 0))
                metrics.process_exited(pid)
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                    logger.info("worker %d (pid %d) stopped", number, pid)
                else:
                    logger.warning(
                        "worker %d (pid %d) %s while stopping", number, pid, describe_status(status)
                    )
                continue
            if time.monotonic() > deadline and not killed:
                for late in self.workers:
                    logger.warning(
                        "worker %d (pid %d) did not stop in time: killed", self.workers[late][0], late
                    )
                    self._signal(late, signal.SIGKILL)
                killed = True
            threading.Event().wait(0.05)  # sync-ok: polling waitpid for children, bounded by the deadline
        if killed:
            release_dead_locks()  # the killed workers' locks (their pids are reaped: known dead)
            close_database_connections()

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"
