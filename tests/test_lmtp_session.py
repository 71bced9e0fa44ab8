"""The LMTP engine without sockets or a database: exact bytes in, exact replies out (RFC 2033, RFC 5321)."""

import pytest

from popserver.protocol.lmtp import (
    Envelope,
    LmtpSession,
    Outcome,
    RecipientCheck,
    parse_parameters,
    split_path,
)


class MemoryHandler:
    """Recipients by address -> outcome at RCPT; ``at_data`` overrides the outcome after DATA."""

    def __init__(self, recipients=None, at_data=None, fail_check=False, fail_deliver=False):
        self.recipients = recipients if recipients is not None else {}
        self.at_data = at_data or {}
        self.fail_check, self.fail_deliver = fail_check, fail_deliver
        self.checked: list[tuple[str, int | None]] = []
        self.delivered: list[Envelope] = []

    def check_recipient(self, address, *, size):
        self.checked.append((address, size))
        if self.fail_check:
            raise RuntimeError("storage down")
        return RecipientCheck(self.recipients.get(address, Outcome.ACCEPTED), token=address.upper())

    def deliver(self, envelope):
        if self.fail_deliver:
            raise RuntimeError("storage down")
        self.delivered.append(envelope)
        return [self.at_data.get(r.address, Outcome.ACCEPTED) for r in envelope.recipients]


def talk(session, data: bytes) -> bytes:
    return b"".join(session.receive(data))


def ready(handler=None, **options) -> tuple[LmtpSession, MemoryHandler]:
    handler = handler or MemoryHandler()
    session = LmtpSession(handler, hostname="mx.test", **options)
    assert talk(session, b"LHLO client.test\r\n").startswith(b"250-mx.test\r\n")
    return session, handler


def lines(reply: bytes) -> list[bytes]:
    return reply.split(b"\r\n")[:-1]


# Greeting, LHLO -------------------------------------------------------------------------------------------
def test_greeting_is_220_with_the_hostname():
    assert (
        LmtpSession(MemoryHandler(), hostname="mx.test").greeting() == b"220 mx.test popserver LMTP ready\r\n"
    )


def test_lhlo_lists_the_extensions_and_the_size_limit():
    session = LmtpSession(MemoryHandler(), hostname="mx.test", max_message_size=1000)
    assert talk(session, b"LHLO c\r\n") == (
        b"250-mx.test\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 SIZE 1000\r\n"
    )


def test_lhlo_offers_starttls_only_while_tls_is_possible_and_not_on():
    offered = LmtpSession(MemoryHandler(), tls_available=True)
    assert b"250 STARTTLS\r\n" in talk(offered, b"LHLO c\r\n")
    active = LmtpSession(MemoryHandler(), tls_available=True, tls_active=True)
    assert b"STARTTLS" not in talk(active, b"LHLO c\r\n")


def test_lhlo_needs_a_hostname():
    session = LmtpSession(MemoryHandler())
    assert talk(session, b"LHLO\r\n") == b"501 5.5.4 Syntax: LHLO hostname\r\n"


@pytest.mark.parametrize("verb", [b"HELO", b"EHLO", b"helo"])
def test_helo_and_ehlo_are_refused_with_500(verb):
    """RFC 2033 s.4.1: an LMTP server must not accept them."""
    session = LmtpSession(MemoryHandler())
    assert talk(session, verb + b" client\r\n").startswith(b"500 5.5.1 ")


def test_lhlo_resets_the_transaction():
    session, _ = ready()
    talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    talk(session, b"LHLO again\r\n")
    assert talk(session, b"DATA\r\n") == b"503 5.5.1 MAIL needed first.\r\n"


# Sequence ---------------------------------------------------------------------------------------------------
def test_mail_needs_lhlo_first():
    session = LmtpSession(MemoryHandler())
    assert talk(session, b"MAIL FROM:<a@x>\r\n") == b"503 5.5.1 Send LHLO first.\r\n"


def test_rcpt_needs_mail_first():
    session, _ = ready()
    assert talk(session, b"RCPT TO:<a@x>\r\n") == b"503 5.5.1 MAIL needed first.\r\n"


def test_a_second_mail_in_a_transaction_is_refused():
    session, _ = ready()
    assert talk(session, b"MAIL FROM:<a@x>\r\nMAIL FROM:<a@x>\r\n") == (
        b"250 2.1.0 OK\r\n503 5.5.1 MAIL already given.\r\n"
    )


