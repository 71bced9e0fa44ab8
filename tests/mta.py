"""Helpers of the end-to-end tests with a real MTA (tests/test_lmtp_postfix.py, tests/test_lmtp_exim.py): mail
submitted to the MTA over SMTP, handed to runlmtp's server (the ``lmtp_server`` fixture of conftest.py),
fetched back with POP3 byte for byte."""

import re
import socket
from collections.abc import Callable

import pytest

from popserver.models import Message
from tests.waiting import wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def message_through(mta: str) -> bytes:
    """A message with what the tests look for: dot lines, 8-bit text, headers the MTA need not add."""
    return (
        b"From: Sender <sender@example.net>\r\n"
        b"To: alice@example.org\r\n"
        b"Subject: through " + mta.encode() + b"\r\n"
        b"Message-ID: <e2e-" + mta.lower().encode() + b"-1@example.net>\r\n"
        b"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b".a line that starts with a dot\r\n"
        b"\xc3\xbcber 8-bit\r\n"
        b"..\r\n"
        b"last line\r\n"
    )


def check_delivered(data: bytes, recipient: str | None, message: bytes, received_by: bytes) -> None:
    """Return-Path and Delivered-To on top (as Dovecot's LMTP adds them: Delivered-To only when the
    transaction had one recipient, ``recipient`` None otherwise), then the MTA's Received (one folded header
    that contains ``received_by``, nothing else added), then the message's own bytes, unchanged."""
    head, _, rest = data.partition(b"\r\nReceived: ")
    expected = [b"Return-Path: <sender@example.net>"]
    if recipient is not None:
        expected.append(b"Delivered-To: " + recipient.encode())
    assert head.split(b"\r\n") == expected
    assert rest.endswith(message)
    received = rest.removesuffix(message)
    assert re.fullmatch(rb"from [^\r\n]*\r\n(\t[^\r\n]*\r\n)+", received), received
    assert received_by in received


def wait_for_messages(username: str, count: int, mta_log: Callable[[], str], timeout: float) -> None:
    """Until ``username`` has ``count`` messages; a failure shows the MTA's log."""
    try:
        wait_for(lambda: Message.objects.filter(mailbox__user__username=username).count() >= count, timeout)
    except AssertionError:
        pytest.fail(f"not delivered to {username}:\n{mta_log()}")


def pop3_retr_all(server) -> list[bytes]:
    """Every message of alice's mailbox as POP3 sends it (raw socket: exact bytes), then QUIT."""
    with server.socket() as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        sock.sendall(b"USER alice\r\nPASS secret\r\nSTAT\r\n")
        assert reader.readline().startswith(b"+OK")
        assert reader.readline().startswith(b"+OK")
        count = int(reader.readline().split()[1])
        messages = []
        for number in range(1, count + 1):
            sock.sendall(b"RETR %d\r\n" % number)
            assert reader.readline().startswith(b"+OK")
            lines = []
            while (line := reader.readline()) != b".\r\n":
                lines.append(line[1:] if line.startswith(b".") else line)
            messages.append(b"".join(lines))
        sock.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"+OK")
    return messages
