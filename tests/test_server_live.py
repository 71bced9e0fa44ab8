"""Live tests: runpop3's server on a free port, spoken to by poplib, raw sockets and other processes."""

import base64
import poplib
import shutil
import socket
import subprocess
import threading
import time

import pytest
from django.test import override_settings

from popserver.mailin.delivery import deliver
from popserver.models import Mailbox, Message
from popserver.protocol.wire import normalize_line_endings
from tests.conftest import (
    CORPUS_SIZES,
    corpus_files,
    failing_insert,
    failing_insert_losing_its_savepoint,
    raising_after_losing_its_savepoint,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.live


def msg(subject: str, body: str = "hello") -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def read_until(sock: socket.socket, terminator: bytes, limit: int = 64 * 1024 * 1024) -> bytes:
    """Read from ``sock`` until the data ends with ``terminator`` (the socket's timeout bounds the wait)."""
    data = b""
    while not data.endswith(terminator):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data[-200:]!r}")
        data += chunk
        assert len(data) <= limit
    return data


def read_lines(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[:count]


def login_raw(server, user="alice", password="secret") -> socket.socket:
    sock = server.socket()
    assert read_lines(sock, 1)[0].startswith(b"+OK")
    sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
    assert read_lines(sock, 2) == [b"+OK", b"+OK Logged in."]
    return sock


def is_locked(mailbox) -> bool:
    return bool(Mailbox.objects.get(pk=mailbox.pk).lock_token)


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret", email="alice@example.com")
    for n in range(1, 4):
        deliver("alice", msg(f"message {n}", "x" * n))
    return mailbox


# Every command through poplib ------------------------------------------------------------------------------
def test_poplib_every_command(pop3_server, alice):
    client = pop3_server.poplib()
    assert client.getwelcome().startswith(b"+OK")
    caps = client.capa()
    assert {"TOP", "UIDL", "USER", "RESP-CODES", "PIPELINING"} <= set(caps)
    client.user("alice")
    client.pass_("secret")
    sizes = [m.size for m in Message.objects.filter(mailbox=alice).order_by("id")]
    uids = [m.uid for m in Message.objects.filter(mailbox=alice).order_by("id")]
    assert client.stat() == (3, sum(sizes))
    _, listing, _ = client.list()
    assert listing == [f"{n} {s}".encode() for n, s in enumerate(sizes, 1)]
    assert client.list(2).split() == [b"+OK", b"2", str(sizes[1]).encode()]
    _, uidl, _ = client.uidl()
    assert uidl == [f"{n} {u}".encode() for n, u in enumerate(uids, 1)]
    _, lines, octets = client.retr(1)
    assert b"Subject: message 1" in lines and octets >= sizes[0]
    _, top, _ = client.top(2, 0)
    assert top[-1] == b"" and b"Subject: message 2" in top
    assert client.dele(1).startswith(b"+OK")
    with pytest.raises(poplib.error_proto, match="deleted"):
        client.retr(1)
    assert client.stat()[0] == 2
    client.rset()
    assert client.stat()[0] == 3
    client.noop()
    client.dele(3)
    assert client.quit().startswith(b"+OK")
    assert list(Message.objects.filter(mailbox=alice).values_list("uid", flat=True)) == uids[:2]
    assert not is_locked(alice)
    assert Mailbox.objects.get(pk=alice.pk).last_login is not None


def test_wrong_password_and_unknown_user_get_the_same_reply(pop3_server, alice):
    for user, password in (("alice", "wrong"), ("nobody", "secret")):
        client = pop3_server.poplib()
        client.user(user)
        with pytest.raises(poplib.error_proto) as info:
            client.pass_(password)
        assert info.value.args[0] == b"-ERR [AUTH] Authentication failed."
        client.quit()
    assert not is_locked(alice)


def test_a_name_with_a_nul_is_a_failed_login_not_a_database_error(pop3_server, alice, caplog):
    """PostgreSQL cannot store a NUL (the throttle's key, the audit row): such a name is refused as wrong
    credentials, with no error logged."""
    from popserver.models import LoginEvent

    for command in (b"USER al\x00ice", b"AUTH LOGIN " + base64.b64encode(b"al\x00ice")):
        sock = pop3_server.socket()
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        sock.sendall(command + b"\r\n")
        reader.readline()  # +OK, or the LOGIN password prompt
        sock.sendall((b"c2VjcmV0" if b"AUTH" in command else b"PASS secret") + b"\r\n")
        assert reader.readline().startswith(b"-ERR [AUTH]")
        sock.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"+OK")
        sock.close()
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    wait_for(lambda: LoginEvent.objects.filter(username="al\ufffdice").count() == 2)
    assert not is_locked(alice)


