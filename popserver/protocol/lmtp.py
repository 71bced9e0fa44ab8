"""The LMTP session (RFC 2033) as a pure state machine: bytes in, replies out, no sockets, no ORM.

The server feeds whatever it reads to ``receive()`` and writes what comes out; the session frames command
lines, dispatches each to its ``lmtp_VERB`` method through a table built once per class, reads DATA with
dot-unstuffing on whole buffers, and talks to a ``DeliveryHandler`` (below): one call per RCPT to check a
recipient, one call per message to deliver it to the accepted recipients, with a result for each.

SMTP extensions (RFC 5321 and its service extensions) as MTAs use them with LMTP: PIPELINING (RFC 2920),
ENHANCEDSTATUSCODES (RFC 2034, codes from RFC 3463), 8BITMIME (RFC 6152), SIZE (RFC 1870) and, when the
server has a certificate, STARTTLS (RFC 3207). Where the RFCs leave a choice we do what Dovecot's LMTP does,
and its reply texts are ours.

Verbs: LHLO, MAIL, RCPT, DATA, RSET, NOOP, VRFY, QUIT, STARTTLS; HELO and EHLO are refused (RFC 2033 s.4.1).
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

__all__ = [
    "DeliveryHandler",
    "Envelope",
    "LmtpSession",
    "Outcome",
    "Recipient",
    "RecipientCheck",
    "SessionStats",
]

log = logging.getLogger("popserver.protocol.lmtp")

CRLF = b"\r\n"
# The end of DATA (RFC 5321 s.4.1.1.4): a line holding a single ".", after the CRLF that ended the last line.
# Only CRLF counts: a bare LF before or after the dot does not end the message (SMTP smuggling).
END_OF_DATA = b"\r\n.\r\n"


# The handler interface -------------------------------------------------------------------------------------
class Outcome(enum.Enum):
    """What a handler says of one recipient, at RCPT (may it get the message?) and after DATA (did it?)."""

    ACCEPTED = "accepted"  # RCPT: will take it; after DATA: stored and committed
    UNKNOWN = "unknown"  # no such recipient (or one that takes no mail): permanent
    OVER_QUOTA = "over quota"  # the mailbox is full: temporary unless the session says permanent
    TOO_BIG = "too big"  # the message is over a size limit: permanent
    REJECTED = "rejected"  # the message cannot be stored for another permanent reason (an empty message)
    TEMPORARY_ERROR = "temporary error"  # the storage failed (a database error): the MTA retries


@dataclass(frozen=True, slots=True)
class RecipientCheck:
    """The answer to one RCPT. ``token`` is the handler's own note on an accepted recipient (its mailbox,
    say); the session hands it back in the ``Envelope`` so delivery need not look the recipient up again."""

    outcome: Outcome
    token: Any = None


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str  # as given in RCPT TO, without the angle brackets
    token: Any = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """One message to deliver: the sender ("" for the null reverse-path), the accepted recipients in RCPT
    order, and the message as received (dot-unstuffed, the terminating line removed, line ends untouched)."""

    sender: str
    recipients: tuple[Recipient, ...]
    data: bytes
    body: str = "7BIT"  # MAIL FROM's BODY= (RFC 6152): "7BIT" or "8BITMIME"
    client_name: str = ""  # the LHLO argument
    peer: str = ""


class DeliveryHandler(Protocol):
    """What the session needs from the mail store. Both methods may block (database work)."""

    def check_recipient(self, address: str, *, size: int | None) -> RecipientCheck:
        """RCPT TO: may ``address`` get a message (of ``size`` octets, as MAIL FROM's SIZE= declared)?"""

    def deliver(self, envelope: Envelope) -> Iterable[Outcome]:
        """Store the message for each recipient; one outcome per ``envelope.recipients``, in their order.

        A recipient's ``ACCEPTED`` must mean its copy is committed: its 250 reply follows."""


@dataclass
class SessionStats:
    """Counters for the session-end log line."""

    messages: int = 0  # DATA commands that ended with the terminator
    delivered: int = 0  # recipients that got a message (250 after DATA)
    refused: int = 0  # recipients refused after DATA
    octets: int = 0  # message octets received (unstuffed), once per message


# Replies (RFC 5321 s.4.2, RFC 2034 s.4) ---------------------------------------------------------------------
MAX_REPLY_LINE = 512  # RFC 5321 s.4.5.3.1.5: a reply line, CRLF included


def reply(code: int, status: str, text: str) -> bytes:
    """``code status text CRLF`` (RFC 2034 s.4), kept to one line of at most 512 octets."""
    return _reply_line(f"{code} {status} {text}")


def multiline_reply(code: int, lines: list[str]) -> bytes:
    """RFC 5321 s.4.2.1: ``code-text`` for every line but the last, ``code text`` for the last."""
    last = len(lines) - 1
    return b"".join(_reply_line(f"{code}{' ' if i == last else '-'}{line}") for i, line in enumerate(lines))


def _reply_line(text: str) -> bytes:
    line = text.encode("utf-8", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
    if len(line) > MAX_REPLY_LINE - 2:
        line = line[: MAX_REPLY_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
    return line + CRLF


def printable(data: bytes | str, limit: int = 60) -> str:
    """Client input made safe to echo or log: printable ASCII only, at most ``limit`` characters."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in data[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


# The verb table ---------------------------------------------------------------------------------------------
class Refused(Exception):
    """Refuse the current command with ``reply`` (a complete reply line). ``bad`` counts it toward the limit
    of invalid commands in a row (syntax and sequence errors do; a refused recipient does not)."""

    def __init__(self, code: int, status: str, text: str, *, bad: bool = True):
        super().__init__(text)
        self.reply = reply(code, status, text)
        self.bad = bad


class Argument(enum.Enum):
    NONE = "none"  # nothing may follow the verb (501 otherwise)
    OPTIONAL = "optional"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class Verb:
    name: str
    handler: Callable[..., Any]
    argument: Argument
    syntax: str


_ATTRIBUTE = "_lmtp_verb"


def verb(name: str, *, argument: Argument = Argument.NONE, syntax: str | None = None):
    """Register the decorated ``lmtp_<NAME>`` method as the handler of ``name``; it gets the text after the
    verb (``None`` when there is none) and returns its reply, or raises ``Refused``."""

    def decorate(handler):
        setattr(handler, _ATTRIBUTE, Verb(name.upper(), handler, argument, syntax or name.upper()))
        return handler

    return decorate


def collect_verbs(cls: type) -> dict[str, Verb]:
    """The verb table of a session class, built once (never ``getattr`` on client input)."""
    table: dict[str, Verb] = {}
    for klass in reversed(cls.__mro__):
        for attribute, value in vars(klass).items():
            entry = getattr(value, _ATTRIBUTE, None)
            if isinstance(entry, Verb):
                if attribute != f"lmtp_{entry.name}":
                    raise TypeError(
                        f"{klass.__name__}.{attribute}: the handler of {entry.name} must be "
                        f"named lmtp_{entry.name}"
                    )
                table[entry.name] = entry
    return table


# Paths and parameters (RFC 5321 s.4.1.2) --------------------------------------------------------------------
_ESMTP_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_ESMTP_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")  # printable US-ASCII but "="
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SOURCE_ROUTE = re.compile(r"@[^,:]+(?:,@[^,:]+)*:")  # RFC 5321 s.4.1.2: "MUST BE accepted" and ignored


def split_path(text: str) -> tuple[str, str] | None:
    """``<address> params`` -> (address, params); None unless ``text`` starts with a well-formed path.

    The address may hold a quoted local part with spaces or ``>`` in it (RFC 5321 s.4.1.2); a source route
    (``<@relay:user@example.org>``) is dropped.
    """
    if not text.startswith("<"):
        return None
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            address, rest = text[1:index], text[index + 1 :]
            if rest and not rest.startswith(" "):
                return None
            route = _SOURCE_ROUTE.match(address)
            if route is not None:
                address = address[route.end() :]
            return address, rest.strip(" ")
    return None


def parse_parameters(text: str) -> dict[str, str | None] | None:
    """``KEY=VALUE KEY ...`` (RFC 5321 s.4.1.2 esmtp-param) -> {KEY (upper case): value or None}."""
    parameters: dict[str, str | None] = {}
    for word in text.split():
        key, equals, value = word.partition("=")
        if not _ESMTP_KEYWORD.fullmatch(key) or (equals and not _ESMTP_VALUE.fullmatch(value)):
            return None
        parameters[key.upper()] = value if equals else None
    return parameters


class Phase(enum.Enum):
    """Where a session is. A mail transaction (RFC 5321 s.3.3) runs from MAIL to the end of DATA or RSET."""

    GREETED = 1  # before LHLO (again after STARTTLS: RFC 3207 s.4.2)
    READY = 2  # after LHLO, no transaction
    MAIL = 3  # after MAIL FROM, collecting recipients
    DATA = 4  # reading the message


# The session ------------------------------------------------------------------------------------------------
class LmtpSession:
    """One LMTP conversation. Not thread-safe: one thread drives it (the connection's).

    The server calls ``greeting()`` once, then ``receive(data)`` for each read and writes every yielded
    ``bytes`` in order, until ``closed`` (flush, then close the connection) or ``wants_tls`` (do the TLS
    handshake, then call ``tls_started()``). A connection that ends any other way calls ``abandon()``: a
    message whose DATA had not ended is dropped, never delivered.
    """

    # Limits --------------------------------------------------------------------------------------------
    # RFC 5321 s.4.5.3.1.4 asks for command lines of at least 512 octets; parameters and long addresses
    # get more room, as Dovecot and Postfix give. Longer: "500 5.5.0 Line too long." and the line is skipped.
    command_line_limit = 4096
    # RFC 5321 s.4.5.3.1.6 says 1,000 octets per text line, but MTAs pass longer ones: DATA lines are bounded
    # only by the message size.
    max_bad_commands = 10  # invalid commands in a row before "421 4.7.0" and close (Dovecot's default)
    max_address_length = 256  # RFC 5321 s.4.5.3.1.3: a path, angle brackets included

    # Extensions announced after LHLO (RFC 5321 s.4.1.1.1 and their RFCs); SIZE and STARTTLS are added by
    # ``capabilities()`` from the session's limit and TLS state.
    extensions: ClassVar[tuple[str, ...]] = ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME")

    verbs: ClassVar[dict[str, Verb]]  # built once per class from the @verb methods

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.verbs = collect_verbs(cls)

    def __init__(
        self,
        handler: DeliveryHandler,
        *,
        hostname: str = "localhost",
        peer: str = "",
        max_message_size: int = 64 * 1024 * 1024,
        max_recipients: int = 50,
        over_quota_permanent: bool = False,
        tls_available: bool = False,
        tls_active: bool = False,
    ) -> None:
        """``max_message_size`` is announced as SIZE (RFC 1870) and bounds DATA; ``max_recipients`` caps
        the recipients of one transaction (``452 4.5.3``, RFC 5321 s.4.5.3.1.10); ``over_quota_permanent``
        turns a full mailbox's ``452 4.2.2`` into ``552 5.2.2`` (Dovecot's ``quota_full_tempfail = no``)."""
        self.handler = handler
        self.hostname = hostname
        self.peer = peer
        self.max_message_size = max_message_size
        self.max_recipients = max_recipients
        self.over_quota_permanent = over_quota_permanent
        self.tls_available = tls_available
        self.tls_active = tls_active

        self.phase = Phase.GREETED
        self.closed = False
        self.quit_received = False
        self.wants_tls = False
        self.client_name = ""
        self.stats = SessionStats()
        self._buffer = bytearray()
        self._skipping_line = False  # dropping the rest of an over-long line
        self._bad_commands = 0
        self._reset_transaction()

    # The server's side -----------------------------------------------------------------------------------
    @property
    def in_data(self) -> bool:
        """True while a message is being received (the server allows it time as long as bytes arrive)."""
        return self.phase is Phase.DATA

    def greeting(self) -> bytes:
        """RFC 2033 s.4 (as RFC 5321 s.4.2): the 220 greeting."""
        return _reply_line(f"220 {self.hostname} popserver LMTP ready")  # no status code yet (RFC 2034 s.3)

    def receive(self, data: bytes) -> Iterator[bytes]:
        """Take bytes read from the client; return an iterator over the replies to what they complete.

        Commands are answered in order (PIPELINING, RFC 2920); consume the iterator fully before the next
        call. Processing stops when the session closes or after STARTTLS's 220; the rest is discarded.
        """
        if self.closed or self.wants_tls:
            return iter(())
        if self._data is not None:
            self._data += data
        else:
            self._buffer += data
        return self._process()

    def tls_started(self) -> None:
        """The handshake after STARTTLS succeeded: back to before LHLO (RFC 3207 s.4.2), nothing buffered."""
        self.wants_tls = False
        self.tls_active = True
        self.phase = Phase.GREETED
        self.client_name = ""
        self._buffer.clear()
        self._bad_commands = 0
        self._reset_transaction()

    def abandon(self) -> None:
        """The connection ended without QUIT: a message still being received is dropped. Idempotent."""
        self.closed = True
        self._buffer.clear()
        self._reset_transaction()

    def capabilities(self) -> list[str]:
        """LHLO's keywords (RFC 5321 s.4.1.1.1), after the greeting line."""
        keywords = [*self.extensions, f"SIZE {self.max_message_size}"]
        if self.tls_available and not self.tls_active:
            keywords.append("STARTTLS")
        return keywords

    # Framing ---------------------------------------------------------------------------------------------
    def _process(self) -> Iterator[bytes]:
        # Pipelined replies go out together (RFC 2920 s.3.2: few segments); the server writes this once.
        pending = list(self._replies())
        if pending:
            yield b"".join(pending)

    def _replies(self) -> Iterator[bytes]:
        while not (self.closed or self.wants_tls):
            if self._data is not None:
                if not (yield from self._read_data()):
                    return
                continue
            line = self._next_line()
            if line is None:
                return
            if isinstance(line, int):  # an over-long line, of this many octets so far
                log.info("%s: command line over %d octets", self.peer, self.command_line_limit)
                yield from self._answer(Refused(500, "5.5.0", "Line too long.").reply, bad=True)
                continue
            yield from self._run(line)
        if self.closed or self.wants_tls:
            # RFC 3207 s.4.2 (and CVE-2011-0411): nothing pipelined after STARTTLS may be executed.
            self._buffer.clear()

    def _next_line(self) -> bytes | int | None:
        """The next command line without its line end; an int for one over the limit; None for no line yet."""
        buffer = self._buffer
        while True:
            limit = self.command_line_limit
            if self._skipping_line:
                end = buffer.find(b"\n")
                if end < 0:
                    buffer.clear()
                    return None
                del buffer[: end + 1]
                self._skipping_line = False
                continue
            end = buffer.find(b"\n", 0, limit + 1)
            if end < 0:
                if len(buffer) <= limit:
                    return None
                end = buffer.find(b"\n", limit)
                if end < 0:  # the rest of the line is still to come: drop it as it arrives
                    self._skipping_line = True
                    end = len(buffer) - 1
                del buffer[: end + 1]
                return end + 1
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit - 2:  # the limit counts the CRLF
                return len(line)
            return line

    # Dispatch: the one exception boundary per command ----------------------------------------------------
    def _run(self, line: bytes) -> Iterator[bytes]:
        verb_bytes, space, rest = line.partition(b" ")
        name = verb_bytes.upper().decode("ascii", "replace")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s C: %s", self.peer, printable(line, 200))
        entry = self.verbs.get(name)
        try:
            if entry is None:
                if name in ("HELO", "EHLO"):
                    raise Refused(500, "5.5.1", f"{name} is not LMTP: use LHLO (RFC 2033 s.4.1).")
                raise Refused(500, "5.5.1", "Unknown command." if verb_bytes else "Empty command.")
            try:
                argument = rest.decode("utf-8") if space else None
            except UnicodeDecodeError:
                raise Refused(501, "5.5.2", "Invalid UTF-8 in the command line.") from None
            if argument is not None and not argument.strip(" "):
                argument = None
            if entry.argument is Argument.NONE and argument is not None:
                raise Refused(501, "5.5.4", f"Syntax: {entry.syntax}")
            if entry.argument is Argument.REQUIRED and argument is None:
                raise Refused(501, "5.5.4", f"Syntax: {entry.syntax}")
            answer = entry.handler(self, argument)
        except Refused as exc:
            yield from self._answer(exc.reply, bad=exc.bad)
            return
        except Exception:
            log.exception("%s: internal error in command %s", self.peer, printable(verb_bytes, 20))
            yield from self._answer(reply(451, "4.3.0", "Temporary internal error."), bad=False)
            return
        if isinstance(answer, bytes):
            yield from self._answer(answer, bad=False)
        else:
            yield from answer

    def _answer(self, line: bytes, *, bad: bool) -> Iterator[bytes]:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s S: %s", self.peer, printable(line.split(CRLF, 1)[0], 200))
        yield line
        if not bad:
            self._bad_commands = 0
            return
        self._bad_commands += 1
        if self._bad_commands >= self.max_bad_commands:
            log.info("%s: too many invalid commands", self.peer)
            yield reply(421, "4.7.0", "Too many invalid commands.")
            self._close()

    def _close(self) -> None:
        self.closed = True
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        """RFC 5321 s.4.1.1.5: forget the sender, the recipients and any message data."""
        self._sender: str | None = None
        self._body = "7BIT"
        self._declared_size: int | None = None
        self._recipients: list[Recipient] = []
        self._rcpt_count = 0  # RCPT commands answered in this transaction, accepted or not
        self._data: bytearray | None = None
        if self.phase in (Phase.MAIL, Phase.DATA):
            self.phase = Phase.READY

    # DATA ------------------------------------------------------------------------------------------------
    def _start_data(self) -> None:
        # A virtual CRLF before the first line: the end of DATA and dot-unstuffing then need no special case
        # for the message's first line (RFC 5321 s.4.5.2).
        self._data = bytearray(CRLF)
        self._data += self._buffer
        self._buffer.clear()
        self._data_scanned = 0  # the terminator was searched for before this offset
        self._data_counted = 0  # "\n." pairs were counted before this offset
        self._data_dots = 0
        self._data_oversize = False
        self.phase = Phase.DATA

    def _read_data(self) -> Iterator[bytes]:
        """Look for the end of DATA in what has arrived; deliver when found. Returns False for "need more".

        Works on whole buffers with C-level ``find``/``count``/``replace``: the terminator is searched only in
        new bytes, and a message over the size limit is dropped as it arrives (only its last 4 octets are
        kept, to catch the terminator), so memory stays bounded by the limit.
        """
        data = self._data
        assert data is not None
        end = data.find(END_OF_DATA, max(self._data_scanned - 4, 0))
        if end < 0:
            self._data_scanned = len(data)
            if not self._data_oversize:
                self._data_dots += data.count(b"\n.", max(self._data_counted - 1, 0))
                self._data_counted = len(data)
                # An upper bound of the unstuffed size: each "\n." loses at most its dot.
                if len(data) - len(CRLF) - self._data_dots > self.max_message_size:
                    log.info(
                        "%s: message over %d octets; reading it to its end", self.peer, self.max_message_size
                    )
                    self._data_oversize = True
            if self._data_oversize and len(data) > 4:
                del data[:-4]
                self._data_scanned = len(data)
            return False
        rest = bytes(data[end + len(END_OF_DATA) :])
        oversize = self._data_oversize
        self._data = None
        message = b""
        if not oversize:
            # At most two copies of the message at a time (64 MiB messages, many connections).
            del data[end + len(CRLF) :]  # the message ends with its last line's CRLF
            if data.find(b"\n.") >= 0:
                data = data.replace(b"\n.", b"\n")
            message = bytes(memoryview(data)[len(CRLF) :])
        del data
        self._buffer[:0] = rest  # what the client pipelined after the message (RFC 2920)
        yield from self._finish_data(message, oversize or len(message) > self.max_message_size)
        return True

    def _finish_data(self, message: bytes, too_big: bool) -> Iterator[bytes]:
        """RFC 2033 s.4.2: one reply per accepted recipient, in RCPT order."""
        recipients = tuple(self._recipients)
        envelope = Envelope(
            sender=self._sender or "",
            recipients=recipients,
            data=message,
            body=self._body,
            client_name=self.client_name,
            peer=self.peer,
        )
        self.stats.messages += 1
        self.stats.octets += len(message)
        self._reset_transaction()
        if too_big:
            outcomes: Iterable[Outcome] = [Outcome.TOO_BIG] * len(recipients)
        else:
            outcomes = self._deliver(envelope)
        replies = []
        for recipient, outcome in zip(recipients, outcomes, strict=True):
            if outcome is Outcome.ACCEPTED:
                self.stats.delivered += 1
                replies.append(reply(250, "2.0.0", f"<{recipient.address}> Saved"))
            else:
                self.stats.refused += 1
                replies.append(self._refusal(outcome, recipient.address))
        if log.isEnabledFor(logging.DEBUG):
            for line in replies:
                log.debug("%s S: %s", self.peer, printable(line[:-2], 200))
        self._bad_commands = 0
        yield b"".join(replies)

    def _deliver(self, envelope: Envelope) -> list[Outcome]:
        """The handler's outcomes, one per recipient; a handler that fails or miscounts gets 451 for all."""
        try:
            outcomes = list(self.handler.deliver(envelope))
        except Exception:
            log.exception("%s: delivery failed", self.peer)
            return [Outcome.TEMPORARY_ERROR] * len(envelope.recipients)
        if len(outcomes) != len(envelope.recipients):  # a bug in the handler: the MTA retries them all
            log.error(
                "%s: the delivery handler gave %d results for %d recipients",
                self.peer,
                len(outcomes),
                len(envelope.recipients),
            )
            return [Outcome.TEMPORARY_ERROR] * len(envelope.recipients)
        return outcomes

    def _refusal(self, outcome: Outcome, address: str) -> bytes:
        """The reply for a recipient that does not get the message (Dovecot's texts)."""
        if outcome is Outcome.UNKNOWN:
            return reply(550, "5.1.1", f"<{address}> User doesn't exist: {address}")
        if outcome is Outcome.OVER_QUOTA:
            if self.over_quota_permanent:
                return reply(552, "5.2.2", f"<{address}> Quota exceeded (mailbox for user is full)")
            return reply(452, "4.2.2", f"<{address}> Quota exceeded (mailbox for user is full)")
        if outcome is Outcome.TOO_BIG:
            return reply(552, "5.3.4", f"<{address}> Message size exceeds fixed maximum message size")
        if outcome is Outcome.REJECTED:
            return reply(554, "5.6.0", f"<{address}> Message cannot be stored (empty)")
        return reply(451, "4.3.0", f"<{address}> Temporary internal error")

    # Verbs -------------------------------------------------------------------------------------------------
    @verb("LHLO", argument=Argument.REQUIRED, syntax="LHLO hostname")
    def lmtp_LHLO(self, argument: str) -> bytes:
        """RFC 2033 s.4.1: as EHLO (RFC 5321 s.4.1.1.1), which also resets the transaction."""
        self._reset_transaction()
        self.client_name = argument.strip()
        self.phase = Phase.READY
        return multiline_reply(250, [self.hostname, *self.capabilities()])

    @verb("MAIL", argument=Argument.REQUIRED, syntax="MAIL FROM:<address> [parameters]")
    def lmtp_MAIL(self, argument: str) -> bytes:
        """RFC 5321 s.4.1.1.2 with SIZE= (RFC 1870 s.6) and BODY= (RFC 6152 s.3)."""
        if self.phase is Phase.GREETED:
            raise Refused(503, "5.5.1", "Send LHLO first.")
        if self.phase is not Phase.READY:
            raise Refused(503, "5.5.1", "MAIL already given.")
        path = _after_keyword(argument, "FROM:")
        parsed = split_path(path) if path is not None else None
        if parsed is None:
            raise Refused(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
        address, rest = parsed
        self._check_address(address, status="5.1.7", empty_ok=True)
        parameters = parse_parameters(rest)
        if parameters is None:
            raise Refused(501, "5.5.4", "Invalid parameters.")
        size: int | None = None
        body = "7BIT"
        for key, value in parameters.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or len(value) > 20:
                    raise Refused(501, "5.5.4", "Invalid SIZE parameter.")
                size = int(value)
                if size > self.max_message_size:
                    raise Refused(552, "5.3.4", "Message size exceeds fixed maximum message size", bad=False)
            elif key == "BODY":
                body = (value or "").upper()
                if body not in ("7BIT", "8BITMIME"):
                    raise Refused(501, "5.5.4", "Unsupported BODY parameter.")
            else:
                raise Refused(555, "5.5.4", f"Unsupported parameter: {printable(key, 20)}")
        self._sender, self._declared_size, self._body = address, size, body
        self.phase = Phase.MAIL
        return reply(250, "2.1.0", "OK")

    @verb("RCPT", argument=Argument.REQUIRED, syntax="RCPT TO:<address>")
    def lmtp_RCPT(self, argument: str) -> bytes:
        """RFC 5321 s.4.1.1.3; RFC 2033 s.4.2: each recipient is checked now and answered on its own."""
        if self.phase is not Phase.MAIL:
            raise Refused(503, "5.5.1", "MAIL needed first.")
        path = _after_keyword(argument, "TO:")
        parsed = split_path(path) if path is not None else None
        if parsed is None:
            raise Refused(501, "5.5.4", "Syntax: RCPT TO:<address>")
        address, rest = parsed
        self._check_address(address, status="5.1.3", empty_ok=False)
        parameters = parse_parameters(rest)
        if parameters is None:
            raise Refused(501, "5.5.4", "Invalid parameters.")
        if parameters:
            raise Refused(555, "5.5.4", f"Unsupported parameter: {printable(next(iter(parameters)), 20)}")
        if len(self._recipients) >= self.max_recipients:
            # RFC 5321 s.4.5.3.1.10: the client sends the others in another transaction.
            raise Refused(452, "4.5.3", "Too many recipients", bad=False)
        try:
            check = self.handler.check_recipient(address, size=self._declared_size)
        except Exception:
            log.exception("%s: checking recipient %s failed", self.peer, printable(address))
            check = RecipientCheck(Outcome.TEMPORARY_ERROR)
        if check.outcome is not Outcome.ACCEPTED:
            log.info("%s: RCPT TO:<%s> refused (%s)", self.peer, printable(address, 100), check.outcome.value)
            return self._refusal(check.outcome, address)  # a refused recipient is not a bad command
        self._recipients.append(Recipient(address, check.token))
        return reply(250, "2.1.5", "OK")

    @verb("DATA")
    def lmtp_DATA(self, argument: None) -> bytes:
        """RFC 5321 s.4.1.1.4; RFC 2033 s.4.2: 503 without an accepted recipient."""
        if self.phase is Phase.GREETED or self.phase is Phase.READY:
            raise Refused(503, "5.5.1", "MAIL needed first.")
        if not self._recipients:
            raise Refused(503, "5.5.1", "No valid recipients.")
        self._start_data()
        return b"354 OK\r\n"

    @verb("RSET")
    def lmtp_RSET(self, argument: None) -> bytes:
        """RFC 5321 s.4.1.1.5."""
        self._reset_transaction()
        return reply(250, "2.0.0", "OK")

    @verb("NOOP", argument=Argument.OPTIONAL, syntax="NOOP [string]")
    def lmtp_NOOP(self, argument: str | None) -> bytes:
        """RFC 5321 s.4.1.1.9: the argument is ignored."""
        return reply(250, "2.0.0", "OK")

    @verb("VRFY", argument=Argument.REQUIRED, syntax="VRFY address")
    def lmtp_VRFY(self, argument: str) -> bytes:
        """RFC 5321 s.3.5.3: 252, nothing disclosed (Dovecot's reply)."""
        return reply(252, "2.3.3", "Try RCPT instead")

    @verb("QUIT")
    def lmtp_QUIT(self, argument: None) -> bytes:
        """RFC 5321 s.4.1.1.10."""
        self.quit_received = True
        self._close()
        return reply(221, "2.0.0", "Bye")

    @verb("STARTTLS")
    def lmtp_STARTTLS(self, argument: None) -> bytes:
        """RFC 3207 s.4: only outside a transaction; the server does the handshake and the session forgets
        everything (s.4.2), including what the client pipelined after this command."""
        if self.tls_active:
            raise Refused(503, "5.5.1", "TLS is already active.")
        if not self.tls_available:
            raise Refused(454, "4.7.0", "TLS not available.", bad=False)
        if self.phase in (Phase.MAIL, Phase.DATA):
            raise Refused(503, "5.5.1", "STARTTLS is not allowed in a mail transaction.")
        self.wants_tls = True
        return reply(220, "2.0.0", "Ready to start TLS")

    # Helpers ---------------------------------------------------------------------------------------------
    def _check_address(self, address: str, *, status: str, empty_ok: bool) -> None:
        if not address and not empty_ok:
            raise Refused(501, status, "Empty address.")
        if len(address) + 2 > self.max_address_length or _CONTROL.search(address):
            raise Refused(501, status, "Invalid address.")


def _after_keyword(argument: str, keyword: str) -> str | None:
    """The path after ``FROM:`` or ``TO:`` (any case); spaces before the path are allowed, as Dovecot's
    ``whitespace-before-path`` workaround does by default."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    return argument[len(keyword) :].lstrip(" ")


LmtpSession.verbs = collect_verbs(LmtpSession)