def test_data_without_an_accepted_recipient_is_503():
    """RFC 2033 s.4.2: no successful RCPT, DATA fails with 503."""
    session, _ = ready(MemoryHandler({"nobody@x": Outcome.UNKNOWN}))
    assert talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<nobody@x>\r\nDATA\r\n") == (
        b"250 2.1.0 OK\r\n550 5.1.1 <nobody@x> User doesn't exist: nobody@x\r\n503 5.5.1 No valid recipients.\r\n"
    )


def test_rset_forgets_the_transaction():
    session, _ = ready()
    assert talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRSET\r\nDATA\r\n") == (
        b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.0.0 OK\r\n503 5.5.1 MAIL needed first.\r\n"
    )


def test_noop_vrfy_and_quit():
    session, _ = ready()
    assert talk(session, b"NOOP\r\nNOOP anything\r\nVRFY alice\r\nQUIT\r\n") == (
        b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n252 2.3.3 Try RCPT instead\r\n221 2.0.0 Bye\r\n"
    )
    assert session.closed and session.quit_received


def test_verbs_are_case_insensitive():
    session, _ = ready()
    assert talk(session, b"mail from:<a@x>\r\nrcpt to:<b@x>\r\n") == b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n"


def test_commands_after_quit_are_not_run():
    session, _ = ready()
    assert talk(session, b"QUIT\r\nNOOP\r\n") == b"221 2.0.0 Bye\r\n"
    assert talk(session, b"NOOP\r\n") == b""


# MAIL FROM --------------------------------------------------------------------------------------------------
def test_null_sender_is_accepted():
    session, handler = ready()
    talk(session, b"MAIL FROM:<>\r\nRCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\n")
    assert handler.delivered[0].sender == ""


def test_mail_size_over_the_limit_is_552_5_3_4():
    """RFC 1870 s.6: a declared size over the fixed maximum is refused at MAIL."""
    session, _ = ready(max_message_size=100)
    assert talk(session, b"MAIL FROM:<a@x> SIZE=101\r\n") == (
        b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    )
    assert talk(session, b"MAIL FROM:<a@x> SIZE=100\r\n") == b"250 2.1.0 OK\r\n"


def test_declared_size_goes_to_the_recipient_check():
    session, handler = ready()
    talk(session, b"MAIL FROM:<a@x> SIZE=1234 BODY=8BITMIME\r\nRCPT TO:<b@x>\r\n")
    assert handler.checked == [("b@x", 1234)]


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (b"SIZE=abc", b"501 5.5.4 Invalid SIZE parameter.\r\n"),
        (b"SIZE", b"501 5.5.4 Invalid SIZE parameter.\r\n"),
        (b"BODY=BINARYMIME", b"501 5.5.4 Unsupported BODY parameter.\r\n"),
        (b"SMTPUTF8", b"555 5.5.4 Unsupported parameter: SMTPUTF8\r\n"),
        (b"BAD=\x01", b"501 5.5.4 Invalid parameters.\r\n"),
    ],
)
def test_mail_parameters_that_are_not_supported(parameters, expected):
    session, _ = ready()
    assert talk(session, b"MAIL FROM:<a@x> " + parameters + b"\r\n") == expected


@pytest.mark.parametrize("body", [b"7BIT", b"8bitmime"])
def test_mail_body_parameter(body):
    session, handler = ready()
    talk(session, b"MAIL FROM:<a@x> BODY=" + body + b"\r\nRCPT TO:<b@x>\r\nDATA\r\nx\r\n.\r\n")
    assert handler.delivered[0].body == body.upper().decode()


@pytest.mark.parametrize("line", [b"MAIL FROM:a@x", b"MAIL TO:<a@x>", b"MAIL FROM:<a@x", b"MAIL FROM:<a@x>x"])
def test_malformed_mail_is_501(line):
    session, _ = ready()
    assert talk(session, line + b"\r\n").startswith(b"501 5.5.4 ")


def test_mail_allows_spaces_before_the_path():
    """Dovecot's default workaround: some clients write ``MAIL FROM: <a@x>``."""
    session, _ = ready()
    assert talk(session, b"MAIL FROM: <a@x>\r\n") == b"250 2.1.0 OK\r\n"


