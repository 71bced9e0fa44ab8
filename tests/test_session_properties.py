"""Property-based tests of the engine: random command sequences and random bytes.

Whatever arrives: no exception escapes ``receive()``, every reply line starts with ``+OK``, ``-ERR`` or ``+ ``
or belongs to a well-formed multi-line body, framing does not depend on how the bytes were split, and the
maildrop is committed only by a QUIT in TRANSACTION.
"""

from __future__ import annotations

import base64
from itertools import pairwise

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from popserver.protocol.session import Pop3Session, State
from popserver.testing import MemoryAuthenticator, MemoryMaildrop
from tests.test_session import MESSAGES

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MESSAGES_PLUS = [*MESSAGES, b".\r\n..\r\n", b"H: v\r\n\r\n" + b".x\r\n" * 30 + b"end"]
MULTI_LINE_VERBS = {b"CAPA", b"LIST", b"UIDL", b"RETR", b"TOP", b"AUTH"}
NO_ARG_MULTI_LINE = {b"LIST", b"UIDL", b"AUTH"}  # multi-line only without an argument

VERBS = [
    b"USER",
    b"PASS",
    b"AUTH",
    b"STLS",
    b"CAPA",
    b"QUIT",
    b"STAT",
    b"LIST",
    b"RETR",
    b"TOP",
    b"DELE",
    b"RSET",
    b"NOOP",
    b"UIDL",
    b"APOP",
    b"XYZ",
    b"",
]
ARGS = [
    b"",
    b"1",
    b"2",
    b"3",
    b"5",
    b"0",
    b"-1",
    b"x",
    b"99999999999",
    b"1 0",
    b"2 1",
    b"5 3",
    b"1 x",
    b"alice",
    b"secret",
    b"PLAIN",
    b"LOGIN",
    b"PLAIN =",
    b"plain " + base64.b64encode(b"\0alice\0secret"),
    b"*",
]
GOOD = [
    b"USER alice",
    b"PASS secret",
    b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret"),
    base64.b64encode(b"alice"),
    base64.b64encode(b"secret"),
    base64.b64encode(b"\0alice\0secret"),
    b"*",
]


def case(verb: bytes, flags: int) -> bytes:
    return bytes(
        c ^ 0x20 if (flags >> (i % 8)) & 1 and 0x41 <= (c & ~0x20) <= 0x5A else c for i, c in enumerate(verb)
    )


