"""Bad-command budgets, line limits, pipelining, output shape, the exception boundary, expunged messages,
and what the engine logs."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator

import pytest

from popserver.protocol.wire import FLUSH

from popserver.protocol.session import Pop3Session, State
from popserver.testing import MemoryMaildrop
from tests.test_session import M1, M2, MESSAGES, PEER, Client

INTERNAL = b"-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.\r\n"


# Bad commands in a row ------------------------------------------------------------------------------
def test_three_bad_commands_before_login_close():
    c = Client()
    assert c.send(b"X\r\nY\r\nZ\r\nCAPA\r\n") == (
        b"-ERR Unknown command: X\r\n-ERR Unknown command: Y\r\n-ERR Unknown command: Z\r\n"
        b"-ERR Too many invalid bad commands.\r\n"
    )
    assert c.session.closed
    assert c.send(b"CAPA\r\n") == b""


def test_before_login_a_budget_of_commands_of_any_kind():
    """50 command lines before login (SASL responses included), then the session closes: pipelined CAPA
    floods cannot keep a thread from others' logins. After login there is no such budget."""
    c = Client()
    out = c.send(b"NOOP\r\nCAPA\r\n" * 24 + b"AUTH PLAIN\r\n*\r\n")
    assert not c.session.closed and out.count(b"\r\n-ERR") + out.startswith(b"-ERR") == 25
    assert c.send(b"CAPA\r\n") == b"-ERR Too many commands before login.\r\n"
    assert c.session.closed
    logged_in = Client()
    logged_in.login()
    logged_in.send(b"NOOP\r\n" * 200)
    assert not logged_in.session.closed


def test_a_busy_server_answers_sys_temp_and_the_session_goes_on():
    from popserver.exceptions import ServerBusy

    c = Client()
    c.login()
    real_read = c.maildrop.read

    def busy(number):
        raise ServerBusy()

    c.maildrop.read = busy
    assert c.send(b"RETR 1\r\n") == b"-ERR [SYS/TEMP] Server is busy, try again later.\r\n"
    c.maildrop.read = real_read
    assert c.send(b"RETR 1\r\n").startswith(b"+OK")


def test_before_login_only_unknown_verbs_count_as_dovecot_does():
    # Dovecot's pop3-login counts only commands it does not know (TRANSACTION verbs included); a refused
    # USER, PASS, AUTH or STLS is not a bad command, and it resets the count.
    c = Client()
    out = c.send(b"PASS x\r\nUSER\r\nAUTH FOO\r\nSTLS\r\n" * 3)
    assert out.count(b"-ERR") == 12 and not c.session.closed
    c.send(b"STAT\r\nXYZ\r\nPASS x\r\nSTAT\r\nXYZ\r\n")
    assert not c.session.closed
    assert c.send(b"RETR 1\r\n") == (
        b"-ERR RETR is not valid before login.\r\n-ERR Too many invalid bad commands.\r\n"
    )
    assert c.session.closed


def test_a_failed_login_resets_the_count_before_login():
    c = Client()
    c.send(b"X\r\nY\r\nUSER alice\r\nPASS wrong\r\nX\r\nY\r\n")
    assert not c.session.closed


def test_a_success_resets_the_count_before_login():
    c = Client()
    c.send(b"X\r\nY\r\nCAPA\r\nX\r\nY\r\n")
    assert not c.session.closed
    assert c.send(b"Z\r\n").endswith(b"-ERR Too many invalid bad commands.\r\n")


def test_more_than_twenty_bad_commands_after_login_close():
    # Dovecot's pop3: ``++bad_counter > 20``, so the 21st in a row closes.
    c = Client()
    c.login()
    c.send(b"DELE 1\r\n")
    out = c.send(b"RETR 9\r\n" * 20)
    assert out == b"-ERR There's no message 9.\r\n" * 20
    assert not c.session.closed
    assert c.send(b"LIST 0\r\nNOOP\r\n") == (b"-ERR There's no message 0.\r\n-ERR Too many bad commands.\r\n")
    assert c.session.closed
    md = c.maildrop
    assert (md.commit_calls, md.release_calls) == (0, 1)  # released at once, never committed