def test_sender_with_a_control_character_is_refused():
    session, _ = ready()
    assert talk(session, b"MAIL FROM:<a\x00@x>\r\n") == b"501 5.1.7 Invalid address.\r\n"


# RCPT TO ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("outcome", "permanent", "expected"),
    [
        (Outcome.ACCEPTED, False, b"250 2.1.5 OK"),
        (Outcome.UNKNOWN, False, b"550 5.1.1 <r@x> User doesn't exist: r@x"),
        (Outcome.OVER_QUOTA, False, b"452 4.2.2 <r@x> Quota exceeded (mailbox for user is full)"),
        (Outcome.OVER_QUOTA, True, b"552 5.2.2 <r@x> Quota exceeded (mailbox for user is full)"),
        (Outcome.TOO_BIG, False, b"552 5.3.4 <r@x> Message size exceeds fixed maximum message size"),
        (Outcome.TEMPORARY_ERROR, False, b"451 4.3.0 <r@x> Temporary internal error"),
    ],
)
def test_each_recipient_outcome_has_its_reply(outcome, permanent, expected):
    session, _ = ready(MemoryHandler({"r@x": outcome}), over_quota_permanent=permanent)
    assert talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<r@x>\r\n") == b"250 2.1.0 OK\r\n" + expected + b"\r\n"


def test_a_failing_recipient_check_is_451_and_the_session_goes_on():
    session, _ = ready(MemoryHandler(fail_check=True))
    assert talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<r@x>\r\nNOOP\r\n") == (
        b"250 2.1.0 OK\r\n451 4.3.0 <r@x> Temporary internal error\r\n250 2.0.0 OK\r\n"
    )


def test_too_many_recipients_is_452_4_5_3():
    """RFC 5321 s.4.5.3.1.10: the client sends the rest in another transaction."""
    session, handler = ready(max_recipients=2)
    reply = talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<1@x>\r\nRCPT TO:<2@x>\r\nRCPT TO:<3@x>\r\n")
    assert lines(reply)[-1] == b"452 4.5.3 Too many recipients"
    assert [address for address, _ in handler.checked] == ["1@x", "2@x"]


def test_refused_recipients_do_not_count_toward_the_recipient_limit():
    session, _ = ready(MemoryHandler({"no@x": Outcome.UNKNOWN}), max_recipients=1)
    reply = talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<no@x>\r\nRCPT TO:<no@x>\r\nRCPT TO:<ok@x>\r\n")
    assert lines(reply)[-1] == b"250 2.1.5 OK"


def test_rcpt_parameters_are_refused():
    session, _ = ready()
    talk(session, b"MAIL FROM:<a@x>\r\n")
    assert talk(session, b"RCPT TO:<r@x> NOTIFY=NEVER\r\n") == b"555 5.5.4 Unsupported parameter: NOTIFY\r\n"


def test_empty_recipient_is_refused():
    session, _ = ready()
    talk(session, b"MAIL FROM:<a@x>\r\n")
    assert talk(session, b"RCPT TO:<>\r\n") == b"501 5.1.3 Empty address.\r\n"


def test_address_over_256_octets_is_refused():
    session, _ = ready()
    talk(session, b"MAIL FROM:<a@x>\r\n")
    assert talk(session, b"RCPT TO:<" + b"a" * 250 + b"@x.org>\r\n") == b"501 5.1.3 Invalid address.\r\n"


def test_source_route_is_dropped_and_quoted_local_parts_kept():
    """RFC 5321 s.4.1.2: a source route must be accepted and may be ignored; a quoted local part may hold
    spaces and ">"."""
    assert split_path("<@relay.example,@b.example:user@x.org>") == ("user@x.org", "")
    assert split_path('<"odd > name"@x.org> SIZE=1') == ('"odd > name"@x.org', "SIZE=1")
    assert split_path("<a@x>junk") is None
    assert split_path("a@x") is None
    assert parse_parameters("size=10 BODY=8BITMIME") == {"SIZE": "10", "BODY": "8BITMIME"}


def test_rcpt_address_is_handed_over_without_brackets():
    session, handler = ready()
    talk(session, b'MAIL FROM:<a@x>\r\nRCPT TO:<"john doe"@x.org>\r\n')
    assert handler.checked == [('"john doe"@x.org', None)]


