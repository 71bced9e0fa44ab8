"""The POP3 engine against the in-memory maildrop: exact bytes for every RFC 1939 command and error path.

No sockets and no database. The helpers at the top are shared with the other ``test_session_*`` modules.
"""

from __future__ import annotations

import logging

import pytest

from popserver.exceptions import CommitFailed, MailboxInUse, TemporaryLoginFailure
from popserver.protocol.session import Pop3Session, State
from popserver.testing import MemoryAuthenticator, MemoryMaildrop

PEER = "192.0.2.7:40000"

M1 = b"Subject: one\r\n\r\nfirst\r\n"  # 23 octets
M2 = b"Subject: two\r\n\r\n.dot line\r\n.\r\nend"  # 33 octets, no final line end
M3 = b"Subject: three\n\nbare lf\n"  # 24 on disk, 27 presented
MESSAGES = [M1, M2, M3]
SIZES = [23, 33, 27]


class Client:
    """Drives a ``Pop3Session`` in memory; ``send()`` returns every byte the session answers."""

    def __init__(
        self,
        messages: list[bytes] | None = None,
        *,
        maildrop: MemoryMaildrop | None = None,
        chunk_size: int = 64 * 1024,
        **session_kwargs: object,
    ) -> None:
        self.maildrop = maildrop or MemoryMaildrop(
            MESSAGES if messages is None else messages, chunk_size=chunk_size
        )
        self.auth = MemoryAuthenticator({"alice": ("secret", self.maildrop)})
        self.session = Pop3Session(self.auth, peer=PEER, **session_kwargs)  # type: ignore[arg-type]

    def send(self, data: bytes) -> bytes:
        return b"".join(self.session.receive(data))

    def pieces(self, data: bytes) -> list[bytes]:
        return list(self.session.receive(data))

    def login(self) -> None:
        assert self.send(b"USER alice\r\nPASS secret\r\n") == b"+OK\r\n+OK Logged in.\r\n"
        assert self.session.state is State.TRANSACTION


@pytest.fixture
def client() -> Client:
    return Client()


@pytest.fixture
def logged_in(client: Client) -> Client:
    client.login()
    return client


# Greeting and AUTHORIZATION ------------------------------------------------------------------------------
def test_presented_sizes_of_the_test_messages():
    assert [info.size for info in MemoryMaildrop(MESSAGES).messages] == SIZES


def test_greeting(client):
    assert client.session.greeting() == b"+OK popserver ready.\r\n"
    assert Pop3Session(client.auth, greeting="Hi there.").greeting() == b"+OK Hi there.\r\n"
    assert client.session.state is State.AUTHORIZATION
    assert not client.session.closed


def test_user_pass_logs_in(client):
    assert client.send(b"USER alice\r\n") == b"+OK\r\n"
    assert client.send(b"PASS secret\r\n") == b"+OK Logged in.\r\n"
    assert client.session.state is State.TRANSACTION
    assert client.session.username == "alice"
    assert client.session.maildrop is client.maildrop
    assert client.auth.calls == [("alice", "USER")]
    assert client.session.stats.messages == 3
    assert client.session.stats.mailbox_size == sum(SIZES)


def test_verbs_are_case_insensitive(client):
    assert client.send(b"user alice\r\npAsS secret\r\nsTaT\r\n") == b"+OK\r\n+OK Logged in.\r\n+OK 3 83\r\n"


def test_pass_without_user(client):
    assert client.send(b"PASS secret\r\n") == b"-ERR No username given.\r\n"
    assert client.auth.calls == []


@pytest.mark.parametrize(
    "user, password",
    [(b"alice", b"wrong"), (b"nobody", b"secret"), (b"alice", b"secret "), (b"ALICE", b"secret")],
)
def test_wrong_credentials_get_one_reply(client, user, password):
    assert client.send(b"USER " + user + b"\r\nPASS " + password + b"\r\n") == (
        b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
    )
    assert client.session.state is State.AUTHORIZATION
    assert not client.session.closed
    assert client.session.username is None