def test_a_success_resets_the_count_after_login():
    c = Client()
    c.login()
    c.send(b"FOO\r\n" * 19 + b"NOOP\r\n" + b"RETR 0\r\n" * 19)
    assert not c.session.closed


def test_every_kind_of_error_counts_after_login():
    c = Client()
    c.login()
    c.maildrop.expunge(2)
    c.send(b"DELE 1\r\n")
    lines = [
        b"DELE 1",
        b"RETR 2",
        b"TOP 1 x",
        b"USER a",
        b"LIST 1 2",
        b"XYZ",
        b"",
        b"A" * 600,
        b"UIDL 4",
        b"TOP 2 0",
    ]
    out = c.send(b"\r\n".join(lines * 2 + [b"RETR 2"]) + b"\r\n")
    assert out.count(b"-ERR") == 21 + 1
    assert out.endswith(b"-ERR Message 2 expunged.\r\n-ERR Too many bad commands.\r\n")
    assert c.session.closed


# Line limits -----------------------------------------------------------------------------------------
def test_a_512_octet_line_is_accepted():
    c = Client()
    c.auth.add("u" * 505, "secret", c.maildrop)
    line = b"USER " + b"u" * 505 + b"\r\n"
    assert len(line) == 512
    assert c.send(line + b"PASS secret\r\n") == b"+OK\r\n+OK Logged in.\r\n"


def test_a_513_octet_line_is_refused_and_the_session_goes_on():
    c = Client()
    line = b"USER " + b"u" * 506 + b"\r\n"
    assert len(line) == 513
    assert c.send(line + b"CAPA\r\n").startswith(b"-ERR Input line too long.\r\n+OK\r\nCAPA\r\n")
    assert not c.session.closed


def test_bare_lf_line_limit_counts_the_lf():
    c = Client()
    assert c.send(b"NOOP " + b"x" * 506 + b"\n") == b"-ERR NOOP is not valid before login.\r\n"
    assert c.send(b"NOOP " + b"x" * 507 + b"\n") == b"-ERR Input line too long.\r\n"


def test_a_long_line_arriving_in_pieces():
    c = Client()
    assert c.send(b"U" * 600) == b""
    assert c.send(b"U" * 600) == b""
    assert c.send(b"\r\nCAPA\r\n").startswith(b"-ERR Input line too long.\r\n+OK\r\n")


def test_long_lines_count_as_bad_commands():
    c = Client()
    assert c.send((b"x" * 600 + b"\r\n") * 3) == b"-ERR Input line too long.\r\n" * 3 + (
        b"-ERR Too many invalid bad commands.\r\n"
    )


def test_8_kib_without_a_line_end_closes():
    c = Client()
    for _ in range(8191):
        assert c.send(b"a") == b""
    assert not c.session.closed
    assert c.send(b"a") == b"-ERR Input line too long.\r\n"
    assert c.session.closed


def test_8_kib_without_a_line_end_closes_after_login():
    c = Client()
    c.login()
    assert c.send(b"N" * 10_000) == b"-ERR Input line too long.\r\n"
    assert c.session.closed
    assert (c.maildrop.commit_calls, c.maildrop.release_calls) == (0, 1)


def test_an_over_8_kib_line_closes_however_it_arrives():
    whole = Client()
    split = Client()
    data = b"x" * 9000 + b"\r\nCAPA\r\n"
    assert whole.send(data) == b"-ERR Input line too long.\r\n"
    assert split.send(data[:4000]) + split.send(data[4000:]) == b"-ERR Input line too long.\r\n"
    assert whole.session.closed and split.session.closed


# Line endings and pipelining -------------------------------------------------------------------------
def test_bare_lf_line_endings():
    c = Client()
    assert c.send(b"USER alice\nPASS secret\nSTAT\n") == b"+OK\r\n+OK Logged in.\r\n+OK 3 83\r\n"


def test_a_lone_cr_is_part_of_the_line():
    c = Client()
    assert c.send(b"CAPA\r\r\n") == b"-ERR Unknown command.\r\n"