# DATA -------------------------------------------------------------------------------------------------------
def transaction(session, recipients=(b"r@x",), sender=b"s@x") -> bytes:
    data = b"MAIL FROM:<" + sender + b">\r\n"
    data += b"".join(b"RCPT TO:<" + r + b">\r\n" for r in recipients)
    return talk(session, data + b"DATA\r\n")


def test_data_replies_354_then_one_reply_per_recipient_in_rcpt_order():
    """RFC 2033 s.4.2; the full one at DATA gets its own 4xx while the others get 250."""
    handler = MemoryHandler({"gone@x": Outcome.UNKNOWN}, at_data={"full@x": Outcome.OVER_QUOTA})
    session, _ = ready(handler)
    reply = transaction(session, [b"a@x", b"gone@x", b"full@x", b"b@x"])
    assert lines(reply)[-1] == b"354 OK"
    assert talk(session, b"Subject: hi\r\n\r\nbody\r\n.\r\n") == (
        b"250 2.0.0 <a@x> Saved\r\n"
        b"452 4.2.2 <full@x> Quota exceeded (mailbox for user is full)\r\n"
        b"250 2.0.0 <b@x> Saved\r\n"
    )
    envelope = handler.delivered[0]
    assert [r.address for r in envelope.recipients] == ["a@x", "full@x", "b@x"]
    assert [r.token for r in envelope.recipients] == ["A@X", "FULL@X", "B@X"]
    assert envelope.sender == "s@x" and envelope.client_name == "client.test"
    assert envelope.data == b"Subject: hi\r\n\r\nbody\r\n"


def test_dot_stuffed_lines_are_unstuffed():
    """RFC 5321 s.4.5.2: a leading dot is removed from every line, the first one included."""
    session, handler = ready()
    transaction(session)
    talk(session, b"..first\r\nmiddle\r\n..\r\n...three\r\n.x\r\nlast\r\n.\r\n")
    assert handler.delivered[0].data == b".first\r\nmiddle\r\n.\r\n..three\r\nx\r\nlast\r\n"


def test_an_empty_message_and_a_message_of_one_blank_line():
    session, handler = ready()
    transaction(session)
    talk(session, b".\r\n")
    transaction(session)
    talk(session, b"\r\n.\r\n")
    assert [e.data for e in handler.delivered] == [b"", b"\r\n"]


def test_only_crlf_dot_crlf_ends_the_data():
    """A dot line ended by a bare LF, or after a bare LF, does not end the message (SMTP smuggling)."""
    session, handler = ready()
    transaction(session)
    assert talk(session, b"a\n.\nb\r\n.\nc\n.\r\nd\r\n") == b""
    assert talk(session, b".\r\n") == b"250 2.0.0 <r@x> Saved\r\n"
    assert handler.delivered[0].data == b"a\n\nb\r\n\nc\n\r\nd\r\n"


def test_eight_bit_and_nul_bytes_pass_unchanged():
    session, handler = ready()
    transaction(session)
    body = "Subject: caf\u00e9\r\n\r\n\u00fcber \xff".encode("utf-8") + b"\x00\xff\xfe\r\n"
    talk(session, body + b".\r\n")
    assert handler.delivered[0].data == body


def test_the_end_of_data_may_be_split_anywhere():
    message = b"Subject: x\r\n\r\n..dot\r\nline\r\n"
    wire = message + b".\r\n"
    for cut in range(1, len(wire)):
        for second_cut in (cut, min(cut + 1, len(wire)), min(cut + 3, len(wire))):
            session, handler = ready()
            transaction(session)
            out = (
                talk(session, wire[:cut])
                + talk(session, wire[cut:second_cut])
                + talk(session, wire[second_cut:])
            )
            assert out == b"250 2.0.0 <r@x> Saved\r\n", (cut, second_cut)
            assert handler.delivered[0].data == b"Subject: x\r\n\r\n.dot\r\nline\r\n"


def test_data_byte_by_byte():
    session, handler = ready()
    transaction(session)
    out = b"".join(talk(session, bytes([b])) for b in b"a\r\n..b\r\n.\r\n")
    assert out == b"250 2.0.0 <r@x> Saved\r\n"
    assert handler.delivered[0].data == b"a\r\n.b\r\n"


