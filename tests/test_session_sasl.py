"""CAPA (RFC 2449), SASL AUTH PLAIN/LOGIN (RFC 5034), STLS (RFC 2595 s.4) and the plaintext policy."""

from __future__ import annotations

import base64

import pytest

from popserver.exceptions import MailboxInUse
from popserver.protocol.commands import Command, CommandError, State, collect_commands, command
from popserver.protocol.session import Pop3Session
from tests.test_session import Client

DISALLOWED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"
FAILED = b"-ERR [AUTH] Authentication failed.\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# CAPA ------------------------------------------------------------------------------------------------
def test_capa_before_login_like_dovecot():
    c = Client(tls_available=True)
    assert c.send(b"CAPA\r\n") == (
        b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\nUSER\r\n"
        b"SASL PLAIN LOGIN\r\nUTF8 USER\r\nIMPLEMENTATION popserver\r\n.\r\n"
    )


def test_capa_without_tls():
    c = Client()
    assert c.send(b"capa\r\n") == (
        b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\n"
        b"SASL PLAIN LOGIN\r\nUTF8 USER\r\nIMPLEMENTATION popserver\r\n.\r\n"
    )


def test_capa_after_login_drops_the_login_tags():
    c = Client(tls_available=True)
    c.login()
    assert c.send(b"CAPA\r\n") == (
        b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nIMPLEMENTATION popserver\r\n.\r\n"
    )


def test_capa_when_plaintext_is_disallowed():
    c = Client(plaintext_allowed=False, tls_available=True)
    assert c.send(b"CAPA\r\n") == (
        b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nSTLS\r\n"
        b"UTF8\r\nIMPLEMENTATION popserver\r\n.\r\n"
    )


def test_capa_on_a_tls_connection():
    c = Client(tls_available=True, tls_active=True, implementation="")
    assert c.send(b"CAPA\r\n") == (
        b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN\r\n"
        b"UTF8 USER\r\n.\r\n"
    )


def test_capa_is_a_success_and_resets_the_bad_count():
    c = Client()
    c.send(b"X\r\nY\r\nCAPA\r\nX\r\nY\r\n")
    assert not c.session.closed


def test_every_verb_is_in_the_registry_with_a_named_handler():
    assert list(Pop3Session.commands) == [
        "CAPA",
        "STLS",
        "USER",
        "PASS",
        "AUTH",
        "UTF8",
        "QUIT",
        "STAT",
        "LIST",
        "RETR",
        "TOP",
        "DELE",
        "RSET",
        "NOOP",
        "UIDL",
    ]
    for verb, cmd in Pop3Session.commands.items():
        assert isinstance(cmd, Command)
        assert cmd.handler.__name__ == f"pop_{verb}"
        assert cmd.handler.__doc__


def test_every_capa_tag_names_an_implemented_feature():
    c = Client(tls_available=True)
    tags = c.session.capabilities()
    verbs_with_tags = {"CAPA", "TOP", "UIDL", "STLS", "USER"}
    assert verbs_with_tags <= set(Pop3Session.commands)
    assert {t for t in tags if " " not in t} == verbs_with_tags | set(Pop3Session.extensions)
    assert "SASL PLAIN LOGIN" in tags
    for mechanism in Pop3Session.sasl_mechanisms:
        assert c.send(b"AUTH " + mechanism.encode() + b"\r\n").startswith(b"+ ")
        c.send(b"*\r\n")


def test_a_subclass_adds_a_verb_and_capa_follows():
    class XtndSession(Pop3Session):
        @command("XTND", states={State.TRANSACTION}, capability="XTND")
        def pop_XTND(self) -> bytes:
            """An extension verb."""
            return b"+OK extended\r\n"

    assert "XTND" in XtndSession.commands and "XTND" not in Pop3Session.commands
    c = Client()
    session = XtndSession(c.auth)
    out = b"".join(session.receive(b"CAPA\r\nXTND\r\nUSER alice\r\nPASS secret\r\nXTND\r\n"))
    assert b"\r\nUIDL\r\nXTND\r\nRESP-CODES\r\n" in out
    assert b"-ERR XTND is not valid before login.\r\n" in out
    assert out.endswith(b"+OK Logged in.\r\n+OK extended\r\n")


def test_a_handler_must_be_named_after_its_verb():
    class Bad:
        @command("FOO", states={State.AUTHORIZATION})
        def foo(self) -> bytes:
            return b""

    with pytest.raises(TypeError, match="pop_FOO"):
        collect_commands(Bad)


