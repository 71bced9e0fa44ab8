"""The engine's read-ahead hint for pipelined RETR and TOP (RFC 2449 PIPELINING), in memory.

The session names the messages that pipelined RETR/TOP commands already received will read, so the maildrop
can read small ones in one query (``OrmMaildrop.prefetch``; tests on the database in test_maildrop_orm.py).
"""

from popserver.protocol.session import Pop3Session
from popserver.protocol.wire import stuff_message
from popserver.testing import MemoryAuthenticator, MemoryMaildrop

BODIES = [f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() for n in range(1, 11)]


def session_with(maildrop: MemoryMaildrop) -> Pop3Session:
    session = Pop3Session(MemoryAuthenticator({"alice": ("secret", maildrop)}))
    assert b"".join(session.receive(b"USER alice\r\nPASS secret\r\n")).endswith(b"+OK Logged in.\r\n")
    return session


def retr_reply(number: int) -> bytes:
    body = BODIES[number - 1]
    return f"+OK {len(body)} octets\r\n".encode() + stuff_message(body)


def test_pipelined_retrs_are_announced_once_in_order():
    maildrop = MemoryMaildrop(BODIES)
    session = session_with(maildrop)
    out = b"".join(session.receive(b"RETR 3\r\nRETR 1\r\nretr 2\r\nTOP 4 0\r\n"))
    assert maildrop.prefetch_calls == [(3, 1, 2, 4)]
    assert out.startswith(retr_reply(3) + retr_reply(1) + retr_reply(2) + b"+OK\r\n")


def test_a_lone_retr_announces_nothing():
    maildrop = MemoryMaildrop(BODIES)
    session = session_with(maildrop)
    assert b"".join(session.receive(b"RETR 1\r\n")) == retr_reply(1)
    assert b"".join(session.receive(b"RETR 2\r\n")) == retr_reply(2)
    assert maildrop.prefetch_calls == []


def test_invalid_deleted_and_other_commands_are_not_named_and_quit_ends_the_scan():
    maildrop = MemoryMaildrop(BODIES)
    session = session_with(maildrop)
    assert b"".join(session.receive(b"DELE 5\r\n")) == b"+OK Marked to be deleted.\r\n"
    lines = (
        b"RETR 1\r\nDELE 1\r\nRETR 5\r\nRETR 0\r\nRETR 99\r\nRETR x\r\nNOOP\r\nTOP 2 1\r\nQUIT\r\nRETR 3\r\n"
    )
    out = b"".join(session.receive(lines))
    assert maildrop.prefetch_calls == [(1, 2)]
    assert b"-ERR Message is deleted.\r\n" in out and out.endswith(b"+OK Logging out, messages deleted.\r\n")


def test_the_next_batch_is_announced_after_what_the_maildrop_took():
    maildrop = MemoryMaildrop(BODIES)
    maildrop.prefetch_takes = 3
    session = session_with(maildrop)
    out = b"".join(session.receive(b"".join(b"RETR %d\r\n" % n for n in range(1, 11))))
    # 10 alone is not worth announcing
    assert maildrop.prefetch_calls == [tuple(range(1, 11)), tuple(range(4, 11)), tuple(range(7, 11))]
    assert out == b"".join(retr_reply(n) for n in range(1, 11))


def test_commands_split_across_reads_are_announced_when_complete():
    maildrop = MemoryMaildrop(BODIES)
    session = session_with(maildrop)
    out = b"".join(session.receive(b"RETR 1\r\nRETR 2\r\nRE"))
    out += b"".join(session.receive(b"TR 3\r\nRETR 4\r\n"))
    assert maildrop.prefetch_calls == [(1, 2), (3, 4)]
    assert out == b"".join(retr_reply(n) for n in (1, 2, 3, 4))


def test_read_ahead_looks_at_a_bounded_number_of_lines():
    maildrop = MemoryMaildrop(BODIES)
    session = session_with(maildrop)
    session.read_ahead_lines = 4
    b"".join(session.receive(b"RETR 1\r\nNOOP\r\nNOOP\r\nRETR 2\r\nRETR 3\r\nRETR 4\r\n"))
    assert maildrop.prefetch_calls == [(1, 2), (3, 4)]