def test_message_over_the_size_limit_is_552_for_each_recipient_and_not_delivered():
    session, handler = ready(max_message_size=1000)
    transaction(session, [b"a@x", b"b@x"])
    for _ in range(50):
        assert talk(session, b"x" * 98 + b"\r\n") == b""
    assert len(session._data) <= 4  # dropped as it arrives: memory stays bounded
    assert talk(session, b".\r\nNOOP\r\n") == (
        b"552 5.3.4 <a@x> Message size exceeds fixed maximum message size\r\n"
        b"552 5.3.4 <b@x> Message size exceeds fixed maximum message size\r\n"
        b"250 2.0.0 OK\r\n"
    )
    assert handler.delivered == []


def test_the_size_limit_counts_octets_after_unstuffing():
    session, _ = ready(max_message_size=10)
    transaction(session)
    assert talk(session, b"..123456\r\n.\r\n") == b"250 2.0.0 <r@x> Saved\r\n"  # 10 octets once unstuffed
    transaction(session)
    assert talk(session, b"1234567890\r\n.\r\n").startswith(b"552 5.3.4 ")


def test_oversize_message_in_one_buffer():
    session, handler = ready(max_message_size=10)
    transaction(session)
    assert talk(session, b"x" * 100 + b"\r\n.\r\n").startswith(b"552 5.3.4 <r@x>")
    assert handler.delivered == []


def test_a_failing_delivery_is_451_for_every_recipient():
    session, _ = ready(MemoryHandler(fail_deliver=True))
    transaction(session, [b"a@x", b"b@x"])
    assert talk(session, b"x\r\n.\r\n") == (
        b"451 4.3.0 <a@x> Temporary internal error\r\n451 4.3.0 <b@x> Temporary internal error\r\n"
    )
    assert talk(session, b"NOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_handler_outcomes_map_to_replies_after_data():
    at_data = {"big@x": Outcome.TOO_BIG, "err@x": Outcome.TEMPORARY_ERROR, "empty@x": Outcome.REJECTED}
    session, _ = ready(MemoryHandler(at_data=at_data))
    transaction(session, [b"big@x", b"err@x", b"empty@x"])
    assert lines(talk(session, b".\r\n")) == [
        b"552 5.3.4 <big@x> Message size exceeds fixed maximum message size",
        b"451 4.3.0 <err@x> Temporary internal error",
        b"554 5.6.0 <empty@x> Message cannot be stored (empty)",
    ]


def test_a_dropped_connection_mid_data_delivers_nothing():
    session, handler = ready()
    transaction(session)
    talk(session, b"Subject: half\r\n\r\nbody\r\n")
    session.abandon()
    assert talk(session, b".\r\n") == b""
    assert handler.delivered == [] and session.closed


def test_data_with_an_argument_is_501():
    session, _ = ready()
    talk(session, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\n")
    assert talk(session, b"DATA now\r\n") == b"501 5.5.4 Syntax: DATA\r\n"


# Pipelining -------------------------------------------------------------------------------------------------
def test_a_pipelined_transaction_is_answered_in_order_in_one_write():
    """RFC 2920: everything the client sent is answered in order; the replies come out as one piece."""
    session, handler = ready(MemoryHandler({"no@x": Outcome.UNKNOWN}))
    pieces = list(
        session.receive(
            b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<no@x>\r\nDATA\r\n"
            b"hello\r\n.\r\nMAIL FROM:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\nsecond\r\n.\r\nQUIT\r\n"
        )
    )
    assert len(pieces) == 1
    assert lines(pieces[0]) == [
        b"250 2.1.0 OK",
        b"250 2.1.5 OK",
        b"550 5.1.1 <no@x> User doesn't exist: no@x",
        b"354 OK",
        b"250 2.0.0 <b@x> Saved",
        b"250 2.1.0 OK",
        b"250 2.1.5 OK",
        b"354 OK",
        b"250 2.0.0 <d@x> Saved",
        b"221 2.0.0 Bye",
    ]
    assert [e.data for e in handler.delivered] == [b"hello\r\n", b"second\r\n"]


def test_bare_lf_command_lines_are_accepted():
    session, _ = ready()
    assert talk(session, b"NOOP\nNOOP\r\n") == b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n"


# Bad input --------------------------------------------------------------------------------------------------
def test_overlong_command_line_is_500_5_5_0_and_the_session_goes_on():
    session, _ = ready()
    long_line = b"NOOP " + b"x" * (LmtpSession.command_line_limit + 100)
    assert talk(session, long_line[:3000]) == b""
    assert talk(session, long_line[3000:]) == b"500 5.5.0 Line too long.\r\n"
    assert talk(session, b" still the same line\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_overlong_line_in_large_pieces_then_a_command():
    session, _ = ready()
    assert talk(session, b"NOOP " + b"x" * 10_000) == b"500 5.5.0 Line too long.\r\n"
    assert talk(session, b"x" * 10_000) == b""
    assert talk(session, b"x" * 10_000 + b"\r\nNOOP\r\n") == b"250 2.0.0 OK\r\n"


def test_overlong_line_in_one_piece():
    session, _ = ready()
    assert talk(session, b"RCPT TO:<" + b"a" * 5000 + b">\r\nNOOP\r\n") == (
        b"500 5.5.0 Line too long.\r\n250 2.0.0 OK\r\n"
    )


def test_a_line_of_1000_octets_is_accepted():
    """RFC 5321's 512-octet command line is a minimum; longer ones are taken up to a generous limit."""
    session, _ = ready()
    assert talk(session, b"NOOP " + b"x" * 1000 + b"\r\n") == b"250 2.0.0 OK\r\n"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"\x00\xff\x01garbage", b"500 5.5.1 Unknown command.\r\n"),
        (b"", b"500 5.5.1 Empty command.\r\n"),
        (b"BDAT 10 LAST", b"500 5.5.1 Unknown command.\r\n"),
        (b"NOOP \xff\xfe", b"501 5.5.2 Invalid UTF-8 in the command line.\r\n"),
    ],
)
def test_garbage_is_refused_without_echo(line, expected):
    session, _ = ready()
    assert talk(session, line + b"\r\n") == expected