def test_command_error_carries_its_text():
    assert CommandError("x").text == "x"


# Plaintext policy --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "line",
    [
        b"USER alice",
        b"PASS secret",
        b"AUTH",
        b"AUTH PLAIN",
        b"AUTH PLAIN " + b64(b"\0alice\0secret"),
        b"AUTH LOGIN",
    ],
)
def test_plaintext_logins_are_refused_on_an_insecure_connection(line):
    c = Client(plaintext_allowed=False)
    assert c.send(line + b"\r\n") == DISALLOWED
    assert c.auth.calls == []
    assert not c.session.expecting_continuation


def test_plaintext_refusals_are_not_bad_commands():
    # Dovecot's pop3-login: USER, PASS and AUTH refused by the policy never close the session.
    c = Client(plaintext_allowed=False)
    assert c.send(b"USER alice\r\nPASS secret\r\nAUTH\r\n" * 2) == DISALLOWED * 6
    assert not c.session.closed


def test_plaintext_allowed_after_stls():
    c = Client(plaintext_allowed=True, tls_available=True)
    assert c.send(b"STLS\r\n") == b"+OK Begin TLS negotiation now.\r\n"
    c.session.tls_started()
    c.login()


# STLS --------------------------------------------------------------------------------------------
def test_stls():
    c = Client(tls_available=True)
    assert c.send(b"STLS\r\n") == b"+OK Begin TLS negotiation now.\r\n"
    assert c.session.wants_tls
    assert not c.session.closed
    assert c.send(b"CAPA\r\n") == b""  # nothing is read until the handshake is done
    c.session.tls_started()
    assert not c.session.wants_tls
    assert c.session.tls_active
    assert c.session.state is State.AUTHORIZATION
    assert c.send(b"CAPA\r\n") == (
        b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\nUSER\r\n"
        b"SASL PLAIN LOGIN\r\nUTF8 USER\r\nIMPLEMENTATION popserver\r\n.\r\n"
    )
    assert c.send(b"STLS\r\n") == b"-ERR TLS is already active.\r\n"


def test_stls_discards_pipelined_plaintext():
    c = Client(tls_available=True)
    out = c.send(b"CAPA\r\nSTLS\r\nUSER alice\r\nPASS secret\r\nCAPA\r\nQUIT\r\n")
    assert out.endswith(b".\r\n+OK Begin TLS negotiation now.\r\n")
    assert out.count(b"+OK") == 2
    c.session.tls_started()
    assert c.session.state is State.AUTHORIZATION
    assert c.auth.calls == []
    assert not c.session.closed
    # The USER sent before the handshake was never executed: PASS has no user.
    assert c.send(b"PASS secret\r\n") == b"-ERR No username given.\r\n"


def test_stls_discards_a_partial_line_too():
    c = Client(tls_available=True)
    assert c.send(b"STLS\r\nUSER al") == b"+OK Begin TLS negotiation now.\r\n"
    c.session.tls_started()
    assert c.send(b"ice\r\n") == b"-ERR Unknown command: ICE\r\n"


def test_tls_started_forgets_the_plaintext_state():
    c = Client(tls_available=True)
    c.send(b"USER alice\r\nX\r\nY\r\nSTLS\r\n")
    c.session.tls_started()
    assert c.send(b"PASS secret\r\n") == b"-ERR No username given.\r\n"
    assert c.send(b"Z\r\n") == b"-ERR Unknown command: Z\r\n"
    assert not c.session.closed  # the bad count restarted


@pytest.mark.parametrize(
    "kwargs, reply",
    [
        ({}, b"-ERR TLS support isn't enabled.\r\n"),
        ({"tls_available": True, "tls_active": True}, b"-ERR TLS is already active.\r\n"),
    ],
)
def test_stls_unavailable(kwargs, reply):
    c = Client(**kwargs)
    assert c.send(b"STLS\r\n") == reply
    assert not c.session.wants_tls


def test_stls_ignores_extra_words_as_dovecot_does():
    c = Client(tls_available=True)
    assert c.send(b"STLS now\r\nCAPA\r\n") == b"+OK Begin TLS negotiation now.\r\n"
    assert c.session.wants_tls


# AUTH ---------------------------------------------------------------------------------------------
def test_auth_without_arguments_lists_the_mechanisms():
    c = Client()
    assert c.send(b"AUTH\r\n") == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"