def test_login_by_address_and_switched_off_mailbox(pop3_server, alice):
    client = pop3_server.poplib()
    client.user("ALICE@example.com")
    client.pass_("secret")
    assert client.stat()[0] == 3
    client.quit()
    Mailbox.objects.filter(pk=alice.pk).update(pop3_enabled=False)
    client = pop3_server.poplib()
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("secret")


def test_inactive_user_is_refused(pop3_server, alice):
    alice.user.is_active = False
    alice.user.save()
    client = pop3_server.poplib()
    client.user("alice")
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("secret")


# The corpus, byte for byte -----------------------------------------------------------------------------------
def expected_retr(stored: bytes) -> bytes:
    body = stored if stored.endswith(b"\r\n") else stored + b"\r\n"
    lines = body.split(b"\r\n")[:-1]
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return stuffed + b".\r\n"


def test_corpus_byte_for_byte(pop3_server, make_mailbox):
    make_mailbox("alice", "secret")
    files = corpus_files()
    assert len(files) == len(CORPUS_SIZES)
    for path in files:
        deliver("alice", path.read_bytes())
    sock = login_raw(pop3_server)
    sock.sendall(b"LIST\r\n")
    listing = read_until(sock, b"\r\n.\r\n").split(b"\r\n")[1:-2]
    assert [int(line.split()[1]) for line in listing] == [CORPUS_SIZES[p.name][1] for p in files]
    for number, path in enumerate(files, 1):
        raw = path.read_bytes()
        if raw.startswith(b"From "):
            raw = raw.split(b"\n", 1)[1]
        stored = normalize_line_endings(raw)
        sock.sendall(f"RETR {number}\r\n".encode())
        reply = read_until(sock, b"\r\n.\r\n")
        first, _, body = reply.partition(b"\r\n")
        assert first == f"+OK {len(stored)} octets".encode(), path.name
        assert body == expected_retr(stored), path.name
    sock.sendall(b"QUIT\r\n")
    assert read_lines(sock, 1) == [b"+OK Logging out."]


# The lock ----------------------------------------------------------------------------------------------------
def test_second_login_is_refused_in_use_and_the_holder_goes_on(pop3_server, alice):
    holder = pop3_server.poplib()
    holder.user("alice")
    holder.pass_("secret")
    second = pop3_server.poplib()
    second.user("alice")
    started = time.monotonic()
    with pytest.raises(poplib.error_proto) as info:
        second.pass_("secret")
    assert time.monotonic() - started < 1.0
    assert info.value.args[0].startswith(b"-ERR [IN-USE]")
    assert second.sock.recv(10) == b""  # closed, as Dovecot does
    assert holder.stat()[0] == 3
    holder.quit()
    third = pop3_server.poplib()
    third.user("alice")
    third.pass_("secret")
    third.quit()


def test_abrupt_disconnect_releases_the_lock_and_deletes_nothing(pop3_server, alice):
    sock = login_raw(pop3_server)
    sock.sendall(b"DELE 1\r\nDELE 2\r\n")
    assert read_lines(sock, 2) == [b"+OK Marked to be deleted."] * 2
    sock.close()
    wait_for(lambda: not is_locked(alice))
    assert Message.objects.filter(mailbox=alice).count() == 3


def test_lock_from_another_process(pop3_server, runpop3, alice):
    other = runpop3()
    holder = pop3_server.poplib()
    holder.user("alice")
    holder.pass_("secret")
    remote = other.poplib()
    remote.user("alice")
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[IN-USE\]"):
        remote.pass_("secret")
    holder.quit()
    remote = other.poplib()
    remote.user("alice")
    remote.pass_("secret")
    assert remote.stat()[0] == 3
    remote.quit()
    assert other.terminate() == 0