def test_too_many_invalid_commands_in_a_row_close_the_session():
    session, _ = ready()
    reply = talk(session, b"junk\r\n" * (LmtpSession.max_bad_commands + 5))
    assert lines(reply)[-1] == b"421 4.7.0 Too many invalid commands."
    assert len(lines(reply)) == LmtpSession.max_bad_commands + 1
    assert session.closed


def test_a_good_command_resets_the_invalid_command_count():
    session, _ = ready()
    for _ in range(3):
        talk(session, b"junk\r\n" * (LmtpSession.max_bad_commands - 1) + b"NOOP\r\n")
    assert not session.closed


def test_refused_recipients_are_not_invalid_commands():
    session, _ = ready(MemoryHandler({"no@x": Outcome.UNKNOWN}))
    talk(session, b"MAIL FROM:<a@x>\r\n" + b"RCPT TO:<no@x>\r\n" * 30)
    assert not session.closed


# STARTTLS ---------------------------------------------------------------------------------------------------
def test_starttls_discards_pipelined_input_and_starts_over():
    """RFC 3207 s.4.2: after the handshake the client must LHLO again; nothing sent after STARTTLS runs."""
    session, _ = ready(tls_available=True)
    assert talk(session, b"STARTTLS\r\nMAIL FROM:<a@x>\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
    assert session.wants_tls
    session.tls_started()
    assert talk(session, b"MAIL FROM:<a@x>\r\n") == b"503 5.5.1 Send LHLO first.\r\n"
    assert b"STARTTLS" not in talk(session, b"LHLO c\r\n")
    assert talk(session, b"STARTTLS\r\n") == b"503 5.5.1 TLS is already active.\r\n"


def test_starttls_without_a_certificate_is_454():
    session, _ = ready()
    assert talk(session, b"STARTTLS\r\n") == b"454 4.7.0 TLS not available.\r\n"


def test_starttls_inside_a_transaction_is_503():
    session, _ = ready(tls_available=True)
    talk(session, b"MAIL FROM:<a@x>\r\n")
    assert talk(session, b"STARTTLS\r\n").startswith(b"503 5.5.1 ")


# Stats ------------------------------------------------------------------------------------------------------
def test_stats_count_messages_and_recipients():
    session, _ = ready(MemoryHandler(at_data={"full@x": Outcome.OVER_QUOTA}))
    transaction(session, [b"a@x", b"full@x"])
    talk(session, b"12345\r\n.\r\n")
    assert (session.stats.messages, session.stats.delivered, session.stats.refused, session.stats.octets) == (
        1,
        1,
        1,
        7,
    )