def test_a_failed_pass_forgets_the_user(client):
    assert client.send(b"USER alice\r\nPASS wrong\r\nPASS secret\r\n") == (
        b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n-ERR No username given.\r\n"
    )


def test_failed_logins_are_not_bad_commands(client):
    assert client.send(b"USER alice\r\nPASS wrong\r\n" * 5) == (
        b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n" * 5
    )
    assert not client.session.closed
    client.login()


def test_failed_login_does_not_reset_the_bad_command_count(client):
    out = client.send(b"FOO\r\nBAR\r\nUSER alice\r\nPASS wrong\r\n")
    assert out.endswith(b"-ERR [AUTH] Authentication failed.\r\n")
    # USER succeeded (+OK), so the count restarted there: two more bad ones are allowed, the third closes.
    assert client.send(b"X\r\nY\r\n") == b"-ERR Unknown command: X\r\n-ERR Unknown command: Y\r\n"
    assert not client.session.closed
    assert client.send(b"Z\r\n") == b"-ERR Unknown command: Z\r\n-ERR Too many invalid bad commands.\r\n"


def test_pass_takes_the_rest_of_the_line():
    c = Client()
    c.auth.add("bob", "  two  spaces and\ttab ", c.maildrop)
    assert c.send(b"USER bob\r\nPASS   two  spaces and\ttab \r\n") == b"+OK\r\n+OK Logged in.\r\n"


def test_pass_with_an_empty_password_is_a_login_attempt(client):
    assert client.send(b"USER alice\r\nPASS \r\n") == b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
    assert client.auth.calls == [("alice", "USER")]


def test_pass_with_no_argument_is_a_syntax_error(client):
    assert (
        client.send(b"USER alice\r\nPASS\r\n") == b"+OK\r\n-ERR Missing argument. Syntax: PASS password\r\n"
    )
    # The syntax error does not forget the user.
    assert client.send(b"PASS secret\r\n") == b"+OK Logged in.\r\n"


def test_utf8_credentials():
    c = Client()
    c.auth.add("zoë", "pässwörd 🔑", c.maildrop)
    assert c.send("USER zoë\r\nPASS pässwörd 🔑\r\n".encode()) == b"+OK\r\n+OK Logged in.\r\n"
    assert c.session.username == "zoë"


@pytest.mark.parametrize("line", [b"USER alice\r\nPASS s\xffcret\r\n", b"USER al\xe9ce\r\nPASS secret\r\n"])
def test_credentials_that_are_not_utf8_are_just_wrong(client, line):
    assert client.send(line) == b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n"
    # No credential can match, but the authenticator refuses them itself (delay, throttle, audit).
    assert [mechanism for _, mechanism in client.auth.calls] == ["USER"]
    assert not client.session.closed


def test_mailbox_in_use_closes(client):
    client.auth.refuse("alice", MailboxInUse())
    out = client.send(b"USER alice\r\nPASS secret\r\nCAPA\r\n")
    assert out == b"+OK\r\n-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    assert client.session.closed
    assert client.session.state is State.AUTHORIZATION
    assert client.send(b"NOOP\r\n") == b""


def test_temporary_login_failure_goes_on(client):
    client.auth.refuse("alice", TemporaryLoginFailure())
    out = client.send(b"USER alice\r\nPASS secret\r\n")
    assert out == b"+OK\r\n-ERR [SYS/TEMP] Temporary authentication failure, try again later.\r\n"
    assert not client.session.closed


def test_authenticator_crash_is_an_internal_error(client, caplog):
    def broken(username, password, *, mechanism):
        raise RuntimeError("database is on fire")

    session = Pop3Session(broken, peer=PEER)
    with caplog.at_level(logging.ERROR, logger="popserver.protocol"):
        out = b"".join(session.receive(b"USER alice\r\nPASS secret\r\n"))
    assert out == (
        b"+OK\r\n-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.\r\n"
    )
    assert not session.closed
    assert b"RuntimeError" not in out and b"fire" not in out
    assert any(PEER in r.getMessage() and r.exc_info for r in caplog.records)