def test_pipelining_gives_the_same_bytes_as_one_by_one():
    script = [
        b"CAPA",
        b"USER alice",
        b"PASS secret",
        b"STAT",
        b"LIST",
        b"UIDL",
        b"RETR 2",
        b"TOP 1 0",
        b"DELE 1",
        b"RETR 1",
        b"LIST 1",
        b"RSET",
        b"NOOP",
        b"DELE 3",
        b"QUIT",
    ]
    one_by_one = Client()
    replies = b"".join(one_by_one.send(line + b"\r\n") for line in script)
    pipelined = Client()
    assert pipelined.send(b"".join(line + b"\r\n" for line in script)) == replies
    assert pipelined.maildrop.committed == one_by_one.maildrop.committed == (3,)
    byte_by_byte = Client()
    data = b"".join(line + b"\r\n" for line in script)
    assert b"".join(byte_by_byte.send(data[i : i + 1]) for i in range(len(data))) == replies


def test_one_command_split_across_receives():
    c = Client()
    assert c.send(b"US") == b""
    assert c.send(b"ER ali") == b""
    assert c.send(b"ce\r") == b""
    assert c.send(b"\nPA") == b"+OK\r\n"
    assert c.send(b"SS secret\r\nST") == b"+OK Logged in.\r\n"
    assert c.send(b"AT\r\n") == b"+OK 3 83\r\n"


def test_receive_takes_any_bytes_like_object():
    c = Client()
    assert c.send(bytearray(b"CAPA\r\n")) == c.send(memoryview(b"CAPA\r\n"))  # type: ignore[arg-type]


def test_pipelined_replies_come_out_in_order_without_flush_marks():
    c = Client()
    c.login()
    pieces = c.pieces(b"NOOP\r\nSTAT\r\nLIST\r\nRETR 1\r\nUIDL 1\r\n" * 50)
    assert not any(p is FLUSH for p in pieces)  # only a login, an AUTH step or QUIT needs one
    assert b"".join(pieces).count(b"+OK") == 250


def test_output_before_quit_is_handed_over_before_the_commit():
    c = Client()
    c.login()
    replies = c.session.receive(b"DELE 1\r\nRETR 2\r\nQUIT\r\n")
    before = []
    for piece in replies:
        if piece is FLUSH:  # the flush mark: the server writes what it holds before the commit
            break
        before.append(piece)
    first = b"".join(before)
    assert first.startswith(b"+OK Marked to be deleted.\r\n+OK 33 octets\r\n") and first.endswith(b".\r\n")
    assert c.maildrop.commit_calls == 0
    assert next(replies) == b"+OK Logging out, messages deleted.\r\n"
    assert c.maildrop.commit_calls == 1
    assert list(replies) == []


def test_receive_is_lazy_but_buffers_at_once():
    c = Client()
    c.login()
    replies = c.session.receive(b"DELE 1\r\n")
    assert c.maildrop.deleted == set()
    assert list(replies) == [b"+OK Marked to be deleted.\r\n"]
    assert c.maildrop.deleted == {1}


def test_a_consumer_that_stops_mid_retr():
    big = b"Subject: x\r\n\r\n" + b"y" * 100_000
    closed: list[bool] = []

    class Tracking(MemoryMaildrop):
        def read(self, number: int) -> Iterator[bytes]:
            try:
                yield from super().read(number)
            finally:
                closed.append(True)

    c = Client(maildrop=Tracking([big], chunk_size=10_000))
    c.login()
    replies = c.session.receive(b"RETR 1\r\nQUIT\r\n")
    assert next(replies).startswith(b"+OK")
    replies.close()  # the connection broke while sending
    assert closed == [True]
    c.session.abandon()
    assert (c.maildrop.commit_calls, c.maildrop.release_calls) == (0, 1)


# The exception boundary ------------------------------------------------------------------------------
class Faulty(MemoryMaildrop):
    """Raises ``RuntimeError`` from read() after ``fail_after`` chunks, or from mark_deleted()."""

    fail_after: int | None = None

    def read(self, number: int) -> Iterator[bytes]:
        for index, chunk in enumerate(super().read(number)):
            if self.fail_after is not None and index >= self.fail_after:
                raise RuntimeError("storage exploded")
            yield chunk
        if self.fail_after is not None:
            raise RuntimeError("storage exploded")

    def mark_deleted(self, number: int) -> None:
        raise RuntimeError("cannot mark")