def test_killed_server_locks_are_freed_by_a_restarted_one(runpop3, alice):
    first = runpop3()
    sock = login_raw(first)
    sock.sendall(b"DELE 1\r\n")
    assert read_lines(sock, 1) == [b"+OK Marked to be deleted."]
    first.kill()
    sock.close()
    assert is_locked(alice)
    second = runpop3()  # frees this host's dead locks at start
    client = second.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == 3  # the killed session's DELE was never committed
    client.quit()


def test_sigterm_ends_sessions_without_update_and_releases_locks(runpop3, alice):
    server = runpop3()
    sock = login_raw(server)
    sock.sendall(b"DELE 1\r\n")
    assert read_lines(sock, 1) == [b"+OK Marked to be deleted."]
    started = time.monotonic()
    assert server.terminate() == 0
    assert time.monotonic() - started < 10
    assert not is_locked(alice)
    assert Message.objects.filter(mailbox=alice).count() == 3
    assert any("listening on 127.0.0.1" in line for line in server.stderr_lines)
    assert any("Disconnected" in line and "user=<alice>" in line for line in server.stderr_lines)


# UPDATE and the snapshot -----------------------------------------------------------------------------------
def test_mail_delivered_during_a_session_appears_in_the_next(pop3_server, alice):
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    deliver("alice", msg("late"))
    assert client.stat()[0] == 3
    assert len(client.uidl()[1]) == 3
    client.quit()
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == 4
    client.quit()


def test_expunged_by_an_administrator(pop3_server, alice):
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    Message.objects.filter(mailbox=alice).order_by("id").first().delete()
    with pytest.raises(poplib.error_proto, match="Message 1 expunged"):
        client.retr(1)
    client.dele(2)
    client.quit()
    assert Message.objects.filter(mailbox=alice).count() == 1