def test_quit_in_authorization(client):
    assert client.send(b"QUIT\r\n") == b"+OK Logging out\r\n"  # Dovecot's pop3-login: no full stop
    assert client.session.closed
    assert client.maildrop.commit_calls == 0
    assert client.maildrop.release_calls == 0


def test_quit_after_user_only(client):
    assert client.send(b"USER alice\r\nQUIT\r\n") == b"+OK\r\n+OK Logging out\r\n"
    assert client.auth.calls == []


@pytest.mark.parametrize(
    "line, verb",
    [
        (b"STAT", "STAT"),
        (b"LIST", "LIST"),
        (b"LIST 1", "LIST"),
        (b"RETR 1", "RETR"),
        (b"TOP 1 0", "TOP"),
        (b"DELE 1", "DELE"),
        (b"RSET", "RSET"),
        (b"NOOP", "NOOP"),
        (b"UIDL", "UIDL"),
        (b"uidl 1", "UIDL"),
    ],
)
def test_transaction_verbs_before_login(client, line, verb):
    assert client.send(line + b"\r\n") == f"-ERR {verb} is not valid before login.\r\n".encode()
    assert client.maildrop.read_calls == []


@pytest.mark.parametrize("line, verb", [(b"USER alice", "USER"), (b"PASS secret", "PASS"), (b"AUTH", "AUTH")])
def test_authorization_verbs_after_login(logged_in, line, verb):
    assert logged_in.send(line + b"\r\n") == f"-ERR {verb} is not valid after login.\r\n".encode()
    assert logged_in.auth.calls == [("alice", "USER")]


def test_stls_after_login_is_refused():
    c = Client(tls_available=True)
    c.login()
    assert c.send(b"STLS\r\n") == b"-ERR STLS is not valid after login.\r\n"
    assert not c.session.wants_tls


def test_unknown_command(client):
    assert client.send(b"XYZZY\r\n") == b"-ERR Unknown command: XYZZY\r\n"
    assert client.send(b"apop alice 0123\r\n") == b"-ERR Unknown command: APOP\r\n"


def test_unknown_command_echo_is_sanitised(client):
    assert client.send(b"X\x00\x1b[31m\xffY arg\r\n") == b"-ERR Unknown command.\r\n"  # never echoed
    assert client.send(b"PASS\tsecret\r\n") == b"-ERR Unknown command.\r\n"  # not a secret echoed back
    assert client.send(b"xyzzy\r\n").startswith(b"-ERR Unknown command: XYZZY\r\n")


def test_a_long_unknown_verb_is_not_echoed(client):
    assert client.send(b"A" * 300 + b"\r\n") == b"-ERR Unknown command.\r\n"


def test_empty_line(client):
    assert client.send(b"\r\n") == b"-ERR Empty command.\r\n"
    assert client.send(b" STAT\r\n") == b"-ERR Empty command.\r\n"


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"USER", b"-ERR Missing argument. Syntax: USER name"),
        (b"USER ", b"-ERR Missing argument. Syntax: USER name"),
        (b"USER \t ", b"-ERR Missing argument. Syntax: USER name"),
        (b"AUTH PLAIN x y", b"-ERR Too many arguments. Syntax: AUTH [mechanism [initial-response]]"),
    ],
)
def test_authorization_arity(client, line, reply):
    assert client.send(line + b"\r\n") == reply + b"\r\n"
    assert not client.session.closed


def test_user_takes_the_rest_of_the_line_as_dovecot_does(client):
    client.auth.add("Ann Smith", "pw", client.maildrop)
    assert client.send(b"USER  Ann Smith \r\nPASS pw\r\n") == b"+OK\r\n+OK Logged in.\r\n"
    assert client.session.username == "Ann Smith"


def test_verbs_without_arguments_ignore_extra_words_as_dovecot_does(client):
    assert client.send(b"CAPA now\r\n").startswith(b"+OK\r\nCAPA\r\n")
    client.send(b"USER alice\r\nPASS secret\r\nDELE 1\r\n")
    assert client.send(b"STAT 1\r\nNOOP x\r\nRSET x\r\n") == b"+OK 2 60\r\n+OK\r\n+OK\r\n"
    assert client.send(b"QUIT now\r\n") == b"+OK Logging out.\r\n"  # RSET undid the DELE
    assert client.session.state is State.UPDATE