USEFUL = [
    b"RETR 1",
    b"RETR 2",
    b"RETR 4",
    b"RETR 5",
    b"TOP 5 2",
    b"TOP 4 0",
    b"TOP 2 1",
    b"DELE 1",
    b"DELE 5",
    b"LIST",
    b"UIDL",
    b"STAT",
    b"RSET",
    b"NOOP",
    b"CAPA",
    b"QUIT",
    b"STLS",
    b"AUTH",
]
any_command = st.builds(
    lambda verb, flags, arg: case(verb, flags) + (b" " + arg if arg else b""),
    st.sampled_from(VERBS),
    st.integers(0, 255),
    st.sampled_from(ARGS),
)
command_lines = st.one_of(
    st.sampled_from(GOOD),
    st.sampled_from(USEFUL),
    st.sampled_from(USEFUL),
    any_command,
    any_command,
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.builds(lambda n: b"N" * n, st.integers(500, 520)),
)
lines = st.lists(
    st.tuples(command_lines, st.sampled_from([b"\r\n", b"\n"])).map(lambda t: t[0] + t[1]), max_size=40
)
LOGINS = [
    [],
    [b"USER alice\r\n", b"PASS secret\r\n"],
    [b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n"],
    [b"AUTH LOGIN\r\n", base64.b64encode(b"alice") + b"\r\n", base64.b64encode(b"secret") + b"\r\n"],
]
scripts = st.tuples(st.sampled_from(LOGINS), lines).map(lambda t: t[0] + t[1])  # mostly logged in
session_options = st.fixed_dictionaries(
    {
        "plaintext_allowed": st.sampled_from([True, True, True, False]),
        "tls_available": st.booleans(),
        "tls_active": st.booleans(),
    }
)


def new_session(options: dict[str, bool], chunk_size: int) -> tuple[Pop3Session, MemoryMaildrop]:
    maildrop = MemoryMaildrop(MESSAGES_PLUS, chunk_size=chunk_size)
    session = Pop3Session(MemoryAuthenticator({"alice": ("secret", maildrop)}), peer="test", **options)
    return session, maildrop


def check_multi_line(body: bytes) -> None:
    """A multi-line body after its status line: CRLF lines, stuffed, ending with the lone "."."""
    assert body.endswith(b".\r\n")
    content = body[:-3]
    assert content == b"" or content.endswith(b"\r\n")
    for line in content.split(b"\r\n")[:-1]:
        assert line != b"."
        assert not line.startswith(b".") or line.startswith(b"..")


def check_reply(line: bytes, out: bytes, in_continuation: bool) -> None:
    assert out.endswith(b"\r\n")
    first, _, rest = out.partition(b"\r\n")
    assert first.startswith((b"+OK", b"-ERR", b"+ "))
    assert len(first) + 2 <= 512
    words = line.rstrip(b"\r\n").split(b" ")
    verb, has_args = words[0].upper(), any(words[1:])
    multi = (
        not in_continuation
        and first.startswith(b"+OK")
        and verb in MULTI_LINE_VERBS
        and not (verb in NO_ARG_MULTI_LINE and has_args)
    )
    if multi:
        check_multi_line(rest)
    else:
        for reply in rest.split(b"\r\n")[:-1]:
            assert reply.startswith((b"+OK", b"-ERR", b"+ ")), reply


@given(scripts, session_options, st.integers(1, 40))
@SETTINGS
def test_random_command_sequences(script, options, chunk_size):
    session, maildrop = new_session(options, chunk_size)
    assert session.greeting().startswith(b"+OK ")
    commits = 0
    for line in script:
        was_closed, was_state = session.closed, session.state
        in_continuation = session.expecting_continuation
        out = b"".join(session.receive(line))
        if was_closed:
            assert out == b""
            continue
        check_reply(line, out, in_continuation)
        if maildrop.commit_calls != commits:
            # Only a QUIT in TRANSACTION commits, once.
            assert (maildrop.commit_calls, commits) == (1, 0)
            verb = line.rstrip(b"\r\n").split(b" ", 1)[0]  # "QUIT now" is a QUIT too, as in Dovecot
            assert verb.upper() == b"QUIT" and not in_continuation
            assert was_state is State.TRANSACTION
            assert session.closed and session.state is State.UPDATE
            commits = 1
        if session.wants_tls:
            assert out.endswith(b"+OK Begin TLS negotiation now.\r\n")
            session.tls_started()
    event(f"ended in {session.state.name}, {maildrop.commit_calls} commits, {len(maildrop.read_calls)} reads")
    session.abandon()
    assert maildrop.commit_calls == commits
    assert maildrop.commit_calls + maildrop.release_calls <= 1
    if maildrop.commit_calls == 0 and session.state is not State.AUTHORIZATION:
        assert maildrop.release_calls == 1


@given(
    st.tuples(
        st.sampled_from(LOGINS).map(b"".join),
        st.lists(st.one_of(st.binary(max_size=60), lines.map(b"".join)), max_size=8).map(b"".join),
    ).map(b"".join),
    st.lists(st.integers(0, 2000), max_size=6),
    session_options,
)
@SETTINGS
def test_random_bytes_and_any_split(data, cuts, options):
    whole, whole_md = new_session(options, 7)
    split, split_md = new_session(options, 7)
    by_line, line_md = new_session(options, 7)

    expected = b"".join(whole.receive(data))

    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    got = b""
    for a, b in pairwise(points):
        got += b"".join(split.receive(data[a:b]))
    assert got == expected  # framing does not depend on how the bytes arrive

    # Line by line, each reply can be checked against the line that caused it.
    per_line = b""
    segments = data.split(b"\n")
    for index, segment in enumerate(segments):
        chunk = segment + b"\n" if index < len(segments) - 1 else segment
        in_continuation = by_line.expecting_continuation
        closed = by_line.closed or by_line.wants_tls
        out = b"".join(by_line.receive(chunk))
        per_line += out
        if closed:
            assert out == b""
        elif out and chunk.endswith(b"\n") and len(chunk) <= (8192 if in_continuation else 512):
            check_reply(chunk, out, in_continuation)
        elif out:
            assert out.startswith(b"-ERR Input line too long.\r\n")
    assert per_line == expected
    for md in (whole_md, split_md, line_md):
        assert md.commit_calls == whole_md.commit_calls <= 1
    for session in (whole, split, by_line):
        assert (session.closed, session.wants_tls, session.state) == (
            whole.closed,
            whole.wants_tls,
            whole.state,
        )


@given(st.binary(max_size=3000))
@SETTINGS
def test_raw_garbage_never_logs_in_or_commits(data):
    options = {"plaintext_allowed": True, "tls_available": True, "tls_active": False}
    session, maildrop = new_session(options, 5)
    # What CAPA and a bare AUTH may list before login: exactly the engine's own tags and mechanisms.
    allowed = {b".", *(tag.encode() for tag in new_session(options, 5)[0].capabilities())}
    allowed |= {mechanism.encode() for mechanism in Pop3Session.sasl_mechanisms}
    out = b"".join(session.receive(data))
    for reply in out.split(b"\r\n")[:-1]:
        if reply and not reply.startswith((b"+OK", b"-ERR", b"+ ")):
            assert reply in allowed
    assert session.state is State.AUTHORIZATION and session.username is None and session.maildrop is None
    assert maildrop.read_calls == [] and maildrop.deleted == set()
    assert maildrop.commit_calls == 0
    session.abandon()
    assert maildrop.commit_calls == 0