@override_settings(POPSERVER_BODY_CHUNK_SIZE=1000)
def test_quit_after_many_deletions(pop3_server, make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    for n in range(1200):
        deliver("alice", msg(f"m{n}", "." * (n % 3000)))
    sock = login_raw(pop3_server)
    sock.sendall(b"".join(f"DELE {n}\r\n".encode() for n in range(1, 1201)))
    read_until(sock, b"+OK Marked to be deleted.\r\n" * 1)
    sock.sendall(b"QUIT\r\n")
    done = b"+OK Logging out, messages deleted.\r\n"
    assert read_until(sock, done).endswith(done)
    assert Message.objects.filter(mailbox=mailbox).count() == 0
    from popserver.models import MessageChunk

    assert MessageChunk.objects.count() == 0


# Abuse -------------------------------------------------------------------------------------------------------
def test_pipelined_commands_in_one_packet(pop3_server, alice):
    sock = pop3_server.socket()
    read_lines(sock, 1)
    sock.sendall(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST 1\r\nNOOP\r\nQUIT\r\n")
    lines = read_until(sock, b"+OK Logging out.\r\n").split(b"\r\n")
    size = sum(Message.objects.filter(mailbox=alice).values_list("size", flat=True))
    first_size = Message.objects.filter(mailbox=alice).order_by("id").first().size
    assert lines[:6] == [
        b"+OK",
        b"+OK Logged in.",
        f"+OK 3 {size}".encode(),
        f"+OK 1 {first_size}".encode(),
        b"+OK",
        b"+OK Logging out.",
    ]


def test_over_long_line_and_garbage_then_a_fresh_login_works(pop3_server, alice):
    sock = pop3_server.socket()
    read_lines(sock, 1)
    sock.sendall(b"NOOP " + b"x" * 2000 + b"\r\n")
    assert read_lines(sock, 1)[0].startswith(b"-ERR")
    sock.sendall(b"\x00\xff\xfe garbage \x80\r\n")
    assert read_lines(sock, 1)[0].startswith(b"-ERR")
    sock.sendall(b"x" * 20000)  # no line end at all: the server closes
    data = read_until(sock, b"\r\n")
    assert data.startswith(b"-ERR")
    assert sock.recv(100) == b""
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == 3
    client.quit()


@override_settings(POPSERVER_MAX_SESSIONS=210, POPSERVER_MAX_UNAUTHENTICATED_PER_IP=250)
def test_200_simultaneous_connections(pop3_server, alice):
    sockets = []
    try:
        for _ in range(200):
            sockets.append(pop3_server.socket())
        for sock in sockets:
            assert read_lines(sock, 1)[0].startswith(b"+OK")
        for sock in sockets:
            sock.sendall(b"CAPA\r\nQUIT\r\n")
        for sock in sockets:
            assert read_until(sock, b"+OK Logging out\r\n").startswith(b"+OK\r\n")  # before login
    finally:
        for sock in sockets:
            sock.close()
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    client.quit()


@override_settings(POPSERVER_MAX_SESSIONS=2)
def test_a_full_server_refuses_only_when_every_slot_is_logged_in(pop3_server, alice, make_mailbox):
    make_mailbox("bob", "secret")
    idle = pop3_server.socket()
    read_lines(idle, 1)
    first = login_raw(pop3_server)
    newcomer = pop3_server.socket()  # full: the oldest unauthenticated connection makes room
    assert read_lines(newcomer, 1)[0].startswith(b"+OK")
    assert idle.recv(100) == b""
    newcomer.sendall(b"USER bob\r\nPASS secret\r\n")
    assert read_lines(newcomer, 2) == [b"+OK", b"+OK Logged in."]
    refused = pop3_server.socket()  # every slot is logged in now
    assert read_until(refused, b"\r\n") == b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
    first.close()
    newcomer.close()
    wait_for(lambda: len(pop3_server.server.registry) == 0)
    assert read_lines(pop3_server.socket(), 1)[0].startswith(b"+OK")


@override_settings(
    POPSERVER_MAX_UNAUTHENTICATED_PER_IP=2, POPSERVER_TRUSTED_NETWORKS=[], POPSERVER_PLAINTEXT_AUTH="always"
)
def test_oldest_unauthenticated_connection_of_an_ip_is_evicted(pop3_server, alice):
    # Loopback plays an untrusted peer here: trusted networks have no per-IP cap.
    authenticated = login_raw(pop3_server)
    oldest, middle = pop3_server.socket(), pop3_server.socket()
    read_lines(oldest, 1), read_lines(middle, 1)
    newest = pop3_server.socket()
    assert read_lines(newest, 1)[0].startswith(b"+OK")
    assert oldest.recv(100) == b""  # evicted
    middle.sendall(b"NOOP\r\n")
    assert read_lines(middle, 1)[0].startswith(b"-ERR")  # still there (NOOP needs a login)
    authenticated.sendall(b"STAT\r\n")
    assert read_lines(authenticated, 1)[0].startswith(b"+OK 3")


@override_settings(POPSERVER_MAX_UNAUTHENTICATED_PER_IP=2)
def test_a_trusted_network_has_no_per_ip_cap(pop3_server, alice):
    """A webmail on the same host brings every user's logins from 127.0.0.1."""
    idle = [pop3_server.socket() for _ in range(5)]
    for sock in idle:
        assert read_lines(sock, 1)[0].startswith(b"+OK")
    for sock in idle:
        sock.sendall(b"CAPA\r\n")
        assert read_until(sock, b".\r\n").startswith(b"+OK\r\n")
        sock.close()


@override_settings(POPSERVER_BODY_CHUNK_SIZE=256 * 1024)
def test_client_that_never_reads_a_large_retr_blocks_no_one(pop3_server, make_mailbox):
    make_mailbox("bob", "secret")
    deliver("bob", b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 20000)  # ~20 MB
    make_mailbox("alice", "secret")
    deliver("alice", msg("small", "small"))
    stuck = login_raw(pop3_server, "bob")
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"RETR 1\r\n")
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.retr(1)[1][-1] == b"small"
    client.quit()
    stuck.close()


@override_settings(POPSERVER_AUTOLOGOUT=1, POPSERVER_LOGIN_TIMEOUT=1)
def test_autologout_and_login_timeout(pop3_server, alice):
    before_login = pop3_server.socket()
    assert read_lines(before_login, 1)[0].startswith(b"+OK")
    assert read_until(before_login, b"\r\n") == b"-ERR Disconnected for inactivity.\r\n"
    assert before_login.recv(10) == b""
    idle = login_raw(pop3_server)
    idle.sendall(b"DELE 1\r\n")
    assert read_lines(idle, 1) == [b"+OK Marked to be deleted."]
    assert read_until(idle, b"\r\n") == b"-ERR Disconnected for inactivity.\r\n"
    wait_for(lambda: not is_locked(alice))
    assert Message.objects.filter(mailbox=alice).count() == 3


@override_settings(POPSERVER_AUTH_FAILURE_DELAY=3)
def test_failed_login_delay_blocks_no_other_session(pop3_server, alice, make_mailbox):
    make_mailbox("bob", "other")
    slow = pop3_server.socket()
    read_lines(slow, 1)
    slow.sendall(b"USER alice\r\nPASS wrong\r\n")
    assert read_until(slow, b"\r\n") == b"+OK\r\n"  # USER's reply does not wait for the slow PASS
    started = time.monotonic()
    client = pop3_server.poplib()
    client.user("bob")
    client.pass_("other")
    client.quit()
    assert time.monotonic() - started < 2.5
    assert read_until(slow, b"\r\n") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert time.monotonic() - started >= 2.5


def test_session_end_before_login_says_why_and_who(pop3_server, alice, caplog):
    """Like Dovecot's pop3-login: "Aborted login by logging out (auth failed, 1 attempts ...): user=<alice>"."""
    caplog.set_level("INFO", logger="popserver")
    holder = pop3_server.poplib()
    holder.user("alice")
    holder.pass_("secret")
    failed = pop3_server.poplib()
    failed.user("alice")
    with pytest.raises(poplib.error_proto):
        failed.pass_("wrong")
    failed.quit()
    in_use = pop3_server.poplib()
    in_use.user("alice")
    with pytest.raises(poplib.error_proto, match="IN-USE"):
        in_use.pass_("secret")  # and the server closes the connection, as Dovecot does
    in_use.close()
    holder.quit()

    def end_lines():
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Disconnected")]
        return lines if len(lines) == 3 else None

    lines = wait_for(end_lines)
    for expected in (
        "Disconnected: Aborted login by logging out (auth failed, 1 attempts) user=<alice> method=USER peer=127.",
        "Disconnected: Closed by server (mailbox in use, 1 attempts) user=<alice> method=USER peer=127.",
        "Disconnected: Logged out user=<alice> peer=127.",
    ):
        assert any(line.startswith(expected) for line in lines), (expected, lines)
    assert not any("secret" in line or "wrong" in line for line in lines)


def test_session_end_is_logged_without_password(pop3_server, alice, caplog):
    caplog.set_level("DEBUG", logger="popserver")
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    client.retr(1)
    client.dele(2)
    client.quit()
    wait_for(lambda: any("Disconnected: Logged out" in r.getMessage() for r in caplog.records))
    line = next(r.getMessage() for r in caplog.records if "Disconnected: Logged out" in r.getMessage())
    assert "user=<alice>" in line and "retr=1/" in line and "del=1/3" in line
    assert not any("secret" in r.getMessage() for r in caplog.records)


# curl as a second real client ----------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_lists_retrieves_and_deletes(pop3_server, alice):
    base = f"pop3://127.0.0.1:{pop3_server.port}"

    def curl(*args: str) -> bytes:
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--user", "alice:secret", *args],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    sizes = list(Message.objects.filter(mailbox=alice).order_by("id").values_list("size", flat=True))
    assert curl(f"{base}/") == b"".join(f"{n} {s}\r\n".encode() for n, s in enumerate(sizes, 1))
    assert b"Subject: message 2" in curl(f"{base}/2")
    curl("--request", "DELE", "--list-only", f"{base}/1")
    wait_for(lambda: not is_locked(alice))
    assert Message.objects.filter(mailbox=alice).count() == 2
    uidl = curl("--request", "UIDL", f"{base}/")
    assert uidl.count(b"\r\n") == 2


# Crash safety ----------------------------------------------------------------------------------------------
def test_kill_during_quit_leaves_all_or_none_of_the_deletions(runpop3, make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    bulk = [Message(mailbox=mailbox, uid=f"U{n:06d}", size=5) for n in range(3000)]
    Message.objects.bulk_create(bulk)
    server = runpop3()
    sock = login_raw(server)
    sock.sendall(b"".join(f"DELE {n}\r\n".encode() for n in range(1, 3001)))
    replies = b""
    while replies.count(b"\r\n") < 3000:
        replies += sock.recv(65536)
    sock.sendall(b"QUIT\r\n")
    server.kill()  # in the middle of UPDATE, or just before or after it
    sock.close()
    remaining = Message.objects.filter(mailbox=mailbox).count()
    assert remaining in (0, 3000), remaining
    restarted = runpop3()
    client = restarted.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == remaining
    client.quit()


# IPv6 ----------------------------------------------------------------------------------------------------
def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_listener(transactional_db, alice):
    from popserver.server.listener import parse_address, start_servers

    assert parse_address("[::1]:8110") == ("::1", 8110)
    stop = threading.Event()
    (server,) = start_servers([parse_address("[::1]:0")], stop)
    try:
        assert server.display_address.startswith("[::1]:")
        client = poplib.POP3("::1", server.port, timeout=10)
        client.user("alice")
        client.pass_("secret")
        assert client.stat()[0] == 3
        client.quit()
    finally:
        server.stop(grace=10)


def test_parse_address_forms():
    from popserver.server.listener import parse_address

    assert parse_address("127.0.0.1:8110") == ("127.0.0.1", 8110)
    assert parse_address("8111") == ("127.0.0.1", 8111)
    assert parse_address("0.0.0.0") == ("0.0.0.0", 8110)
    assert parse_address("[::]") == ("::", 8110)
    with pytest.raises(ValueError):
        parse_address("127.0.0.1:http")


# Throttling across processes, and the audit trail ---------------------------------------------------------
def test_throttle_is_shared_by_two_server_processes(runpop3, alice):
    # Loopback plays an untrusted client: the whole-IP count applies and plaintext is allowed.
    env = {"POPSERVER_TRUSTED_NETWORKS": "[]", "POPSERVER_PLAINTEXT_AUTH": "always"}
    first, second = runpop3(**env, POPSERVER_NODE_NAME="node-a"), runpop3(**env, POPSERVER_NODE_NAME="node-b")
    for attempt in range(30):
        server = (first, second)[attempt % 2]
        client = server.poplib()
        client.user("alice")
        with pytest.raises(poplib.error_proto) as info:
            client.pass_("wrong")
        assert info.value.args[0].startswith((b"-ERR [AUTH]", b"-ERR [SYS/TEMP]"))
        client.quit()
    for server in (first, second):
        client = server.poplib()
        client.user("alice")
        with pytest.raises(poplib.error_proto, match="SYS/TEMP"):
            client.pass_("secret")  # the right password, refused: (account, IP) and IP are locked out
        client.quit()
    from popserver.models import LoginThrottle

    assert set(LoginThrottle.objects.filter(locked_until__isnull=False).values_list("scope", flat=True)) == {
        "account",
        "ip",
    }


def test_sessions_and_logins_are_audited(pop3_server, alice):
    from popserver.models import LoginEvent, SessionRecord

    client = pop3_server.poplib()
    client.user("alice")
    with pytest.raises(poplib.error_proto):
        client.pass_("wrong")
    client.user("alice")
    client.pass_("secret")
    client.retr(1)
    client.dele(2)
    client.quit()
    record = wait_for(lambda: SessionRecord.objects.first())
    assert (record.username, record.retrieved_count, record.deleted_count, record.end_reason) == (
        "alice",
        1,
        1,
        "Logged out",
    )
    assert record.retrieved_bytes > 0 and record.deleted_bytes > 0 and record.peer_ip == "127.0.0.1"
    outcomes = list(LoginEvent.objects.order_by("time", "id").values_list("outcome", flat=True))
    assert outcomes == ["failed", "success"]


@pytest.fixture
def ended_sessions():
    """The ``session_closed`` signals sent during the test (the session's end is over once one is here)."""
    from popserver.signals import session_closed

    ended: list = []

    def receiver(sender=None, **kwargs):
        ended.append(kwargs["stats"])

    session_closed.connect(receiver, weak=False, dispatch_uid="test-ended-sessions")
    yield ended
    session_closed.disconnect(dispatch_uid="test-ended-sessions")


def dele_one_and_quit(server, ended: list, before_quit=lambda: None) -> bytes:
    """Log in as alice, DELE 1, QUIT; the QUIT reply (or the -ERR as bytes) once the session has ended."""
    client = server.poplib()
    client.user("alice")
    client.pass_("secret")
    client.dele(1)
    before_quit()
    try:
        reply = client.quit()
    except poplib.error_proto as refused:
        reply = refused.args[0]
    wait_for(lambda: ended)
    return reply


def test_quit_writes_the_session_record_once_in_its_own_transaction(pop3_server, alice, ended_sessions):
    """The SessionRecord goes into QUIT's transaction; the session's end then writes no second one."""
    from popserver.models import SessionRecord

    assert dele_one_and_quit(pop3_server, ended_sessions).startswith(b"+OK")
    assert list(SessionRecord.objects.values_list("end_reason", "deleted_count")) == [("Logged out", 1)]
    assert Message.objects.filter(mailbox=alice).count() == 2 and not is_locked(alice)


def test_a_quit_that_cannot_commit_records_its_session_at_the_end(pop3_server, alice, ended_sessions):
    """The lock lost under the session: QUIT answers -ERR, deletes nothing, and the record written in its
    transaction went with it; the session's end records it instead, with nothing deleted."""
    from popserver.models import SessionRecord

    def lose_the_lock():
        Mailbox.objects.filter(pk=alice.pk).update(lock_token="someone-else")

    assert dele_one_and_quit(pop3_server, ended_sessions, lose_the_lock).startswith(b"-ERR")
    records = list(SessionRecord.objects.values_list("end_reason", "deleted_count"))
    assert records == [("Logout failed, nothing deleted", 0)]
    assert Message.objects.filter(mailbox=alice).count() == 3


def test_a_session_record_that_cannot_be_written_does_not_undo_quit(pop3_server, alice, ended_sessions):
    from django.db.models.signals import pre_save

    from popserver.models import SessionRecord

    pre_save.connect(failing_insert, sender=SessionRecord)
    try:
        assert dele_one_and_quit(pop3_server, ended_sessions).startswith(b"+OK")
    finally:
        pre_save.disconnect(failing_insert, sender=SessionRecord)
    assert Message.objects.filter(mailbox=alice).count() == 2 and not is_locked(alice)
    assert not SessionRecord.objects.exists()


@pytest.mark.parametrize(
    "receiver", [failing_insert_losing_its_savepoint, raising_after_losing_its_savepoint]
)
def test_a_session_record_that_loses_quits_transaction_makes_quit_fail(
    pop3_server, alice, ended_sessions, receiver
):
    """The record's savepoint cannot be rolled back (the transaction is lost, as after a deadlock): Django's
    atomic() would then roll QUIT back without raising. QUIT must answer -ERR (RFC 1939 s.6), delete nothing,
    announce nothing, and the lock must go with the session."""
    from django.db.models.signals import pre_save

    from popserver.models import SessionRecord
    from popserver.signals import messages_deleted

    announced = []

    def on_deleted(sender=None, **kwargs):
        announced.append(kwargs["count"])

    messages_deleted.connect(on_deleted)
    pre_save.connect(receiver, sender=SessionRecord)
    try:
        reply = dele_one_and_quit(pop3_server, ended_sessions)
    finally:
        pre_save.disconnect(receiver, sender=SessionRecord)
        messages_deleted.disconnect(on_deleted)
    assert reply.startswith(b"-ERR"), reply
    assert Message.objects.filter(mailbox=alice).count() == 3
    assert not is_locked(alice) and announced == []
    assert not SessionRecord.objects.exists()  # the session's end could not write it either


def test_the_clients_own_address_reaches_the_backend_and_the_audit(pop3_server, alice, settings):
    """README: POP3 logins call authenticate() with a request carrying the client's address."""
    from popserver.models import LoginEvent
    from tests import backends

    settings.AUTHENTICATION_BACKENDS = ["tests.backends.AddressRecordingBackend"]
    backends.seen_addresses.clear()
    for source in ("127.0.0.2", "127.0.0.3"):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((source, 0))  # any loopback address is ours: the server sees this one as the peer
        sock.connect(("127.0.0.1", pop3_server.port))
        assert read_lines(sock, 1)[0].startswith(b"+OK")
        sock.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
        assert read_lines(sock, 3)[1:] == [b"+OK Logged in.", b"+OK Logging out."]
        sock.close()
    assert backends.seen_addresses == ["127.0.0.2", "127.0.0.3"]
    peers = wait_for(
        lambda: list(LoginEvent.objects.order_by("id").values_list("peer_ip", flat=True)) or None
    )
    assert peers == ["127.0.0.2", "127.0.0.3"]