# TRANSACTION -----------------------------------------------------------------------------------------
def test_stat(logged_in):
    assert logged_in.send(b"STAT\r\n") == b"+OK 3 83\r\n"


def test_list(logged_in):
    assert logged_in.send(b"LIST\r\n") == b"+OK 3 messages:\r\n1 23\r\n2 33\r\n3 27\r\n.\r\n"
    assert logged_in.send(b"LIST 2\r\n") == b"+OK 2 33\r\n"
    assert logged_in.send(b"LIST 02\r\n") == b"+OK 2 33\r\n"


def test_uidl(logged_in):
    assert logged_in.send(b"UIDL\r\n") == (b"+OK\r\n1 mem00000001\r\n2 mem00000002\r\n3 mem00000003\r\n.\r\n")
    assert logged_in.send(b"UIDL 3\r\n") == b"+OK 3 mem00000003\r\n"


def test_uidl_with_given_uids():
    maildrop = MemoryMaildrop([M1, M2], uids=["a" * 70, ".starts-with-dot"])
    c = Client(maildrop=maildrop)
    c.login()
    assert c.send(b"UIDL\r\n") == b"+OK\r\n1 " + b"a" * 70 + b"\r\n2 .starts-with-dot\r\n.\r\n"


def test_retr(logged_in):
    assert logged_in.send(b"RETR 1\r\n") == b"+OK 23 octets\r\nSubject: one\r\n\r\nfirst\r\n.\r\n"
    assert logged_in.send(b"RETR 2\r\n") == (
        b"+OK 33 octets\r\nSubject: two\r\n\r\n..dot line\r\n..\r\nend\r\n.\r\n"
    )
    assert logged_in.send(b"RETR 3\r\n") == b"+OK 27 octets\r\nSubject: three\r\n\r\nbare lf\r\n.\r\n"
    assert logged_in.maildrop.read_calls == [1, 2, 3]
    stats = logged_in.session.stats
    assert (stats.retr_count, stats.retr_bytes) == (3, 83)


def test_retr_may_be_repeated(logged_in):
    once = logged_in.send(b"RETR 2\r\n")
    assert logged_in.send(b"RETR 2\r\n") == once


def test_top(logged_in):
    assert logged_in.send(b"TOP 2 0\r\n") == b"+OK\r\nSubject: two\r\n\r\n.\r\n"
    assert logged_in.send(b"TOP 2 1\r\n") == b"+OK\r\nSubject: two\r\n\r\n..dot line\r\n.\r\n"
    assert logged_in.send(b"TOP 2 2\r\n") == b"+OK\r\nSubject: two\r\n\r\n..dot line\r\n..\r\n.\r\n"
    assert logged_in.send(b"TOP 2 3\r\n") == b"+OK\r\nSubject: two\r\n\r\n..dot line\r\n..\r\nend\r\n.\r\n"
    assert logged_in.send(b"TOP 2 99999999999999999999\r\n") == (
        b"+OK\r\nSubject: two\r\n\r\n..dot line\r\n..\r\nend\r\n.\r\n"
    )
    stats = logged_in.session.stats
    assert (stats.top_count, stats.top_bytes, stats.retr_count) == (5, 16 + 27 + 30 + 33 + 33, 0)


@pytest.mark.parametrize("lines", [b"-1", b"x", b"1.5", b"+1", b"123456789012345678901"])
def test_top_invalid_line_count(logged_in, lines):
    assert logged_in.send(b"TOP 1 " + lines + b"\r\n") == b"-ERR Invalid number of lines: " + lines + b"\r\n"


