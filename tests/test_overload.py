"""Overload and abuse, bounded and quiet: the budget of database connections, the pre-login command budget,
deadlines on blocked writes, TLS handshakes dropped midway, the shutdown notice, rate-limited refusal logs."""

import logging
import select
import socket
import threading
import time

import pytest
from django.core.checks import run_checks
from django.db import connection
from django.test import override_settings

from popserver.mailin.delivery import deliver
from popserver.overload import SummaryLog
from popserver.protocol.session import Pop3Session
from popserver.server.tls import TlsContextHolder
from popserver.storage.gate import using_database
from tests.waiting import wait_for

pytestmark = pytest.mark.live


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def login(server, user: str = "alice", password: str = "secret") -> socket.socket:
    sock = server.socket()
    assert read_line(sock).startswith(b"+OK")
    sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
    assert read_line(sock) == b"+OK\r\n"
    assert read_line(sock) == b"+OK Logged in.\r\n"
    return sock


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    deliver("alice", b"Subject: one\r\n\r\nhello\r\n")
    return mailbox


# The summary log -------------------------------------------------------------------------------------------
class FakeClock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_summary_log_says_the_first_at_once_then_one_line_per_interval_with_a_count(caplog):
    clock = FakeClock()
    log = SummaryLog(logging.getLogger("popserver.overload"), interval=10, clock=clock, timers=False)
    caplog.set_level(logging.INFO, logger="popserver.overload")
    for _ in range(50):
        log.note("no-room", "refusing connections: no room")
        clock.now += 0.1
    log.note("database", "database unavailable")
    assert [r.getMessage() for r in caplog.records] == [
        "refusing connections: no room",
        "database unavailable",
    ]
    clock.now += 10
    log.note("no-room", "refusing connections: no room")
    assert caplog.records[-1].getMessage() == "refusing connections: no room (50 more in the last 15 s)"
    log.flush()  # nothing left to say
    assert len(caplog.records) == 3
    clock.now += 60  # quiet for an interval: the next one is said at once again
    log.note("no-room", "refusing connections: no room")
    assert caplog.records[-1].getMessage() == "refusing connections: no room"


def test_a_burst_ends_with_its_count_without_waiting_for_another_event(caplog):
    caplog.set_level(logging.INFO, logger="popserver.overload")
    log = SummaryLog(logging.getLogger("popserver.overload"), interval=0.2)
    for _ in range(5):
        log.note("no-room", "refusing")
    wait_for(lambda: len(caplog.records) == 2)
    assert caplog.records[-1].getMessage().startswith("refusing (4 more in the last")


# The budget of database connections ------------------------------------------------------------------------
@override_settings(POPSERVER_DB_CONNECTIONS=2)
def test_many_logins_at_once_stay_within_the_budget(pop3_server, make_mailbox):
    for n in range(12):
        make_mailbox(f"user{n}", "secret")
    errors = []

    def session(n: int) -> None:
        try:
            sock = login(pop3_server, f"user{n}")
            sock.sendall(b"STAT\r\nQUIT\r\n")
            assert read_line(sock).startswith(b"+OK 0 0")
            assert read_line(sock) == b"+OK Logging out.\r\n"
            sock.close()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=session, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert 1 <= pop3_server.server.gate.peak <= 2


@override_settings(POPSERVER_DB_CONNECTIONS=1, POPSERVER_DB_CONNECTION_WAIT=0.3)
def test_no_connection_within_the_wait_is_sys_temp_once_and_the_session_goes_on(pop3_server, alice, caplog):
    caplog.set_level(logging.INFO, logger="popserver")
    gate = pop3_server.server.gate
    held, release = threading.Event(), threading.Event()

    def hold_the_only_connection() -> None:
        with gate.budgeted(), using_database():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_only_connection)
    holder.start()
    held.wait(10)
    try:
        sock = pop3_server.socket()
        read_line(sock)
        for _ in range(2):
            sock.sendall(b"USER alice\r\nPASS secret\r\n")
            assert read_line(sock) == b"+OK\r\n"
            assert (
                read_line(sock) == b"-ERR [SYS/TEMP] Temporary authentication failure, try again later.\r\n"
            )
    finally:
        release.set()
        holder.join(10)
    sock.sendall(b"USER alice\r\nPASS secret\r\nSTAT\r\n")  # the same session, now the connection is free
    assert read_line(sock) == b"+OK\r\n"
    assert read_line(sock) == b"+OK Logged in.\r\n"
    assert read_line(sock).startswith(b"+OK 1 ")
    sock.close()
    budget_lines = [r for r in caplog.records if "no database connection came free" in r.getMessage()]
    assert len(budget_lines) == 1 and budget_lines[0].name == "popserver.overload"
    assert not [r for r in caplog.records if r.exc_info]


@override_settings(POPSERVER_DB_CONNECTIONS=1, POPSERVER_DB_CONNECTION_WAIT=0.5)
def test_a_session_waiting_for_its_client_gives_its_connection_to_one_that_waits(
    pop3_server, alice, make_mailbox
):
    """The idle session keeps its connection for up to a second, but not while another session waits."""
    make_mailbox("bob", "secret")
    idle = login(pop3_server, "alice")  # it keeps its connection for a quick next command
    started = time.monotonic()
    other = login(pop3_server, "bob")  # needs it within 0.5 s: only the idle session's giving it back helps
    assert time.monotonic() - started < 5
    idle.sendall(b"RETR 1\r\n")  # and the idle one gets it again when it needs it
    assert read_line(idle).startswith(b"+OK")
    other.close()
    idle.close()