def test_an_error_before_output_is_answered_and_the_session_goes_on(caplog):
    md = Faulty(MESSAGES)
    md.fail_after = 0
    c = Client(maildrop=md)
    c.login()
    with caplog.at_level(logging.ERROR, logger="popserver.protocol"):
        assert c.send(b"RETR 1\r\nDELE 2\r\nSTAT\r\n") == INTERNAL + INTERNAL + b"+OK 3 83\r\n"
    assert not c.session.closed
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    assert all(PEER in r.getMessage() and r.exc_info for r in errors)


def test_an_error_after_output_began_closes(caplog):
    md = Faulty([b"Subject: x\r\n\r\n" + b"z" * 1000], chunk_size=100)
    md.fail_after = 5
    c = Client(maildrop=md)
    c.login()
    with caplog.at_level(logging.ERROR, logger="popserver.protocol"):
        out = c.send(b"RETR 1\r\nNOOP\r\n")
    assert out.startswith(b"+OK 1014 octets\r\nSubject: x\r\n")
    assert not out.endswith(b".\r\n")
    assert b"ERR" not in out
    assert c.session.closed
    assert (md.commit_calls, md.release_calls) == (0, 1)


def test_internal_errors_count_as_bad_commands():
    md = Faulty(MESSAGES)
    c = Client(maildrop=md)
    c.login()
    assert c.send(b"DELE 1\r\n" * 21).endswith(INTERNAL + b"-ERR Too many bad commands.\r\n")


def test_no_exception_escapes_from_a_broken_handler():
    class Broken(Pop3Session):
        def capabilities(self) -> list[str]:
            raise ZeroDivisionError

    session = Broken(Client().auth, peer=PEER)
    assert b"".join(session.receive(b"CAPA\r\n")) == INTERNAL
    assert not session.closed


# Expunged messages -------------------------------------------------------------------------------
def test_expunged_message():
    c = Client()
    c.login()
    c.maildrop.expunge(2)
    assert c.send(b"RETR 2\r\nTOP 2 0\r\nLIST 2\r\nRETR 1\r\n") == (
        b"-ERR Message 2 expunged.\r\n-ERR Message 2 expunged.\r\n+OK 2 33\r\n+OK 23 octets\r\n"
        + M1
        + b".\r\n"
    )
    assert (
        c.send(b"DELE 1\r\nQUIT\r\n")
        == b"+OK Marked to be deleted.\r\n+OK Logging out, messages deleted.\r\n"
    )
    assert c.maildrop.committed == (1,)


def test_expunged_before_anything_was_sent():
    c = Client(chunk_size=5)
    c.login()
    c.maildrop.expunge(2, after_chunks=1)  # the first chunk is held back, to go out with the status line
    assert c.send(b"RETR 2\r\nNOOP\r\n") == b"-ERR Message 2 expunged.\r\n+OK\r\n"
    assert not c.session.closed


def test_expunged_while_sending_closes():
    c = Client(chunk_size=5)
    c.login()
    c.maildrop.expunge(2, after_chunks=4)
    out = c.send(b"RETR 2\r\nNOOP\r\n")
    # Chunks 1-4 went out; the 5th read failed: the client sees the connection close.
    assert out == b"+OK 33 octets\r\n" + M2[:20].replace(b"\n.", b"\n..")
    assert c.session.closed
    assert (c.maildrop.commit_calls, c.maildrop.release_calls) == (0, 1)


def test_expunged_at_the_very_end_closes():
    c = Client(chunk_size=5)
    c.login()
    c.maildrop.expunge(2, after_chunks=7)  # all 7 chunks, then the error
    out = c.send(b"RETR 2\r\n")
    assert out.startswith(b"+OK 33 octets\r\n")
    assert not out.endswith(b"\r\n.\r\n")
    assert c.session.closed