def test_dele_rset(logged_in):
    assert logged_in.send(b"DELE 2\r\n") == b"+OK Marked to be deleted.\r\n"
    assert logged_in.send(b"STAT\r\n") == b"+OK 2 50\r\n"
    assert logged_in.send(b"LIST\r\n") == b"+OK 2 messages:\r\n1 23\r\n3 27\r\n.\r\n"
    assert logged_in.send(b"UIDL\r\n") == b"+OK\r\n1 mem00000001\r\n3 mem00000003\r\n.\r\n"
    for line in (b"DELE 2", b"LIST 2", b"UIDL 2", b"RETR 2", b"TOP 2 0"):
        assert logged_in.send(line + b"\r\n") == b"-ERR Message is deleted.\r\n"
    assert logged_in.maildrop.read_calls == []
    assert logged_in.send(b"RSET\r\n") == b"+OK\r\n"
    assert logged_in.send(b"STAT\r\n") == b"+OK 3 83\r\n"
    assert logged_in.send(b"LIST 2\r\n") == b"+OK 2 33\r\n"


def test_message_numbers_stay_fixed_after_dele(logged_in):
    logged_in.send(b"DELE 1\r\n")
    assert logged_in.send(b"LIST 2\r\n") == b"+OK 2 33\r\n"
    assert logged_in.send(b"RETR 3\r\n").startswith(b"+OK 27 octets\r\n")


def test_noop(logged_in):
    assert logged_in.send(b"NOOP\r\n") == b"+OK\r\n"


@pytest.mark.parametrize("verb", [b"LIST", b"UIDL", b"RETR", b"DELE", b"TOP"])
@pytest.mark.parametrize(
    "arg, reply",
    [
        (b"0", b"-ERR There's no message 0."),  # Dovecot's words
        (b"-1", b"-ERR Invalid message number: -1"),
        (b"abc", b"-ERR Invalid message number: abc"),
        (b"1e3", b"-ERR Invalid message number: 1e3"),
        (b"\xff1", b"-ERR Invalid message number: ?1"),
        (b"99999999999999999999", b"-ERR Invalid message number: 99999999999999999999"),
        (b"4", b"-ERR There's no message 4."),
        (b"4294967296", b"-ERR There's no message 4294967296."),
    ],
)
def test_bad_message_numbers(logged_in, verb, arg, reply):
    line = verb + b" " + arg + (b" 1" if verb == b"TOP" else b"")
    assert logged_in.send(line + b"\r\n") == reply + b"\r\n"
    assert logged_in.maildrop.read_calls == []
    assert logged_in.maildrop.deleted == set()


@pytest.mark.parametrize(
    "line, reply",
    [
        (b"RETR", b"-ERR Missing argument. Syntax: RETR msg"),
        (b"RETR 1 2", b"-ERR Too many arguments. Syntax: RETR msg"),
        (b"DELE", b"-ERR Missing argument. Syntax: DELE msg"),
        (b"TOP 1", b"-ERR Missing argument. Syntax: TOP msg lines"),
        (b"TOP", b"-ERR Missing argument. Syntax: TOP msg lines"),
        (b"TOP 1 2 3", b"-ERR Too many arguments. Syntax: TOP msg lines"),
        (b"LIST 1 2", b"-ERR Too many arguments. Syntax: LIST [msg]"),
        (b"UIDL 1 2", b"-ERR Too many arguments. Syntax: UIDL [msg]"),
    ],
)
def test_transaction_arity(logged_in, line, reply):
    assert logged_in.send(line + b"\r\n") == reply + b"\r\n"
    assert not logged_in.session.closed


def test_extra_spaces_between_arguments_are_accepted(logged_in):
    assert logged_in.send(b"TOP  1   0 \r\n") == b"+OK\r\nSubject: one\r\n\r\n.\r\n"


# QUIT and the end of a session ---------------------------------------------------------------------------
def test_quit_commits(logged_in):
    logged_in.send(b"DELE 1\r\nDELE 3\r\n")
    assert logged_in.send(b"QUIT\r\n") == b"+OK Logging out, messages deleted.\r\n"
    md = logged_in.maildrop
    assert (md.commit_calls, md.committed, md.release_calls) == (1, (1, 3), 0)
    assert md.remaining() == [M2]
    assert logged_in.session.closed
    assert logged_in.session.state is State.UPDATE
    assert logged_in.session.maildrop is None
    stats = logged_in.session.stats
    assert (stats.deleted_count, stats.deleted_bytes) == (2, 50)


