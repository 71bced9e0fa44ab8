"""Shared fixtures. Test modules keep their own specialised fixtures beside their tests."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"


def corpus_files() -> list[Path]:
    """The shared corpus (../shared/corpus), or a copy under tests/corpus when that is absent."""
    base = CORPUS if CORPUS.is_dir() else REPO / "tests" / "corpus"
    return sorted(base.glob("*.eml"))


# name -> (octets on disk, LIST size), from the corpus README's table.
CORPUS_SIZES = {
    "01-plain-crlf.eml": (241, 241),
    "02-dot-lines.eml": (264, 264),
    "03-bare-lf.eml": (232, 243),
    "04-no-final-newline.eml": (250, 250),
    "05-8bit-utf8.eml": (316, 316),
    "06-latin1-bytes.eml": (309, 309),
    "07-long-line.eml": (5221, 5221),
    "08-headers-only.eml": (216, 216),
    "09-empty-body.eml": (214, 214),
    "10-mixed-endings.eml": (237, 238),
    "11-multipart-attachment.eml": (41382, 41382),
    "12-from-line.eml": (325, 276),
    "13-nul-byte.eml": (214, 214),
    "14-top-lines.eml": (471, 471),
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ``manage.py`` subprocess that must see this test's database."""
    from django.db import connection

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["POPSERVER_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def manage_py_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "manage.py"), *args]


STORAGE_STORE = "popserver.storage.bodies.DjangoStorageBodyStore"


@pytest.fixture(params=["database", "storage"])
def body_store(request, settings, tmp_path):
    """Runs a test with each body store: the database's chunks, and objects in a Django storage (a
    FileSystemStorage in a temporary folder; tests/test_stored_bodies.py adds S3). Returns its name."""
    if request.param == "storage":
        settings.POPSERVER_BODY_STORE = STORAGE_STORE
        settings.STORAGES = {
            **settings.STORAGES,
            "popserver": {
                "BACKEND": "django.core.files.storage.FileSystemStorage",
                "OPTIONS": {"location": str(tmp_path / "bodies")},
            },
        }
    return request.param


def bodies_held(mailbox=None) -> int:
    """How many message bodies the database holds (of one mailbox): chunked messages plus stored ones, each
    stored body counted once per message that refers to it."""
    from popserver.models import Message, MessageChunk

    chunks = (
        MessageChunk.objects.all()
        if mailbox is None
        else MessageChunk.objects.filter(message__mailbox=mailbox)
    )
    messages = Message.objects.filter(stored_body__isnull=False)
    if mailbox is not None:
        messages = messages.filter(mailbox=mailbox)
    return chunks.values("message").distinct().count() + messages.count()


# For tests of what only the database store does (its chunk rows and queries).
database_store_only = pytest.mark.parametrize("body_store", ["database"], indirect=True)


def failing_insert(sender, **kwargs):
    """A ``pre_save`` receiver that makes a real database error inside the insert's transaction (on
    PostgreSQL it spoils the transaction): what a savepoint around the insert must contain."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM popserver_no_such_table")


def failing_insert_losing_its_savepoint(sender, **kwargs):
    """``failing_insert`` after the savepoint around the insert is gone (as after an InnoDB deadlock, which
    rolls back the whole transaction and its savepoints): rolling back to it fails too, with a real database
    error, and Django marks the enclosing transaction for rollback."""
    from django.db import connection

    if connection.savepoint_ids:  # outside a transaction, only the insert fails
        with connection.cursor() as cursor:
            cursor.execute(connection.ops.savepoint_commit_sql(connection.savepoint_ids[-1]))
    failing_insert(sender, **kwargs)


def raising_after_losing_its_savepoint(sender, **kwargs):
    """Like ``failing_insert_losing_its_savepoint``, but what escapes is not a database error."""
    from django.db import DatabaseError

    try:
        failing_insert_losing_its_savepoint(sender, **kwargs)
    except DatabaseError:
        raise RuntimeError("a receiver's bug") from None


@pytest.fixture
def make_mailbox(db):
    """make_mailbox(username, password="secret", email=None) -> Mailbox (creates the user too)."""
    from django.contrib.auth import get_user_model

    from popserver.models import Address, Mailbox

    def make(username: str, password: str = "secret", email: str | None = None, **mailbox_fields):
        User = get_user_model()
        user = User.objects.create_user(**{User.USERNAME_FIELD: username}, password=password)
        mailbox = Mailbox.objects.create(user=user, **mailbox_fields)
        if email:
            Address.objects.create(mailbox=mailbox, address=email)
        return mailbox

    return make


# Live servers ----------------------------------------------------------------------------------------------
class LiveServer:
    """A ``Pop3Server`` on 127.0.0.1 and a free port, serving from a thread of this test process."""

    def __init__(self, tls=None, implicit_tls: bool = False, is_trusted=None, proxy_protocol: bool = False):
        """``tls``: a TlsContextHolder (STLS, plus an implicit-TLS listener at ``tls_port`` if
        ``implicit_tls``); ``is_trusted(ip)``: play a non-local peer while bound to 127.0.0.1;
        ``proxy_protocol``: every listener expects a PROXY header."""
        import threading

        from popserver.logins.authenticator import is_trusted_peer
        from popserver.server.listener import start_servers

        self.stop_event = threading.Event()
        servers = start_servers(
            [("127.0.0.1", 0)],
            self.stop_event,
            tls=tls,
            implicit_tls_addresses=[("127.0.0.1", 0)] if implicit_tls else [],
            is_trusted=is_trusted or is_trusted_peer,
            proxy_protocol=proxy_protocol,
        )
        self.server, self.servers = servers[0], servers
        self.host, self.port = "127.0.0.1", self.server.port
        self.tls_port = servers[1].port if implicit_tls else None

    def poplib(self, timeout: float = 10):
        import poplib

        return poplib.POP3(self.host, self.port, timeout=timeout)

    def socket(self, timeout: float = 10):
        import socket

        return socket.create_connection((self.host, self.port), timeout=timeout)

    def stop(self) -> None:
        from popserver.server.listener import stop_servers

        stop_servers(self.servers, grace=10)


@pytest.fixture
def pop3_server_factory(transactional_db):
    """pop3_server_factory(tls=..., implicit_tls=..., is_trusted=...) -> a started LiveServer, stopped at
    teardown (transactional database: the server's threads do not share the test's transaction)."""
    yield from live_servers(LiveServer)


def live_servers(kind):
    """A fixture's body: yield ``start(*args, **kwargs)`` making in-thread servers of ``kind``, and stop them all
    (and the database connections their threads left) at teardown."""
    started: list = []

    def start(*args, **kwargs):
        started.append(kind(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()
    from django.db import connections

    connections.close_all()


@pytest.fixture
def pop3_server(pop3_server_factory):
    """A live in-thread POP3 server on 127.0.0.1 and a free port."""
    return pop3_server_factory()


@pytest.fixture
def lmtp_server(transactional_db):
    """lmtp_server(address) -> a started in-thread LMTP server (runlmtp's) delivering into the mailboxes, on
    ("127.0.0.1", 0) or a UNIX socket path (mode 666); stopped at teardown. For the tests with a real MTA."""
    import threading

    from popserver.mailin.lmtp import MailboxDeliveryHandler
    from popserver.server.listener import stop_servers
    from popserver.server.lmtp import start_lmtp_servers

    started = []

    def start(address):
        stop = threading.Event()
        started.extend(
            start_lmtp_servers([address], stop, handler_factory=MailboxDeliveryHandler, socket_mode=0o666)
        )
        return started[-1]

    yield start
    stop_servers(started, grace=10)


class Runpop3Process:
    """``manage.py runpop3 127.0.0.1:0`` as a subprocess on the test database; the port is read from its
    stdout. Stopped (SIGTERM, then SIGKILL) by the fixture, before the database is flushed."""

    command, announced = "runpop3", r"POP3 on 127\.0\.0\.1:(\d+)"

    def __init__(self, *args: str, listen: str = "127.0.0.1:0", **env: str):
        import re
        import subprocess
        import threading

        self.proc = subprocess.Popen(
            manage_py_command(self.command, listen, *args),
            env=subprocess_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        self.port = 0
        self.tls_port = self.metrics_port = None
        self.first_line = ""
        for line in self.proc.stdout:  # blocks until the first line; the fixture's timeout bounds it
            self.first_line = line
            match = re.search(self.announced, line)
            if match:
                self.port = int(match.group(1) or 0) if match.lastindex else -1  # -1: a UNIX socket
                if tls := re.search(r"POP3S on 127\.0\.0\.1:(\d+)", line):
                    self.tls_port = int(tls.group(1))
                if metrics := re.search(r"metrics on http://127\.0\.0\.1:(\d+)/", line):
                    self.metrics_port = int(metrics.group(1))
                break
        if not self.port:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"{self.command} did not start:\n" + "".join(self.stderr_lines))
        self.host = "127.0.0.1"

    def _read_stderr(self) -> None:
        try:
            for line in self.proc.stderr:
                self.stderr_lines.append(line)
        except (ValueError, OSError):  # the fixture closed the pipe at teardown
            pass

    def poplib(self, timeout: float = 10):
        import poplib

        return poplib.POP3(self.host, self.port, timeout=timeout)

    def socket(self, timeout: float = 10):
        import socket

        return socket.create_connection((self.host, self.port), timeout=timeout)

    def terminate(self, timeout: float = 15) -> int:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=15)


class RunlmtpProcess(Runpop3Process):
    """``manage.py runlmtp`` on 127.0.0.1:0 (or ``listen="unix:PATH"``), as ``Runpop3Process``."""

    command, announced = "runlmtp", r"LMTP on (?:127\.0\.0\.1:(\d+)|unix:)"

    def lmtp(self, path: str | None = None, timeout: float = 10):
        """An ``smtplib.LMTP`` client after LHLO, on the TCP port or on the UNIX socket ``path``."""
        import smtplib

        client = (
            smtplib.LMTP(path, timeout=timeout)
            if path
            else smtplib.LMTP(self.host, self.port, timeout=timeout)
        )
        client.ehlo()
        return client


def _server_processes(kind):
    started: list[Runpop3Process] = []

    def start(*args: str, **env: str) -> Runpop3Process:
        process = kind(*args, **env)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.kill()
        for stream in (process.proc.stdout, process.proc.stderr):
            stream.close()


@pytest.fixture
def runpop3(transactional_db):
    """runpop3(*extra_args, **env) -> a started ``Runpop3Process``; every one is stopped at teardown."""
    yield from _server_processes(Runpop3Process)


@pytest.fixture
def runlmtp_process(transactional_db):
    """runlmtp_process(*extra_args, listen=..., **env) -> a started ``RunlmtpProcess``, stopped at teardown."""
    yield from _server_processes(RunlmtpProcess)


# Skips ------------------------------------------------------------------------------------------------------
# Skips by design: a test that is about one database only. Every other skip means something this machine
# lacks (a tool, IPv6, Redis, an unprivileged user): with POPSERVER_NO_ENV_SKIPS=1 (.ci/run) it is a failure,
# so CI never mistakes a skip for a pass. scripts/test.sh prints every skip's reason at its end.
SKIPS_BY_DESIGN = (
    "PostgreSQL and MariaDB only",
    "MariaDB's default collation",
    "SQLite has no connection limit",
    "PostgreSQL's connection count",
    "SQLite's writer lock",
    "the one-statement delivery is PostgreSQL's",
    "prepared statements: PostgreSQL only",
    "the one-statement login is PostgreSQL's",
)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or os.environ.get("POPSERVER_NO_ENV_SKIPS") != "1" or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if not any(allowed in reason for allowed in SKIPS_BY_DESIGN):
        report.outcome = "failed"
        report.longrepr = f"skipped where CI needs it to run (POPSERVER_NO_ENV_SKIPS=1): {reason}"


def pytest_terminal_summary(terminalreporter):
    """Append each skip to POPSERVER_SKIP_LOG (set by scripts/test.sh, which prints them all at its end)."""
    path = os.environ.get("POPSERVER_SKIP_LOG")
    if not path:
        return
    database = os.environ.get("DATABASE_URL", "sqlite").split(":", 1)[0]
    with open(path, "a", encoding="utf-8") as log:
        for report in terminalreporter.stats.get("skipped", []):
            log.write(f"{database}\t{report.nodeid}\t{_skip_reason(report)}\n")
