"""LMTP over the wire: ``smtplib.LMTP`` and raw sockets against a live server on TCP and on a UNIX socket,
delivering into real mailboxes (RFC 2033: one reply per recipient after DATA)."""

import logging
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time

import pytest
from django.db import connection
from django.test import override_settings

from popserver.delivery import deliver
from popserver.mailin.lmtp import MailboxDeliveryHandler
from popserver.models import Address, DeliveryCount, Message
from popserver.server.listener import stop_servers
from popserver.server.lmtp import start_lmtp_servers
from popserver.server.tls import TlsContextHolder
from popserver.storage.bodies import DatabaseBodyStore, get_body_store

from .conftest import live_servers, manage_py_command, subprocess_env
from .waiting import wait_for

pytestmark = pytest.mark.live

MESSAGE = (
    b"From: Sender <sender@example.net>\r\nSubject: hello\r\nMessage-ID: <m1@example.net>\r\n\r\nbody\r\n"
)


class LiveLmtp:
    """An LMTP server in a thread of this test process, on 127.0.0.1:0 or on a UNIX socket."""

    def __init__(self, address=("127.0.0.1", 0), **options):
        self.stop_event = threading.Event()
        self.servers = start_lmtp_servers(
            [address], self.stop_event, handler_factory=MailboxDeliveryHandler, **options
        )
        self.server = self.servers[0]
        self.unix_path = address if isinstance(address, str) else None

    def client(self, timeout: float = 10) -> smtplib.LMTP:
        if self.unix_path:
            client = smtplib.LMTP(self.unix_path, timeout=timeout)
        else:
            client = smtplib.LMTP("127.0.0.1", self.server.port, timeout=timeout)
        client.ehlo_or_helo_if_needed()  # LHLO
        return client

    def socket(self, timeout: float = 10) -> socket.socket:
        if self.unix_path:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(self.unix_path)
            return sock
        return socket.create_connection(("127.0.0.1", self.server.port), timeout=timeout)

    def wait_idle(self, timeout: float = 10) -> bool:
        return self.server.registry.wait_empty(timeout)

    def stop(self) -> None:
        stop_servers(self.servers, grace=10)


@pytest.fixture
def lmtp_factory(transactional_db):
    yield from live_servers(LiveLmtp)


@pytest.fixture
def lmtp(lmtp_factory):
    return lmtp_factory()