def test_quit_without_deletions_commits_nothing(logged_in):
    assert (
        logged_in.send(b"DELE 1\r\nRSET\r\nQUIT\r\n")
        == b"+OK Marked to be deleted.\r\n+OK\r\n+OK Logging out.\r\n"
    )
    assert logged_in.maildrop.committed == ()


def test_nothing_is_answered_after_quit(logged_in):
    assert logged_in.send(b"QUIT\r\nDELE 1\r\nQUIT\r\n") == b"+OK Logging out.\r\n"
    assert logged_in.maildrop.deleted == set()
    assert logged_in.maildrop.commit_calls == 1
    assert logged_in.send(b"STAT\r\n") == b""


@pytest.mark.parametrize("error", [CommitFailed("disk full"), RuntimeError("boom")])
def test_commit_failure(error, caplog):
    maildrop = MemoryMaildrop(MESSAGES, commit_error=error)
    c = Client(maildrop=maildrop)
    c.login()
    c.send(b"DELE 1\r\n")
    with caplog.at_level(logging.ERROR, logger="popserver.protocol"):
        out = c.send(b"QUIT\r\n")
    assert out == b"-ERR [SYS/TEMP] Deleting the marked messages failed; none were deleted.\r\n"
    assert b"disk" not in out and b"boom" not in out
    assert c.session.closed
    assert (maildrop.commit_calls, maildrop.committed, maildrop.release_calls) == (1, None, 1)
    assert c.session.stats.deleted_count == 0
    assert any(PEER in r.getMessage() for r in caplog.records)
    c.session.abandon()
    assert maildrop.release_calls == 1


def test_abandon_in_transaction_releases_and_never_commits(logged_in):
    logged_in.send(b"DELE 1\r\n")
    logged_in.session.abandon()
    logged_in.session.abandon()
    md = logged_in.maildrop
    assert (md.commit_calls, md.release_calls) == (0, 1)
    assert logged_in.session.closed
    assert logged_in.send(b"QUIT\r\n") == b""
    assert md.commit_calls == 0


def test_abandon_before_login(client):
    client.session.abandon()
    assert client.session.closed
    assert client.maildrop.release_calls == 0


def test_abandon_never_raises(logged_in, caplog):
    def broken_release():
        raise RuntimeError("lock table gone")

    logged_in.maildrop.release = broken_release  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, logger="popserver.protocol"):
        logged_in.session.abandon()
    assert any(r.exc_info for r in caplog.records)
    logged_in.session.abandon()


def test_abandon_after_quit_does_nothing(logged_in):
    logged_in.send(b"QUIT\r\n")
    logged_in.session.abandon()
    assert (logged_in.maildrop.commit_calls, logged_in.maildrop.release_calls) == (1, 0)


def test_each_login_reads_the_snapshot_of_its_maildrop():
    # The authenticator's factory gives a fresh maildrop per login: numbers are fixed per session.
    made: list[MemoryMaildrop] = []

    def factory() -> MemoryMaildrop:
        made.append(MemoryMaildrop(MESSAGES[: len(made) + 1]))
        return made[-1]

    auth = MemoryAuthenticator({"alice": ("secret", factory)})
    for expected in (b"+OK 1 23\r\n", b"+OK 2 56\r\n"):
        session = Pop3Session(auth)
        assert b"".join(session.receive(b"USER alice\r\nPASS secret\r\nSTAT\r\n")).endswith(expected)


def test_capa_announces_login_delay_only_when_set():
    from popserver.protocol.session import Pop3Session

    assert not any(t.startswith("LOGIN-DELAY") for t in Pop3Session(lambda *a, **k: None).capabilities())
    session = Pop3Session(lambda *a, **k: None, login_delay=300)
    assert "LOGIN-DELAY 300" in session.capabilities()
    assert b"\r\nLOGIN-DELAY 300\r\n" in b"".join(session.receive(b"CAPA\r\n"))