@pytest.mark.parametrize("authzid", [b"", b"alice"])
def test_auth_plain_with_initial_response(authzid):
    c = Client()
    assert c.send(b"AUTH PLAIN " + b64(authzid + b"\0alice\0secret") + b"\r\n") == b"+OK Logged in.\r\n"
    assert c.session.state is State.TRANSACTION
    assert c.session.username == "alice"
    assert c.auth.calls == [("alice", "PLAIN")]


def test_auth_plain_with_a_continuation():
    c = Client()
    assert c.send(b"auth plain\r\n") == b"+ \r\n"
    assert c.session.expecting_continuation
    assert c.send(b64(b"\0alice\0secret") + b"\r\n") == b"+OK Logged in.\r\n"
    assert not c.session.expecting_continuation
    assert c.session.state is State.TRANSACTION


def test_auth_plain_password_with_spaces_and_utf8():
    c = Client()
    c.auth.add("zoë", " pass wörd ", c.maildrop)
    assert c.send(b"AUTH PLAIN " + b64("\0zoë\0 pass wörd ".encode()) + b"\r\n") == b"+OK Logged in.\r\n"


def test_auth_plain_wrong_password():
    c = Client()
    assert c.send(b"AUTH PLAIN " + b64(b"\0alice\0nope") + b"\r\n") == FAILED
    assert c.session.state is State.AUTHORIZATION
    assert not c.session.expecting_continuation
    assert c.send(b"AUTH PLAIN " + b64(b"\0alice\0nope") + b"\r\n") * 1 == FAILED
    assert c.send(b"AUTH PLAIN " + b64(b"\0alice\0nope") + b"\r\n") == FAILED
    assert not c.session.closed  # failed logins are not bad commands


def test_auth_plain_empty_initial_response_is_a_failed_login():
    c = Client()
    assert c.send(b"AUTH PLAIN =\r\n") == FAILED
    assert c.auth.calls == [("", "PLAIN")]  # refused by the authenticator: its delay and accounting apply


@pytest.mark.parametrize(
    "message", [b"alice\0secret", b"\0alice\0secret\0", b"\0", b"\0\0\0", b"no nul at all"]
)
def test_auth_plain_malformed_is_a_failed_login_as_in_dovecot(message):
    c = Client()
    assert c.send(b"AUTH PLAIN " + b64(message) + b"\r\n") == FAILED
    assert c.session.state is State.AUTHORIZATION
    assert [mechanism for _, mechanism in c.auth.calls] == ["PLAIN"]
    assert c.auth.calls[0][0] in ("", "alice")  # never the password, which "alice\0secret" puts second


def test_auth_plain_empty_user_or_non_utf8_is_a_failed_login():
    c = Client()
    assert c.send(b"AUTH PLAIN " + b64(b"\0\0secret") + b"\r\n") == FAILED
    assert c.send(b"AUTH PLAIN " + b64(b"\0alice\0s\xffcret") + b"\r\n") == FAILED
    assert c.auth.calls == [("", "PLAIN"), ("alice", "PLAIN")]  # refused there without a password check


def test_auth_plain_other_authorization_identity_is_refused():
    c = Client()
    assert c.send(b"AUTH PLAIN " + b64(b"bob\0alice\0secret") + b"\r\n") == (
        b"-ERR [AUTH] Logging in as another user is not supported.\r\n"
    )
    assert c.auth.calls == []
    assert c.session.state is State.AUTHORIZATION


@pytest.mark.parametrize("data", [b"!!!!", b"AGFsaWNlAHNlY3JldA=x", b"*x", b"a"])
def test_auth_plain_invalid_base64(data):
    c = Client()
    assert (
        c.send(b"AUTH PLAIN " + data + b"\r\n") == b"-ERR [AUTH] Invalid base64 data in initial response\r\n"
    )
    assert c.send(b"AUTH PLAIN\r\n" + data + b"\r\n") == (
        b"+ \r\n-ERR [AUTH] Invalid base64 data in continued response\r\n"
    )
    assert c.session.state is State.AUTHORIZATION
    assert not c.session.expecting_continuation


def test_auth_plain_accepts_missing_padding():
    c = Client()
    assert c.send(b"AUTH PLAIN " + b64(b"\0alice\0secret").rstrip(b"=") + b"\r\n") == b"+OK Logged in.\r\n"


