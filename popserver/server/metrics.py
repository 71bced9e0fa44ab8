"""Prometheus metrics (``runpop3 --metrics ADDR:PORT``): a small facade over ``prometheus_client``.

The server calls the hooks below at a few points (the listener's admit and refuse, the connection handler,
the TLS handshake, the PROXY header, a login's outcome). Until ``enable()`` they are bound to a function
that does nothing, so a server without metrics pays one call per hook, and ``prometheus_client`` (the
optional ``popserver[metrics]`` dependency) is never imported. Callers use them as ``metrics.NAME(...)``,
never ``from .metrics import NAME`` (that would keep the no-op). Commands and octets, the per-command hot
path, are counted by sessions of ``session_class`` into a tally of their own (see ``Tally``): the engine
itself knows nothing of metrics, and without metrics the handler runs a plain ``Pop3Session``.

Worker processes add up through the library's multiprocess mode: the parent calls ``enable(multiprocess=
True)`` before anything imports ``prometheus_client`` (the directory is set in the environment and emptied
first, and every forked worker inherits both), serves ``/metrics`` from the files of every process, calls
``worker_started()`` in each worker after the fork and ``process_exited(pid)`` when it reaps one (its
live gauges go; its counters stay, so totals never go down).

Database errors are counted where the server reports them: ``overload.database_unavailable`` (the errors
load explains, logged a line per interval) tells its observers, and a handler on the ``popserver`` logger
(level ERROR) sees the others, and lost locks, as they are logged with their exception: every place that
meets one already reports it, and none of them needs to know about metrics.
The metrics are runpop3's: ``runlmtp`` does not enable them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .. import overload
from ..conf import node_name
from ..exceptions import (
    AuthenticationFailed,
    CommitFailed,
    LoginLockedOut,
    LoginRefused,
    LoginTooSoon,
    MailboxInUse,
    TemporaryLoginFailure,
)
from ..protocol.commands import CommandError
from ..protocol.session import Pop3Session

logger = logging.getLogger("popserver.server")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Label values: fixed sets, never a user name, an address or anything else a client chooses.
REFUSAL_REASONS = ("full", "per_ip", "untrusted_proxy", "no_thread")
LOGIN_METHODS = ("user", "plain", "login", "app_password")
LOGIN_RESULTS = ("ok", "wrong_password", "disabled", "throttled", "in_use", "login_delay", "temporary")
LOCK_REASONS = ("in_use", "lost")
TLS_MODES = ("implicit", "stls")
TLS_RESULTS = ("ok", "failed", "timeout")
PROXY_RESULTS = ("ok", "health_check", "invalid", "timeout", "closed")
UNKNOWN_VERB = "unknown"  # a verb the server does not have (the client's word is not a label value)
DATABASE_ERRORS = (
    "DatabaseError",
    "OperationalError",
    "InterfaceError",
    "IntegrityError",
    "DataError",
    "ProgrammingError",
    "InternalError",
    "NotSupportedError",
)

_MECHANISMS = {"USER": "user", "PLAIN": "plain", "LOGIN": "login"}
_REFUSALS = {
    AuthenticationFailed: "wrong_password",
    LoginLockedOut: "throttled",
    MailboxInUse: "in_use",
    LoginTooSoon: "login_delay",
    TemporaryLoginFailure: "temporary",
}
# Seconds. Commands: a RETR of a small message takes some 50 µs; logins: a password hash, 0.1 s or more.
COMMAND_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
LOGIN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsUnavailable(Exception):
    """``--metrics`` without the ``prometheus-client`` package, or a mode it cannot switch to now."""


def _nothing(*args, **kwargs) -> None:
    return None


# The hooks -----------------------------------------------------------------------------------------------
enabled = False
session_opened = _nothing  # ()
session_closed = _nothing  # (session or None): a MeteredSession's tally is flushed and retired
connection_accepted = _nothing  # ()
connection_refused = _nothing  # (reason): one of REFUSAL_REASONS
connection_dropped = _nothing  # (): an idle unauthenticated connection cut to make room
tls_handshake = _nothing  # (mode, result)
proxy_header = _nothing  # (result)
lock_refused = _nothing  # (reason)
login = _nothing  # (method, result, seconds or None)
session_class: type[Pop3Session] = Pop3Session  # MeteredSession once enabled

_state: _Metrics | None = None
_HOOKS = (
    "session_opened",
    "session_closed",
    "connection_accepted",
    "connection_refused",
    "connection_dropped",
    "tls_handshake",
    "proxy_header",
    "lock_refused",
    "login",
)


def login_method(mechanism: str, app_password: bool) -> str:
    """The ``method`` label: the SASL mechanism (USER/PASS is "user"), or "app_password" when the password
    had an app password's form and was checked as one."""
    return "app_password" if app_password else _MECHANISMS.get(mechanism, "user")