@override_settings(
    POPSERVER_DB_CONNECTIONS=1, POPSERVER_DB_CONNECTION_WAIT=2, POPSERVER_BODY_CHUNK_SIZE=256 * 1024
)
def test_a_client_that_never_reads_holds_no_connection(pop3_server, make_mailbox):
    make_mailbox("bob", "secret")
    deliver("bob", b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20000)  # ~20 MB
    make_mailbox("alice", "secret")
    stuck = login(pop3_server, "bob")
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"RETR 1\r\n")
    wait_for(lambda: pop3_server.server.gate.in_use == 0)  # blocked writing, without a connection
    other = login(pop3_server, "alice")
    other.close()
    stuck.close()


# Pre-login limits -------------------------------------------------------------------------------------------
def test_before_login_a_client_gets_a_budget_of_commands(pop3_server, alice):
    sock = pop3_server.socket()
    read_line(sock)
    sock.sendall(b"CAPA\r\n" * 60)
    replies = read_all(sock)
    assert replies.count(b"+OK\r\n") == Pop3Session.max_commands_before_login
    assert replies.endswith(b".\r\n-ERR Too many commands before login.\r\n")
    assert login(pop3_server)  # others are served


@override_settings(POPSERVER_LOGIN_TIMEOUT=1)
def test_the_login_timeout_bounds_a_write_to_a_client_that_never_reads(pop3_server, alice, monkeypatch):
    monkeypatch.setattr(Pop3Session, "max_commands_before_login", 10**9)  # to fill the buffers before login
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", pop3_server.port))
    started = time.monotonic()
    sock.setblocking(False)
    try:
        while time.monotonic() - started < 10 and select.select([], [sock], [], 0.5)[1]:
            sock.send(b"CAPA\r\n" * 1000)  # never reads the replies
    except OSError:
        pass
    wait_for(lambda: len(pop3_server.server.registry) == 0, timeout=10)
    assert time.monotonic() - started < 8
    sock.close()


# TLS handshakes dropped midway ------------------------------------------------------------------------------
@pytest.fixture
def tls_server(pop3_server_factory, tmp_path):
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    return pop3_server_factory(tls=TlsContextHolder(str(certfile), str(keyfile)), implicit_tls=True)


CLIENT_HELLO_START = bytes.fromhex("160301020001")  # a record header and the start of a ClientHello


def session_end_lines(caplog, peer_port: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if f":{peer_port} " in r.getMessage() + " "]


def test_a_handshake_dropped_by_the_peer_ends_with_one_info_line(tls_server, caplog):
    caplog.set_level(logging.INFO, logger="popserver")
    sock = socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10)
    port = sock.getsockname()[1]
    sock.sendall(CLIENT_HELLO_START)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    sock.close()
    lines = wait_for(lambda: session_end_lines(caplog, port))
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert lines[0].getMessage().startswith("Disconnected: TLS handshake failed")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


@override_settings(POPSERVER_MAX_SESSIONS=1)
def test_a_handshake_dropped_to_make_room_ends_with_one_info_line(tls_server, alice, caplog):
    caplog.set_level(logging.INFO, logger="popserver")
    first = socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10)
    first.sendall(CLIENT_HELLO_START)  # in its handshake, idle
    wait_for(lambda: len(tls_server.server.registry) == 1)
    newcomer = tls_server.socket()  # the plain listener: the server is full, the handshake makes room
    assert read_line(newcomer).startswith(b"+OK")
    port = first.getsockname()[1]
    try:
        assert first.recv(100) == b""
    except ConnectionResetError:  # closed with its ClientHello unread: a reset, also a clean end
        pass
    lines = wait_for(lambda: session_end_lines(caplog, port))
    # "TLS handshake failed", or "Dropped to make room" when the cut came while the socket was being wrapped
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert lines[0].getMessage().startswith(("Disconnected: TLS handshake failed", "Disconnected: Dropped"))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    first.close()
    newcomer.close()


# Stopping --------------------------------------------------------------------------------------------------
def test_a_stop_tells_each_session_why(pop3_server, alice):
    idle = pop3_server.socket()
    read_line(idle)
    logged_in = login(pop3_server)
    pop3_server.stop()
    for sock in (idle, logged_in):
        assert read_all(sock) == b"-ERR [SYS/TEMP] Server shutting down.\r\n"


# The check --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite has no connection limit")
def test_a_budget_over_the_databases_max_connections_is_a_warning(db, settings):
    settings.POPSERVER_DB_CONNECTIONS = 100_000
    ids = [m.id for m in run_checks(databases=["default"])]
    assert "popserver.W006" in ids
    settings.POPSERVER_DB_CONNECTIONS = 5
    assert "popserver.W006" not in [m.id for m in run_checks(databases=["default"])]


@pytest.mark.skipif(connection.vendor == "sqlite", reason="SQLite has no connection limit")
@pytest.mark.parametrize("command", ["runpop3", "runlmtp"])
def test_each_server_warns_at_its_start_when_its_budget_exceeds_max_connections(
    command, runpop3, runlmtp_process
):
    start = runpop3 if command == "runpop3" else runlmtp_process
    server = start(POPSERVER_DB_CONNECTIONS="100000")
    warning = wait_for(lambda: [line for line in server.stderr_lines if "popserver.W006" in line])
    assert "POPSERVER_DB_CONNECTIONS is 100000" in warning[0]
    assert server.terminate() == 0


def test_the_budget_must_be_a_positive_number(settings):
    settings.POPSERVER_DB_CONNECTIONS = 0
    assert "popserver.E001" in [m.id for m in run_checks()]