# Logging -------------------------------------------------------------------------------------------
def test_lines_are_logged_with_passwords_masked(caplog):
    c = Client()
    c.auth.add("bob", "hunter2 pw", c.maildrop)
    plain = base64.b64encode(b"\0bob\0hunter2 pw")
    with caplog.at_level(logging.DEBUG, logger="popserver.protocol"):
        c.send(b"USER bob\r\nPASS hunter2 pw\r\n")
        c2 = Client()
        c2.auth.add("bob", "hunter2 pw", c2.maildrop)
        c2.send(b"AUTH PLAIN " + plain + b"\r\n")
        c3 = Client()
        c3.auth.add("bob", "hunter2 pw", c3.maildrop)
        c3.send(b"AUTH PLAIN\r\n" + plain + b"\r\n")
        c4 = Client()
        c4.auth.add("bob", "hunter2 pw", c4.maildrop)
        c4.send(
            b"AUTH LOGIN " + base64.b64encode(b"bob") + b"\r\n" + base64.b64encode(b"hunter2 pw") + b"\r\n"
        )
    messages = [r.getMessage() for r in caplog.records]
    text = "\n".join(messages)
    assert "hunter2" not in text
    assert plain.decode() not in text
    assert base64.b64encode(b"hunter2 pw").decode() not in text
    assert f"{PEER} C: USER bob" in messages
    assert f"{PEER} C: PASS ***" in messages
    assert f"{PEER} C: AUTH PLAIN ***" in messages
    assert f"{PEER} C: ***" in messages
    assert f"{PEER} S: +OK Logged in." in messages
    assert all(c.session.state is State.TRANSACTION for c in (c, c2, c3, c4))


def test_nothing_is_logged_above_debug_in_a_normal_session(caplog):
    c = Client()
    with caplog.at_level(logging.INFO, logger="popserver.protocol"):
        c.send(b"CAPA\r\nUSER alice\r\nPASS secret\r\nLIST\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n")
    assert caplog.records == []


@pytest.mark.parametrize("verb", [b"pass", b"Pass"])
def test_pass_is_masked_in_any_case(caplog, verb):
    c = Client()
    with caplog.at_level(logging.DEBUG, logger="popserver.protocol"):
        c.send(b"USER alice\r\n" + verb + b" secret\r\n")
    assert "secret" not in "\n".join(r.getMessage() for r in caplog.records)


def test_stats_of_a_session():
    c = Client(messages=[M1, M2])
    c.send(b"USER alice\r\nPASS secret\r\nRETR 1\r\nRETR 1\r\nTOP 2 0\r\nDELE 2\r\nQUIT\r\n")
    s = c.session.stats
    assert (s.messages, s.mailbox_size) == (2, 56)
    assert (s.retr_count, s.retr_bytes, s.top_count, s.top_bytes) == (2, 46, 1, 16)
    assert (s.deleted_count, s.deleted_bytes) == (1, 33)


def test_a_long_password_is_not_a_long_command():
    # Django allows passwords far beyond 512 octets; PASS takes the rest of the line.
    c = Client()
    password = "p" * 3000
    c.auth.add("longpw", password, MemoryMaildrop([]))
    assert c.send(b"USER longpw\r\nPASS " + password.encode() + b"\r\n") == b"+OK\r\n+OK Logged in.\r\n"


def test_capa_before_login_is_built_once_while_what_it_depends_on_stays(monkeypatch):
    c = Client(tls_available=True)
    built = []
    capabilities = c.session.capabilities
    monkeypatch.setattr(c.session, "capabilities", lambda: built.append(1) or capabilities())
    first = c.send(b"CAPA\r\n")
    assert b"STLS\r\n" in first and b"USER\r\n" in first
    assert c.send(b"CAPA\r\n" * 3) == first * 3 and len(built) == 1
    c.session.plaintext_allowed = False  # as after a policy change: no USER, no SASL
    changed = c.send(b"CAPA\r\n")
    assert b"USER\r\n" not in changed and b"STLS\r\n" in changed and len(built) == 2
    c.session.plaintext_allowed = True
    assert c.send(b"CAPA\r\n") == first
    c.login()
    after = c.send(b"CAPA\r\n")
    assert b"UIDL\r\n" in after and b"USER\r\n" not in after