def login_result(refused: LoginRefused | None, *, disabled: bool = False) -> str:
    """The ``result`` label of a login: None is "ok"; "disabled" is a right password for an account that may
    not use POP3 (inactive, no mailbox, POP3 off), refused with the same reply as a wrong one."""
    if refused is None:
        return "ok"
    result = _REFUSALS.get(type(refused))
    if result is None:
        result = next((r for cls, r in _REFUSALS.items() if isinstance(refused, cls)), "wrong_password")
    return "disabled" if disabled and result == "wrong_password" else result


# Commands: counted where they cost least -----------------------------------------------------------------
# A RETR of a small message costs the server ~30 µs of CPU, and the budget for metrics is 3 % of that: a
# prometheus-client counter and histogram per command would take five times as much (a lock, and in
# multiprocess mode a write to a mapped file, per value). So a session counts into a tally of plain lists
# that only its own thread writes, and a flusher moves what changed into the library's values once a
# second, at the session's end, and (one process) before every scrape.
VERBS = (*Pop3Session.commands, UNKNOWN_VERB)
_VERB_INDEX = {verb: index for index, verb in enumerate(VERBS)}
_BUCKETS = len(COMMAND_BUCKETS) + 1  # the last one is +Inf
FLUSH_INTERVAL = 1.0  # seconds: how stale a worker's command counts may be in a scrape


class Tally:
    """One session's command counts and times, by verb: histogram buckets (not cumulative) and sums."""

    __slots__ = (
        "buckets",
        "flushed_buckets",
        "flushed_sent",
        "flushed_sums",
        "pending",
        "sent",
        "started",
        "sums",
    )

    def __init__(self) -> None:
        self.buckets = [0] * (len(VERBS) * _BUCKETS)
        self.sums = [0.0] * len(VERBS)
        self.sent = 0  # octets written to the client
        self.pending = -1  # the verb being timed, or -1
        self.started = 0.0
        self.flushed_buckets, self.flushed_sums, self.flushed_sent = list(self.buckets), list(self.sums), 0

    def end(self, now: float) -> None:
        verb, self.pending = self.pending, -1
        seconds = now - self.started
        self.buckets[verb * _BUCKETS + bisect_left(COMMAND_BUCKETS, seconds)] += 1
        self.sums[verb] += seconds

    def batch_sent(self, octets: int) -> None:
        """The handler wrote what the session produced for one read: the last command of it ends now."""
        self.sent += octets
        verb = self.pending
        if verb >= 0:  # end(), inlined: this runs once per command read one at a time
            self.pending = -1
            seconds = perf_counter() - self.started
            self.buckets[verb * _BUCKETS + bisect_left(COMMAND_BUCKETS, seconds)] += 1
            self.sums[verb] += seconds