def test_auth_cancelled():
    c = Client()
    assert c.send(b"AUTH PLAIN\r\n*\r\n") == b"+ \r\n-ERR Authentication aborted by client.\r\n"
    assert c.send(b"AUTH LOGIN\r\n*\r\n") == b"+ VXNlcm5hbWU6\r\n-ERR Authentication aborted by client.\r\n"
    assert c.send(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n*\r\n") == (
        b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR Authentication aborted by client.\r\n"
    )
    assert c.auth.calls == []
    assert c.session.state is State.AUTHORIZATION
    # An accepted AUTH (its "+ " challenge) resets the count, as in Dovecot: cancelling is no flood.
    assert not c.session.closed
    assert c.send(b"FOO\r\nBAR\r\nBAZ\r\n").endswith(b"-ERR Too many invalid bad commands.\r\n")


def test_auth_login():
    c = Client()
    assert c.send(b"AUTH LOGIN\r\n") == b"+ VXNlcm5hbWU6\r\n"
    assert c.session.expecting_continuation
    assert c.send(b64(b"alice") + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n"
    assert c.session.expecting_continuation
    assert c.send(b64(b"secret") + b"\r\n") == b"+OK Logged in.\r\n"
    assert c.auth.calls == [("alice", "LOGIN")]
    assert c.session.state is State.TRANSACTION


def test_auth_login_pipelined_with_initial_response():
    c = Client()
    out = c.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\nSTAT\r\n")
    assert out == b"+ UGFzc3dvcmQ6\r\n+OK Logged in.\r\n+OK 3 83\r\n"


def test_auth_login_wrong_password():
    c = Client()
    assert c.send(b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"nope") + b"\r\n") == (
        b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n" + FAILED
    )
    assert c.session.state is State.AUTHORIZATION


def test_auth_login_empty_user_fails():
    c = Client()
    assert c.send(b"AUTH LOGIN =\r\n" + b64(b"secret") + b"\r\n") == b"+ UGFzc3dvcmQ6\r\n" + FAILED
    assert c.auth.calls == [("", "LOGIN")]  # refused there without a password check


def test_auth_login_invalid_base64_in_the_password():
    c = Client()
    assert c.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n%%%\r\n") == (
        b"+ UGFzc3dvcmQ6\r\n-ERR [AUTH] Invalid base64 data in continued response\r\n"
    )
    assert not c.session.expecting_continuation


def test_auth_unknown_mechanism():
    c = Client()
    assert c.send(b"AUTH CRAM-MD5\r\n") == b"-ERR [AUTH] Unsupported authentication mechanism.\r\n"
    assert c.send(b"AUTH \xff\r\n") == b"-ERR [AUTH] Unsupported authentication mechanism.\r\n"


def test_auth_in_use_closes():
    c = Client()
    c.auth.refuse("alice", MailboxInUse())
    assert c.send(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\nCAPA\r\n") == (
        b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    )
    assert c.session.closed


def test_continuation_lines_may_be_8_kib():
    c = Client()
    c.auth.add("alice", "p" * 6000, c.maildrop)
    response = b64(b"\0alice\0" + b"p" * 6000)
    assert len(response) > 512
    assert c.send(b"AUTH PLAIN\r\n" + response + b"\r\n") == b"+ \r\n+OK Logged in.\r\n"


def test_continuation_line_of_exactly_8_kib():
    c = Client()
    # 8190 octets and CRLF: accepted (and decoded: no NULs, so a malformed message: a failed login).
    assert c.send(b"AUTH PLAIN\r\n" + b"A" * 8190 + b"\r\nCAPA\r\n").startswith(
        b"+ \r\n" + FAILED + b"+OK\r\nCAPA\r\n"
    )
    assert not c.session.expecting_continuation


def test_continuation_line_over_8_kib_closes():
    c = Client()
    assert c.send(b"AUTH PLAIN\r\n" + b"A" * 8191 + b"\r\nCAPA\r\n") == b"+ \r\n-ERR Input line too long.\r\n"
    assert c.session.closed


def test_an_initial_response_is_bounded_by_the_command_line_limit():
    c = Client()
    assert c.send(b"AUTH PLAIN " + b"A" * 600 + b"\r\n") == b"-ERR Input line too long.\r\n"


def test_continuation_lines_are_never_run_as_commands():
    c = Client()
    # "QUIT" is valid base64: it is a (malformed) PLAIN response, not a command.
    assert c.send(b"AUTH PLAIN\r\nQUIT\r\n") == b"+ \r\n" + FAILED
    assert not c.session.closed


def test_auth_after_login_is_refused():
    c = Client()
    c.login()
    assert (
        c.send(b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
        == b"-ERR AUTH is not valid after login.\r\n"
    )