@pytest.fixture
def short_dir():
    """A short directory for UNIX sockets (their paths are limited to about 100 octets)."""
    path = tempfile.mkdtemp(prefix="lmtp", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stored(username: str) -> list[bytes]:
    store = get_body_store()
    return [
        b"".join(store.read_chunks(m.pk))
        # the mail delivered, not the server's own quota warnings
        for m in Message.objects.filter(mailbox__user__username=username, server_notice=False)
    ]


def read_replies(sock: socket.socket, count: int, deadline: float = 10) -> list[bytes]:
    """``count`` final reply lines (multi-line replies count once), read with a bounded deadline."""
    buffer = b""
    end = time.monotonic() + deadline
    while True:
        lines = buffer.split(b"\r\n")[:-1]
        finals = [line for line in lines if len(line) < 4 or line[3:4] != b"-"]
        if len(finals) >= count:
            return finals
        assert time.monotonic() < end, f"only {buffer!r}"
        sock.settimeout(max(0.01, end - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {buffer!r}"
        buffer += chunk


# Delivery ---------------------------------------------------------------------------------------------------
def test_delivers_over_tcp_with_return_path_and_delivered_to(lmtp, make_mailbox):
    make_mailbox("alice", email="alice@example.org")
    with lmtp.client() as client:
        assert client.sendmail("sender@example.net", ["Alice@Example.org"], MESSAGE) == {}
    assert stored("alice") == [
        b"Return-Path: <sender@example.net>\r\nDelivered-To: Alice@Example.org\r\n" + MESSAGE
    ]


def test_delivers_over_a_unix_socket_with_its_mode(lmtp_factory, make_mailbox, short_dir):
    make_mailbox("alice", email="alice@example.org")
    path = os.path.join(short_dir, "lmtp.sock")
    server = lmtp_factory(path, socket_mode=0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with server.client() as client:
        assert client.sendmail("", ["alice@example.org"], MESSAGE) == {}
    assert stored("alice") == [b"Return-Path: <>\r\nDelivered-To: alice@example.org\r\n" + MESSAGE]
    server.stop()
    assert not os.path.exists(path)


def test_multi_recipient_mix_gets_a_reply_per_recipient(lmtp, make_mailbox, caplog):
    """Unknown, switched off, full at RCPT, filling up at DATA and good recipients in one transaction: each
    gets its own reply (RFC 2033 s.4.2) and only the good ones get the message."""
    make_mailbox("alice", email="alice@example.org")
    make_mailbox("dave", email="dave@example.org")
    make_mailbox("off", email="off@example.org", pop3_enabled=False)
    make_mailbox("full", email="full@example.org", quota_messages=1)
    deliver("full", b"Subject: old\r\n\r\nx\r\n")
    make_mailbox("tight", email="tight@example.org", quota_bytes=len(MESSAGE) + 20)  # Return-Path breaks it
    with lmtp.client() as client:
        assert client.mail("sender@example.net") == (250, b"2.1.0 OK")
        replies = {
            address: client.rcpt(address)
            for address in [
                "alice@example.org",
                "nobody@example.org",
                "off@example.org",
                "full@example.org",
                "tight@example.org",
                "dave+lists@example.org",
            ]
        }
        assert replies["alice@example.org"] == (250, b"2.1.5 OK")
        assert replies["nobody@example.org"] == (
            550,
            b"5.1.1 <nobody@example.org> User doesn't exist: nobody@example.org",
        )
        assert replies["off@example.org"][0] == 550  # POP3 switched off: unknown to the outside
        assert replies["full@example.org"] == (
            452,
            b"4.2.2 <full@example.org> Quota exceeded (mailbox for user is full)",
        )
        assert replies["tight@example.org"] == (250, b"2.1.5 OK")  # room for 1 octet at RCPT
        assert replies["dave+lists@example.org"] == (250, b"2.1.5 OK")
        # smtplib reads the first reply after DATA; the others are read here (PITFALLS).
        first = client.data(MESSAGE)
        rest = [client.getreply() for _ in range(2)]
    assert [first, *rest] == [
        (250, b"2.0.0 <alice@example.org> Saved"),
        (452, b"4.2.2 <tight@example.org> Quota exceeded (mailbox for user is full)"),
        (250, b"2.0.0 <dave+lists@example.org> Saved"),
    ]
    # Several recipients: no Delivered-To (Dovecot's rule), so every copy is the same bytes.
    assert stored("alice") == [b"Return-Path: <sender@example.net>\r\n" + MESSAGE]
    assert stored("dave") == [b"Return-Path: <sender@example.net>\r\n" + MESSAGE]
    assert stored("tight") == [] and stored("off") == [] and len(stored("full")) == 1
    saved = [r.getMessage() for r in caplog.records if "saved mail" in r.getMessage()]
    assert len(saved) == 2 and "msgid=<m1@example.net>" in saved[0]
    # The admin's count, written once for the transaction: deliver's message and the two copies, not the
    # copy whose savepoint rolled back.
    assert sum(DeliveryCount.objects.values_list("messages", flat=True)) == 3


def test_one_recipient_is_counted_in_its_own_transaction(lmtp, make_mailbox):
    """One copy has no savepoint and its count is written in its transaction (the hour's row created after
    the commit when it has none yet); a copy refused at DATA rolls back, counts nothing, and the connection
    goes on."""
    make_mailbox("alice", email="alice@example.org")
    make_mailbox("tight", email="tight@example.org", quota_bytes=len(MESSAGE) + 20)  # the trace breaks it
    with lmtp.client() as client:
        for address, expected in [
            ("alice@example.org", 250),  # the hour's first delivery: no row yet
            ("tight@example.org", 452),  # room for 1 octet at RCPT, not for the message at DATA
            ("alice@example.org", 250),  # the row is there: updated in the delivery's transaction
        ]:
            assert client.mail("s@example.net")[0] == 250
            assert client.rcpt(address)[0] == 250
            assert client.data(MESSAGE)[0] == expected
    assert stored("tight") == []
    kept = stored("alice")
    assert len(kept) == 2
    counted = DeliveryCount.objects.values_list("messages", "octets")
    assert [sum(column) for column in zip(*counted, strict=True)] == [2, sum(map(len, kept))]


def test_login_name_and_alias_resolve_as_deliver_does(lmtp, make_mailbox):
    mailbox = make_mailbox("Carol")
    Address.objects.create(mailbox=mailbox, address="c.alias@example.org")
    with lmtp.client() as client:
        client.mail("s@example.net")
        assert client.rcpt("carol")[0] == 250
        assert client.rcpt("C.Alias+x@EXAMPLE.org")[0] == 250
        first = client.data(MESSAGE)
        second = client.getreply()
    assert first[0] == second[0] == 250
    assert stored("Carol") == [b"Return-Path: <s@example.net>\r\n" + MESSAGE] * 2  # one copy per RCPT
    with lmtp.client() as client:  # one recipient: Delivered-To names it as given
        client.sendmail("s@example.net", ["C.Alias+x@EXAMPLE.org"], MESSAGE)
    assert stored("Carol")[2].split(b"\r\n")[1] == b"Delivered-To: C.Alias+x@EXAMPLE.org"


def test_trace_fields_can_be_switched_off(lmtp, make_mailbox):
    make_mailbox("alice", email="alice@example.org")
    with override_settings(POPSERVER_LMTP_ADD_RETURN_PATH=False), lmtp.client() as client:
        client.sendmail("s@example.net", ["alice@example.org"], MESSAGE)
    with override_settings(POPSERVER_LMTP_ADD_DELIVERED_TO=False), lmtp.client() as client:
        client.sendmail("s@example.net", ["alice@example.org"], MESSAGE)
    assert stored("alice") == [
        b"Delivered-To: alice@example.org\r\n" + MESSAGE,
        b"Return-Path: <s@example.net>\r\n" + MESSAGE,
    ]


def test_dot_stuffed_lines_eight_bit_bytes_and_bare_lf(lmtp, make_mailbox):
    """smtplib stuffs dots (bytes are sent as they are); the server unstuffs, keeps every 8-bit byte and
    stores a bare LF as CRLF, as deliver does."""
    make_mailbox("alice", email="alice@example.org")
    body = "Subject: caf\u00e9\r\n\r\n.leading dot\r\n..two\r\n.\r\n\u00fcber \xff\r\n".encode()
    body += b"bare\nlf\r\nlast\xfe\x00\r\n"
    no_trace = override_settings(POPSERVER_LMTP_ADD_RETURN_PATH=False, POPSERVER_LMTP_ADD_DELIVERED_TO=False)
    with no_trace, lmtp.client() as client:
        client.sendmail("s@example.net", ["alice@example.org"], body, mail_options=["BODY=8BITMIME"])
    assert stored("alice") == [body.replace(b"bare\nlf", b"bare\r\nlf")]


def test_message_over_the_size_limit_is_refused_and_nothing_stored(lmtp_factory, make_mailbox):
    make_mailbox("alice", email="alice@example.org")
    with override_settings(POPSERVER_MAX_MESSAGE_SIZE=2000):
        server = lmtp_factory()
        with server.client() as client:
            assert client.does_esmtp and client.esmtp_features["size"] == "2000"
            assert client.mail("s@example.net", ["SIZE=5000"]) == (
                552,
                b"5.3.4 Message size exceeds fixed maximum message size",
            )
            client.rset()
            client.mail("s@example.net")
            client.rcpt("alice@example.org")
            assert client.data(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 50 + b"y" * 3000) == (
                552,
                b"5.3.4 <alice@example.org> Message size exceeds fixed maximum message size",
            )
            assert client.noop()[0] == 250
            # The trace fields count toward the limit, as with deliver.
            client.mail("s@example.net")
            client.rcpt("alice@example.org")
            assert client.data(b"x" * 1990)[0] == 552
            client.mail("s@example.net")
            client.rcpt("alice@example.org")
            assert client.data(b"x" * 1900)[0] == 250
    assert len(stored("alice")) == 1


def test_pipelined_transactions_on_a_raw_socket(lmtp, make_mailbox):
    """RFC 2920: MAIL, RCPT and DATA sent at once; after the data the next transaction is pipelined too."""
    make_mailbox("alice", email="alice@example.org")
    with lmtp.socket() as sock:
        assert read_replies(sock, 1)[0].startswith(b"220 ")
        sock.sendall(
            b"LHLO client.test\r\nMAIL FROM:<a@x>\r\nRCPT TO:<alice@example.org>\r\n"
            b"RCPT TO:<nobody@example.org>\r\nDATA\r\n"
        )
        replies = read_replies(sock, 5)
        assert replies[1:] == [
            b"250 2.1.0 OK",
            b"250 2.1.5 OK",
            b"550 5.1.1 <nobody@example.org> User doesn't exist: nobody@example.org",
            b"354 OK",
        ]
        sock.sendall(b"one\r\n.\r\nMAIL FROM:<b@x>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
        assert read_replies(sock, 4) == [
            b"250 2.0.0 <alice@example.org> Saved",
            b"250 2.1.0 OK",
            b"250 2.1.5 OK",
            b"354 OK",
        ]
        sock.sendall(b"two\r\n.\r\nQUIT\r\n")
        assert read_replies(sock, 2) == [b"250 2.0.0 <alice@example.org> Saved", b"221 2.0.0 Bye"]
    assert [m.rsplit(b"\r\n", 2)[-2] for m in stored("alice")] == [b"one", b"two"]


def test_garbage_and_overlong_lines_do_not_end_the_session(lmtp, make_mailbox, caplog):
    make_mailbox("alice", email="alice@example.org")
    with lmtp.socket() as sock:
        read_replies(sock, 1)
        sock.sendall(
            b"LHLO c\r\n\x00\xff\xfe\x80garbage\r\nHELO c\r\n" + b"NOOP " + b"x" * 100_000 + b"\r\n"
            b"MAIL FROM:<a@x>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n"
        )
        replies = read_replies(sock, 7)
        assert replies[1:] == [
            b"500 5.5.1 Unknown command.",
            b"500 5.5.1 HELO is not LMTP: use LHLO (RFC 2033 s.4.1).",
            b"500 5.5.0 Line too long.",
            b"250 2.1.0 OK",
            b"250 2.1.5 OK",
            b"354 OK",
        ]
        sock.sendall(b"long line " + b"y" * 20_000 + b"\r\n.\r\n")
        assert read_replies(sock, 1) == [b"250 2.0.0 <alice@example.org> Saved"]
    assert b"y" * 20_000 in stored("alice")[0]
    assert "Traceback" not in caplog.text


def test_a_client_that_drops_mid_data_stores_nothing(lmtp, make_mailbox, caplog):
    make_mailbox("alice", email="alice@example.org")
    with caplog.at_level(logging.INFO, logger="popserver"):
        with lmtp.socket() as sock:
            read_replies(sock, 1)
            sock.sendall(b"LHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<alice@example.org>\r\nDATA\r\n")
            read_replies(sock, 4)
            sock.sendall(b"Subject: half\r\n\r\n" + b"z" * 100_000)
        assert lmtp.wait_idle()
    assert stored("alice") == []
    assert "in the middle of DATA: message not delivered" in caplog.text


def test_too_many_recipients_is_452_4_5_3(lmtp_factory, make_mailbox):
    make_mailbox("alice", email="alice@example.org")
    with override_settings(POPSERVER_LMTP_MAX_RECIPIENTS=2):
        server = lmtp_factory()
        with server.client() as client:
            client.mail("s@x")
            assert client.rcpt("alice@example.org")[0] == 250
            assert client.rcpt("alice@example.org")[0] == 250
            assert client.rcpt("alice@example.org") == (452, b"4.5.3 Too many recipients")


def test_over_quota_is_permanent_when_the_site_says_so(lmtp_factory, make_mailbox):
    make_mailbox("full", email="full@example.org", quota_messages=1)
    deliver("full", b"Subject: old\r\n\r\nx\r\n")
    with override_settings(POPSERVER_QUOTA_EXCEEDED_PERMANENT=True):
        server = lmtp_factory()
        with server.client() as client:
            client.mail("s@x")
            assert client.rcpt("full@example.org") == (
                552,
                b"5.2.2 <full@example.org> Quota exceeded (mailbox for user is full)",
            )


class BrokenForBob(DatabaseBodyStore):
    """A body store whose writes for bob's mailbox hit a real database error (a table that does not exist)."""

    def save(self, message, data: bytes, staged: object = None) -> None:
        if message.mailbox.user.get_username() == "bob":
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO popserver_no_such_table (x) VALUES (1)")
        super().save(message, data, staged)


def test_a_database_error_is_451_for_that_recipient_alone_with_one_log_line(lmtp, make_mailbox, caplog):
    make_mailbox("alice", email="alice@example.org")
    make_mailbox("bob", email="bob@example.org")
    make_mailbox("zed", email="zed@example.org")
    broken = override_settings(POPSERVER_BODY_STORE="tests.test_lmtp_live.BrokenForBob")
    with broken, caplog.at_level(logging.INFO, logger="popserver"), lmtp.client() as client:
        client.mail("s@x")
        for name in ("alice", "bob", "zed"):
            client.rcpt(f"{name}@example.org")
        replies = [client.data(MESSAGE), client.getreply(), client.getreply()]
        assert client.noop()[0] == 250  # the connection goes on
    assert replies == [
        (250, b"2.0.0 <alice@example.org> Saved"),
        (451, b"4.3.0 <bob@example.org> Temporary internal error"),
        (250, b"2.0.0 <zed@example.org> Saved"),
    ]
    assert len(stored("alice")) == len(stored("zed")) == 1 and stored("bob") == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "451 4.3.0" in errors[0].getMessage() and errors[0].exc_info is None


def test_a_database_error_at_rcpt_is_451_and_the_session_goes_on(lmtp, make_mailbox, caplog):
    """A real database error (the address table renamed away) while a recipient is looked up."""
    make_mailbox("alice", email="alice@example.org")
    with lmtp.client() as client:
        client.mail("s@x")
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE popserver_address RENAME TO popserver_address_away")
        try:
            with caplog.at_level(logging.INFO, logger="popserver"):
                reply = client.rcpt("alice@example.org")
        finally:
            with connection.cursor() as cursor:
                cursor.execute("ALTER TABLE popserver_address_away RENAME TO popserver_address")
        assert reply == (451, b"4.3.0 <alice@example.org> Temporary internal error")
        assert client.rcpt("alice@example.org") == (250, b"2.1.5 OK")
        assert client.data(MESSAGE)[0] == 250
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "RCPT TO:<alice@example.org> failed (451 4.3.0)" in errors[0].getMessage()
    assert errors[0].exc_info is None
    assert len(stored("alice")) == 1


def test_an_idle_connection_is_closed_with_421(lmtp_factory):
    with override_settings(POPSERVER_LMTP_TIMEOUT=1):
        server = lmtp_factory()
        with server.socket() as sock:
            read_replies(sock, 1)
            sock.sendall(b"LHLO c\r\n")
            replies = read_replies(sock, 2)
            assert replies[-1].startswith(b"421 4.4.2 ") and replies[-1].endswith(
                b"Disconnected for inactivity"
            )
            assert sock.recv(100) == b""


def test_a_full_server_turns_a_new_connection_away_with_421(lmtp_factory):
    """The MTA's open connections are never dropped to make room: the newcomer waits (RFC 5321 s.3.8)."""
    with override_settings(POPSERVER_MAX_SESSIONS=1):
        server = lmtp_factory()
        with server.client() as first:
            with server.socket() as second:
                assert read_replies(second, 1) == [b"421 4.3.2 Too many connections, try again later"]
            assert first.noop()[0] == 250


def test_starttls_then_delivery(lmtp_factory, make_mailbox, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    make_mailbox("alice", email="alice@example.org")
    server = lmtp_factory(tls=TlsContextHolder(str(certfile), str(keyfile)))
    with server.client() as client:
        assert client.has_extn("starttls")
        assert client.starttls(context=context)[0] == 220
        client.ehlo()  # LHLO again (RFC 3207 s.4.2)
        assert not client.has_extn("starttls")
        assert client.sendmail("s@x", ["alice@example.org"], MESSAGE) == {}
    assert len(stored("alice")) == 1


def test_tcp_peers_outside_the_trusted_networks_are_refused(lmtp_factory, caplog):
    with override_settings(POPSERVER_LMTP_TRUSTED_NETWORKS=["10.0.0.0/8"]):
        server = lmtp_factory()
        with server.socket() as sock:
            assert sock.recv(100) == b"421 4.7.0 Access denied\r\n"
    assert "not in POPSERVER_LMTP_TRUSTED_NETWORKS" in caplog.text


def test_a_session_end_is_logged_with_its_counters(lmtp, make_mailbox, caplog):
    make_mailbox("alice", email="alice@example.org")
    with caplog.at_level(logging.INFO, logger="popserver"):
        with lmtp.client() as client:
            client.sendmail("s@x", ["alice@example.org", "nobody@example.org"], MESSAGE)
        assert lmtp.wait_idle()
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LMTP disconnected")]
    assert len(ends) == 1
    assert "Logged out" in ends[0] and "messages=1 delivered=1 refused=0" in ends[0]


# The command ------------------------------------------------------------------------------------------------
def runlmtp(*args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        manage_py_command("runlmtp", *args),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stdout.readline()
    return proc, first


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


def test_runlmtp_on_tcp_delivers_and_stops_on_sigterm(transactional_db, make_mailbox):
    make_mailbox("alice", email="alice@example.org")
    proc, first = runlmtp("127.0.0.1:0")
    try:
        match = re.search(r"LMTP on 127\.0\.0\.1:(\d+)", first)
        assert match, first + proc.stderr.read()
        with smtplib.LMTP("127.0.0.1", int(match.group(1)), timeout=10) as client:
            assert client.sendmail("s@x", ["alice@example.org"], MESSAGE) == {}
    finally:
        status, err = stop(proc)
    assert status == 0, err
    assert "LMTP disconnected: Logged out" in err and "saved mail" in err
    assert len(stored("alice")) == 1


def test_runlmtp_on_a_unix_socket_with_a_mode(transactional_db, make_mailbox, short_dir):
    make_mailbox("alice", email="alice@example.org")
    path = os.path.join(short_dir, "popserver-lmtp")
    proc, first = runlmtp(f"unix:{path}", "--socket-mode", "0666")
    try:
        assert f"LMTP on unix:{path}" in first, first + proc.stderr.read()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666
        with smtplib.LMTP(path, timeout=10) as client:
            assert client.sendmail("s@x", ["alice@example.org"], MESSAGE) == {}
    finally:
        status, err = stop(proc)
    assert status == 0, err
    assert not os.path.exists(path)
    assert len(stored("alice")) == 1


def test_runlmtp_refuses_a_bad_address_or_mode(transactional_db):
    for args in (["127.0.0.1:99999"], ["unix:"], ["--socket-mode", "999"]):
        result = subprocess.run(
            manage_py_command("runlmtp", *args),
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1 and "Invalid address or mode" in result.stderr, (args, result.stderr)


def test_runlmtp_refuses_to_replace_a_live_socket(lmtp_factory, transactional_db, short_dir):
    path = os.path.join(short_dir, "lmtp.sock")
    lmtp_factory(path)
    result = subprocess.run(
        manage_py_command("runlmtp", f"unix:{path}"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "a server is listening on" in result.stderr


# runlmtp --workers: the supervisor of runpop3 --workers ------------------------------------------------------
def worker_pids(server) -> dict[int, int]:
    """worker number -> pid of its latest start, from the supervisor's log lines."""
    pids = {}
    for line in list(server.stderr_lines):
        if found := re.search(r"worker (\d+) started \(pid (\d+)\)", line):
            pids[int(found.group(1))] = int(found.group(2))
    return pids


def deliver_from_connections(
    server, recipients: list[str], connections: int, path: str | None = None
) -> None:
    """One message per recipient from each of ``connections`` LMTP connections open at once."""
    clients = [server.lmtp(path) for _ in range(connections)]
    try:
        for n, client in enumerate(clients):
            body = MESSAGE.replace(b"hello", b"hello %d" % n)
            assert client.sendmail("s@example.net", recipients, body) == {}
    finally:
        for client in clients:
            client.quit()


def test_runlmtp_workers_deliver_replace_a_killed_worker_and_stop_on_sigterm(runlmtp_process, make_mailbox):
    for name in ("alice", "bob"):
        make_mailbox(name, email=f"{name}@example.org")
    server = runlmtp_process("--workers", "2")
    assert "(2 workers)" in server.first_line
    deliver_from_connections(server, ["alice@example.org", "bob@example.org"], connections=6)
    assert len(stored("alice")) == len(stored("bob")) == 6
    pids = worker_pids(server)
    assert sorted(pids) == [1, 2] and server.proc.pid not in pids.values()

    os.kill(pids[1], signal.SIGKILL)  # a worker of the runlmtp this test started
    killed = f"worker 1 (pid {pids[1]}) was killed by SIGKILL"
    wait_for(lambda: any(killed in line for line in server.stderr_lines))
    wait_for(lambda: worker_pids(server)[1] != pids[1], timeout=15)
    deliver_from_connections(server, ["alice@example.org"], connections=4)
    assert len(stored("alice")) == 10

    busy = server.lmtp()  # an MTA connection open at the stop: told, and the workers still end
    started = time.monotonic()
    assert server.terminate(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert busy.getreply()[0] == 421
    ended = worker_pids(server).values()
    for pid in ended:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # reaped by the supervisor: gone
    assert sum(") stopped" in line for line in server.stderr_lines) == 2
    assert any(re.match(r".*worker=\d .*LMTP disconnected", line) for line in server.stderr_lines)


def test_runlmtp_workers_on_a_unix_socket(runlmtp_process, make_mailbox, short_dir):
    make_mailbox("alice", email="alice@example.org")
    path = os.path.join(short_dir, "lmtp.sock")
    server = runlmtp_process("--workers", "2", "--socket-mode", "600", listen=f"unix:{path}")
    assert f"LMTP on unix:{path} (2 workers)" in server.first_line
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    deliver_from_connections(server, ["alice@example.org"], connections=3, path=path)
    assert len(stored("alice")) == 3
    assert server.terminate(timeout=20) == 0
    assert not os.path.exists(path)  # the parent removes the socket it bound