class MeteredSession(Pop3Session):
    """A ``Pop3Session`` whose commands are counted by verb (refused ones too; a verb the server does not
    have as "unknown") and timed from their dispatch to the next command's, or to the end of writing the
    batch of replies they were in. PASS includes the failed-login delay. The lines of a SASL exchange after
    AUTH are not commands."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tally = Tally()
        if _state is not None:
            _state.add(self.tally)

    def _resolve(self, line: bytes):
        try:
            resolved = _resolve(self, line)
        except CommandError:
            verb = line.partition(b" ")[0].upper().decode("ascii", "replace")
            self._begin(_VERB_INDEX.get(verb, _VERB_INDEX[UNKNOWN_VERB]))
            raise
        # _begin(), inlined: this runs once per command
        tally = self.tally
        now = perf_counter()
        if tally.pending >= 0:  # pipelined: the previous command ends where this one starts
            tally.end(now)
        tally.pending, tally.started = _VERB_INDEX[resolved[0].verb], now
        return resolved

    def _begin(self, verb: int) -> None:
        tally = self.tally
        now = perf_counter()
        if tally.pending >= 0:
            tally.end(now)
        tally.pending, tally.started = verb, now


_resolve = Pop3Session._resolve
perf_counter = time.perf_counter


# Switching on and off ------------------------------------------------------------------------------------
def enable(*, multiprocess: bool = False, directory: str | None = None) -> None:
    """Create the metrics and bind the hooks to them.

    ``multiprocess``: worker processes will add up. The directory is ``directory``, else
    $PROMETHEUS_MULTIPROC_DIR, else a private temporary one (removed by ``disable()``); its ``*.db`` files
    are removed first. It must be called before ``prometheus_client`` is imported in this process: the
    library picks its storage once, at import. With $PROMETHEUS_MULTIPROC_DIR already set, multiprocess
    mode is the only one possible."""
    global _state
    if _state is not None:
        disable()
    own_directory = False
    if os.environ.get(MULTIPROC_ENV) and not directory:
        multiprocess, directory = True, os.environ[MULTIPROC_ENV]
    if multiprocess:
        values = sys.modules.get("prometheus_client.values")
        if values is not None and not values.ValueClass._multiprocess:
            raise MetricsUnavailable(
                "prometheus_client was imported before the multiprocess directory was set; "
                "metrics of worker processes would not add up"
            )
        if not directory:
            directory, own_directory = tempfile.mkdtemp(prefix="popserver-metrics-"), True
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.endswith(".db"):
                os.remove(os.path.join(directory, name))
        os.environ[MULTIPROC_ENV] = directory
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        if own_directory:
            shutil.rmtree(directory, ignore_errors=True)
        raise MetricsUnavailable(
            "--metrics needs the prometheus-client package: pip install 'popserver[metrics]'"
        ) from None
    _state = _Metrics(directory if multiprocess else None, own_directory)
    _state.bind(globals())


def disable() -> None:
    """Back to no-ops: stop serving, detach from the log, remove a private directory."""
    global _state, enabled, session_class
    state, _state = _state, None
    enabled, session_class = False, Pop3Session
    for name in _HOOKS:
        globals()[name] = _nothing
    if state is not None:
        state.close()


def worker_started() -> None:
    """In a worker, right after ``fork()``: the parent's HTTP listener is not the worker's to hold, and the
    flusher thread did not come along (the values start afresh in the worker's own files: the library
    notices the new pid)."""
    if _state is not None:
        _state.after_fork()


def worker_stopping() -> None:
    """In a worker about to exit: what its sessions still open have counted goes into its files."""
    if _state is not None:
        _state.flush()


def process_exited(pid: int) -> None:
    """In the parent, when a worker has been reaped: its live gauges (open sessions) stop counting."""
    if _state is not None and _state.directory is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, _state.directory)


def serve(address: tuple[str, int]) -> MetricsHttpServer:
    """Serve ``/metrics`` on ``address`` from a daemon thread (after ``enable()``); ``.port`` is the port
    bound, ``.stop()`` ends it (``disable()`` does too)."""
    if _state is None:
        raise RuntimeError("metrics.enable() first")
    if _state.http is not None:
        _state.http.stop()
    _state.http = MetricsHttpServer(address, _state.exposition_registry(), before=_state.flush)
    return _state.http


def scrape() -> bytes:
    """The text exposition, as ``/metrics`` serves it (for tests and ``manage.py shell``)."""
    if _state is None:
        raise RuntimeError("metrics are not enabled")
    from prometheus_client import generate_latest

    _state.flush()
    return generate_latest(_state.exposition_registry())


# The metrics ---------------------------------------------------------------------------------------------
class _Metrics:
    def __init__(self, directory: str | None, own_directory: bool):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.directory, self.own_directory = directory, own_directory
        self.http: MetricsHttpServer | None = None
        # Without workers the metrics live in this registry; with them, in the files of every process.
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry if directory is None else None

        def counter(name, text, labels=()):
            return Counter(name, text, labels, registry=registry)

        self.node = Gauge(
            "popserver_node_info",
            "This node's name (POPSERVER_NODE_NAME); always 1.",
            ["node"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.sessions = Gauge(
            "popserver_sessions_open",
            "Connections being served (before and after login).",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.accepted = counter("popserver_connections_accepted", "Connections admitted by the listener.")
        self.refused = counter(
            "popserver_connections_refused",
            "Connections refused: server full, the IP at its cap of unauthenticated connections, not from "
            "a trusted proxy on a PROXY listener, or no thread could be started.",
            ["reason"],
        )
        self.dropped = counter(
            "popserver_connections_dropped",
            "Idle unauthenticated connections cut to make room for a new one.",
        )
        self.sent = counter("popserver_sent_bytes", "Octets written to clients.")
        self.logins = counter(
            "popserver_logins", "Login attempts by method and result.", ["method", "result"]
        )
        self.login_seconds = Histogram(
            "popserver_login_duration_seconds",
            "Time to decide a login (password check, throttle, lock and snapshot), without the failed-login "
            "delay.",
            registry=registry,
            buckets=LOGIN_BUCKETS,
        )
        self.commands = counter("popserver_commands", "POP3 commands by verb.", ["verb"])
        self.command_seconds = Histogram(
            "popserver_command_duration_seconds",
            "Time from a command's dispatch to the next command's, or to the end of writing its replies.",
            ["verb"],
            registry=registry,
            buckets=COMMAND_BUCKETS,
        )
        self.lock_refusals = counter(
            "popserver_lock_refusals",
            "Mailbox locks refused: held by another session at login (in_use), or no longer ours at QUIT "
            "(lost).",
            ["reason"],
        )
        self.database_errors = counter(
            "popserver_database_errors", "Database errors the server met (and logged).", ["error"]
        )
        self.tls = counter(
            "popserver_tls_handshakes", "TLS handshakes by mode and result.", ["mode", "result"]
        )
        self.proxy = counter("popserver_proxy_headers", "PROXY protocol headers read, by result.", ["result"])

        # Every series exists from the start (a rate over a series that appears late misses its first
        # increments), and the hot paths find theirs by index or in a dict.
        self._commands = [self.commands.labels(verb) for verb in VERBS]
        # A tally's buckets go into the histogram's own values (prometheus-client keeps a histogram as one
        # value per bucket and one for the sum): one increment per changed bucket, not one per command.
        histograms = [self.command_seconds.labels(verb) for verb in VERBS]
        self._command_values = [(child._buckets, child._sum) for child in histograms]
        self._refused = {reason: self.refused.labels(reason) for reason in REFUSAL_REASONS}
        self._logins = {
            (method, result): self.logins.labels(method, result)
            for method in LOGIN_METHODS
            for result in LOGIN_RESULTS
        }
        self._lock = {reason: self.lock_refusals.labels(reason) for reason in LOCK_REASONS}
        self._database = {error: self.database_errors.labels(error) for error in DATABASE_ERRORS}
        self._tls = {(m, r): self.tls.labels(m, r) for m in TLS_MODES for r in TLS_RESULTS}
        self._proxy = {result: self.proxy.labels(result) for result in PROXY_RESULTS}
        self.node.labels(node_name()).set(1)
        self.errors = _ErrorObserver(self)
        logging.getLogger("popserver").addHandler(self.errors)
        overload.database_error_observers.append(self.database_unavailable)
        self.reset_tallies()

    def bind(self, module: dict) -> None:
        def login(method: str, result: str, seconds: float | None) -> None:
            self._logins[method, result].inc()
            if seconds is not None:
                self.login_seconds.observe(seconds)

        def session_closed(session) -> None:
            self.sessions.dec()
            tally = getattr(session, "tally", None)
            if tally is not None:
                if tally.pending >= 0:
                    tally.end(time.perf_counter())
                self.retire(tally)

        module.update(
            enabled=True,
            session_class=MeteredSession,
            session_opened=self.sessions.inc,
            session_closed=session_closed,
            connection_accepted=self.accepted.inc,
            connection_refused=lambda reason: self._refused[reason].inc(),
            connection_dropped=self.dropped.inc,
            tls_handshake=lambda mode, result: self._tls[mode, result].inc(),
            proxy_header=lambda result: self._proxy[result].inc(),
            lock_refused=lambda reason: self._lock[reason].inc(),
            login=login,
        )

    # Tallies of live sessions -------------------------------------------------------------------------------
    def reset_tallies(self) -> None:
        """No tallies, and no flusher yet: it starts with the first session of this process, so a process
        that never serves one (the parent of workers, or a worker before its first client) has no thread
        that wakes every second for nothing."""
        self.lock = threading.Lock()
        self.tallies: set[Tally] = set()
        self.stopping = threading.Event()
        self.flusher: threading.Thread | None = None

    def _flush_every_second(self) -> None:
        stopping = self.stopping
        while not stopping.wait(FLUSH_INTERVAL):
            try:
                self.flush()
            except Exception:  # never let the flusher die: the next round tries again
                logger.exception("could not flush the command metrics")

    def add(self, tally: Tally) -> None:
        with self.lock:
            self.tallies.add(tally)
            if self.flusher is None and not self.stopping.is_set():
                self.flusher = threading.Thread(
                    target=self._flush_every_second, daemon=True, name="metrics flusher"
                )
                self.flusher.start()

    def retire(self, tally: Tally) -> None:
        with self.lock:
            self.tallies.discard(tally)
            self._flush(tally)

    def flush(self) -> None:
        with self.lock:
            for tally in list(self.tallies):
                self._flush(tally)

    def _flush(self, tally: Tally) -> None:
        """What ``tally`` counted since its last flush, into the library's values (its thread may go on
        counting meanwhile: what it adds now goes at the next flush)."""
        buckets, sums, sent = tally.buckets[:], tally.sums[:], tally.sent
        if sent != tally.flushed_sent:
            self.sent.inc(sent - tally.flushed_sent)
            tally.flushed_sent = sent
        flushed = tally.flushed_buckets
        if buckets == flushed:
            return
        for verb in range(len(VERBS)):
            start = verb * _BUCKETS
            if buckets[start : start + _BUCKETS] == flushed[start : start + _BUCKETS]:
                continue
            bucket_values, sum_value = self._command_values[verb]
            commands = 0
            for i in range(_BUCKETS):
                added = buckets[start + i] - flushed[start + i]
                if added:
                    bucket_values[i].inc(added)
                    commands += added
            self._commands[verb].inc(commands)
            sum_value.inc(sums[verb] - tally.flushed_sums[verb])
        tally.flushed_buckets, tally.flushed_sums = buckets, sums

    def after_fork(self) -> None:
        """In a forked worker: a fresh lock (the parent's may have been held at the fork), no tallies and
        no flusher of the parent's, and not the parent's HTTP socket."""
        self.reset_tallies()
        if self.http is not None:
            self.http.forget()
            self.http = None

    def database_error(self, name: str) -> None:
        self._database.get(name, self._database["DatabaseError"]).inc()

    def database_unavailable(self, exc: BaseException) -> None:
        """One of the errors that load explains (``overload.database_unavailable``: logged a line per
        interval, so not seen by the log observer)."""
        self.database_error(type(exc).__name__)

    def exposition_registry(self):
        if self.directory is None:
            return self.registry
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.directory)
        return registry

    def close(self) -> None:
        self.stopping.set()
        self.flush()
        logging.getLogger("popserver").removeHandler(self.errors)
        with contextlib.suppress(ValueError):
            overload.database_error_observers.remove(self.database_unavailable)
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.own_directory and self.directory:
            from prometheus_client import values

            getattr(values, "close_all_multiprocess_files", lambda: None)()  # 0.20+: unmap before removing
            shutil.rmtree(self.directory, ignore_errors=True)


class _ErrorObserver(logging.Handler):
    """Counts the database errors and lost locks in what the server logs at ERROR with an exception."""

    def __init__(self, metrics: _Metrics):
        super().__init__(level=logging.ERROR)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        from django.db import DatabaseError

        exc = record.exc_info[1] if record.exc_info else None
        for _ in range(4):  # the exception and what caused it (an error raised while handling another)
            if exc is None:
                return
            if isinstance(exc, DatabaseError):
                self.metrics.database_error(type(exc).__name__)
                return
            if isinstance(exc, CommitFailed) and "lock" in str(exc):
                self.metrics._lock["lost"].inc()
                return
            # What caused it; not what it replaced with "raise ... from None" (counted where it was seen).
            exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__


# The HTTP side -------------------------------------------------------------------------------------------
class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the stdlib's signature
        pass  # a scrape every 15 s would fill the log


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class MetricsHttpServer:
    """``GET /metrics`` in Prometheus text format (OpenMetrics if asked; gzip if accepted); 404 elsewhere."""

    def __init__(self, address: tuple[str, int], registry, before=lambda: None):
        """``before()`` runs before each scrape (it flushes this process's session tallies)."""
        from prometheus_client import make_wsgi_app

        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
                before()
                return metrics_app(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"Not found: metrics are at /metrics\n"]

        host, port = address
        server_class = _ThreadingWSGIServer
        if ":" in host:
            server_class = type(
                "_ThreadingWSGIServer6", (_ThreadingWSGIServer,), {"address_family": socket.AF_INET6}
            )
        self.httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.port = self.httpd.server_address[1]
        self.display_address = f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever,
            kwargs={"poll_interval": 0.5},
            daemon=True,
            name=f"metrics {self.display_address}",
        )
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def forget(self) -> None:
        """In a forked worker: close the inherited listening socket (its serving thread did not come along)."""
        self.httpd.socket.close()
