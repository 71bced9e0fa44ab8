"""The POP3 session (RFC 1939) as a pure state machine: bytes in, bytes out, no sockets, no ORM.

The server feeds whatever it reads to ``receive()`` and writes whatever comes out; the session frames lines,
dispatches each to its ``pop_VERB`` method through the registry in ``commands.py``, and talks to a
``Maildrop`` (``popserver.protocol.maildrop``) opened by the ``authenticate`` callable it was given.

Also here: SASL AUTH PLAIN/LOGIN (RFC 5034), STLS (RFC 2595 s.4), RFC 2449 CAPA and response codes,
RFC 3206 ``[AUTH]``/``[SYS/TEMP]``. Where the RFCs leave a choice we do what Dovecot 2.3 does.

Verbs, by state:
    both:           CAPA, QUIT
    AUTHORIZATION:  STLS, USER, PASS, AUTH, UTF8
    TRANSACTION:    STAT, LIST, RETR, TOP, DELE, RSET, NOOP, UIDL
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Protocol

from popserver.exceptions import BodyUnavailable, LoginRefused, MessageExpunged, ServerBusy
from popserver.protocol import wire
from popserver.protocol.commands import (
    AUTHORIZATION_ONLY,
    BOTH_STATES,
    TRANSACTION_ONLY,
    Command,
    CommandError,
    State,
    UnknownCommand,
    capability_tags,
    collect_commands,
    command,
)
from popserver.protocol.maildrop import Maildrop

__all__ = ["Authenticate", "CommandError", "Pop3Session", "SessionStats", "State"]

log = logging.getLogger("popserver.protocol")

Reply = bytes | Iterator[bytes]

PLAINTEXT_DISALLOWED = "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
# Dovecot's pop3_client_workarounds that this server implements (POPSERVER_CLIENT_WORKAROUNDS).
CLIENT_WORKAROUNDS = ("outlook-no-nuls", "oe-ns-eoh")
INTERNAL_ERROR = "[SYS/TEMP] Internal error occurred. Refer to server log for more information."
COMMIT_FAILED = "[SYS/TEMP] Deleting the marked messages failed; none were deleted."

_READS = (b"RETR", b"TOP ")  # the first four octets of the lines worth a read-ahead
ECHOABLE_VERB = re.compile(rb"[A-Za-z][A-Za-z0-9-]{0,15}")  # what an unknown-command reply may quote


class Authenticate(Protocol):
    """``authenticate(username, password, *, mechanism) -> Maildrop``; raises ``LoginRefused`` subclasses.

    ``mechanism`` is "USER" (USER/PASS), "PLAIN" or "LOGIN". It may block (password hashing, the failure
    delay); the session just calls it. ``password`` is None for credentials that cannot be right (bytes that
    are not UTF-8, an empty name, a malformed SASL PLAIN message): refuse them as a failed login, with the
    same reply, delay and accounting, without checking anything.
    """

    def __call__(self, username: str, password: str | None, *, mechanism: str) -> Maildrop: ...


@dataclass
class SessionStats:
    """Counters for the session-end log line (Dovecot: ``top=%t/%p, retr=%r/%b, del=%d/%m, size=%s``).

    Byte counts are message octets sent (before dot-stuffing); ``deleted_*`` are set by a successful QUIT.
    """

    messages: int = 0  # at login
    mailbox_size: int = 0  # octets at login
    retr_count: int = 0
    retr_bytes: int = 0
    top_count: int = 0
    top_bytes: int = 0
    deleted_count: int = 0
    deleted_bytes: int = 0


def printable(data: bytes, limit: int = 40) -> str:
    """Client input made safe to echo or log: printable ASCII only, at most ``limit`` characters."""
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in data[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


class Pop3Session:
    """One POP3 conversation. Not thread-safe: one thread drives it (the connection's).

    The server calls ``greeting()`` once, then ``receive(data)`` for each read and writes every yielded
    ``bytes`` in order, until ``closed`` (flush, then close the connection) or ``wants_tls`` (do the TLS
    handshake, then call ``tls_started()``). If the connection ends any other way it calls ``abandon()``.
    """

    # Limits ------------------------------------------------------------------------------------------
    command_line_limit = 512  # octets with CRLF; RFC 2449 s.4 requires at least 255
    continuation_line_limit = 8192  # SASL responses (RFC 5034 s.4 sets no limit; Dovecot allows more)
    unterminated_line_limit = 8192  # this much without a line end closes the session
    max_bad_commands_before_login = 3  # in a row, as Dovecot's pop3-login
    max_bad_commands_after_login = 20  # in a row, as Dovecot's pop3
    # Command lines of any kind before login (SASL responses included): a client that pipelines thousands of
    # CAPA cannot keep a thread busy for others' logins. Real clients need fewer than ten.
    max_commands_before_login = 50
    read_ahead_lines = 128  # pipelined lines looked at for RETR/TOP to announce to the maildrop

    # Engine features announced by CAPA (RFC 2449 s.6.4, s.6.6; RFC 3206 s.6): what the session does for
    # every verb rather than a verb of its own.
    extensions: ClassVar[tuple[str, ...]] = ("RESP-CODES", "PIPELINING", "AUTH-RESP-CODE")
    sasl_mechanisms: ClassVar[tuple[str, ...]] = ("PLAIN", "LOGIN")  # RFC 4616, draft-murchison-sasl-login

    commands: ClassVar[dict[str, Command]]  # built once per class from the @command methods

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.commands = collect_commands(cls)

    def __init__(
        self,
        authenticate: Authenticate | Callable[..., Maildrop],
        *,
        peer: str = "",
        greeting: str = "popserver ready.",
        implementation: str = "popserver",
        plaintext_allowed: bool = True,
        tls_available: bool = False,
        tls_active: bool = False,
        login_delay: int = 0,
        expire: str | Callable[[], str] | None = None,
        client_workarounds: frozenset[str] = frozenset(),
    ) -> None:
        """``login_delay``: seconds the server enforces between logins of a mailbox; announced in CAPA as
        ``LOGIN-DELAY`` (RFC 2449 s.6.5) when not 0 (the authenticator enforces it with [LOGIN-DELAY])."""
        self.authenticate = authenticate
        self.login_delay = login_delay
        # RFC 2449 s.6.7: the EXPIRE tag before login (a callable is asked only when CAPA needs it); after
        # login the maildrop's own value. None: not announced.
        self.expire_before_login = expire
        unknown = set(client_workarounds) - set(CLIENT_WORKAROUNDS)
        if unknown:
            raise ValueError(f"unknown client workarounds: {sorted(unknown)}")
        self.client_workarounds = frozenset(client_workarounds)
        self.utf8 = False  # RFC 6856: the client sent UTF8
        self.peer = peer
        self.greeting_text = greeting
        self.implementation = implementation
        self.plaintext_allowed = plaintext_allowed
        self.tls_available = tls_available
        self.tls_active = tls_active

        self.state = State.AUTHORIZATION
        self.closed = False
        self.quit_received = False  # the client said QUIT (in either state), for the session-end log
        self.wants_tls = False
        self.username: str | None = None
        self.stats = SessionStats()
        self._maildrop: Maildrop | None = None
        self._buffer = bytearray()
        self._user: bytes | None = None  # from USER, until PASS
        self._continuation: Callable[[bytes], Reply] | None = None  # the pending SASL step
        self._sasl_username: bytes = b""
        self._bad_commands = 0
        self._commands_before_login = 0
        # Why the session cut its client before login for abuse (the server may penalise its address, as
        # Dovecot's anvil does); None when it was not.
        self.cut_before_login: str | None = None
        self._capa_before_login: tuple[tuple[bool, bool, bool], bytes] | None = None
        self._read_ahead_to = 0  # buffer offset up to which pipelined RETR/TOP were announced

    # The server's side -------------------------------------------------------------------------------
    @property
    def maildrop(self) -> Maildrop | None:
        """The open maildrop (TRANSACTION state), else None."""
        return self._maildrop

    @property
    def expecting_continuation(self) -> bool:
        """True while a SASL exchange waits for the client's next response line (RFC 5034 s.4)."""
        return self._continuation is not None

    def greeting(self) -> bytes:
        """RFC 1939 s.4: the greeting. No APOP timestamp, since APOP is not offered."""
        return wire.ok(self.greeting_text)

    def receive(self, data: bytes) -> Iterator[bytes]:
        """Take bytes read from the client; return an iterator over the replies to every complete line.

        ``data`` is buffered at once; the lines are processed lazily, in order, as the iterator is consumed
        (a large RETR comes out chunk by chunk). Consume it fully before the next call. Processing stops when
        the session closes or after STLS's ``+OK``; what is left in the buffer then is discarded.
        """
        if self.closed or self.wants_tls:
            return iter(())
        self._buffer += data
        return self._process_buffer()

    def tls_started(self) -> None:
        """The TLS handshake after STLS succeeded: start AUTHORIZATION afresh (RFC 2595 s.4); no greeting."""
        self.wants_tls = False
        self.tls_active = True
        self.state = State.AUTHORIZATION
        self._buffer.clear()
        self._user = None
        self._continuation = None
        self._bad_commands = 0
        self.utf8 = False  # RFC 2595 s.4: the client starts afresh

    def abandon(self) -> None:
        """The connection ended without QUIT (drop, timeout, shutdown): release, never commit (RFC 1939 s.6).

        Idempotent; never raises.
        """
        self.closed = True
        self._buffer.clear()
        self._continuation = None
        self._release()

    def capabilities(self) -> list[str]:
        """CAPA's tags for the current state, derived from the verb registry."""
        extensions = self.extensions + ((f"LOGIN-DELAY {self.login_delay}",) if self.login_delay else ())
        if expire := self._expire_tag():
            extensions += (f"EXPIRE {expire}",)
        return capability_tags(self.commands, self, extensions, self.implementation)

    def _expire_tag(self) -> str | None:
        """RFC 2449 s.6.7: after login the mailbox's own policy; before it what the server was given (the
        most restrictive value, with USER where mailboxes differ)."""
        if self.expire_before_login is None:  # the server states no policy (an engine without one)
            return None
        if self._maildrop is not None:
            return wire.expire_value(self._maildrop.expire_days)
        value = self.expire_before_login
        return value() if callable(value) else value

    # Framing -----------------------------------------------------------------------------------------
    def _process_buffer(self) -> Iterator[bytes]:
        buffer = self._buffer
        start = 0
        try:
            while not (self.closed or self.wants_tls):
                end = buffer.find(b"\n", start, start + self.unterminated_line_limit)
                if end < 0:
                    if len(buffer) - start >= self.unterminated_line_limit:
                        log.info(
                            "%s: input line over %d octets without a line end", self.peer, len(buffer) - start
                        )
                        yield wire.err("Input line too long.")
                        self._cut("Input line too long")
                    break
                raw = bytes(buffer[start : end + 1])
                start = end + 1
                if (
                    start > self._read_ahead_to
                    and raw[:4].upper() in _READS
                    and self._maildrop is not None
                    and buffer.find(b"\n", start) >= 0  # another command is waiting
                ):
                    self._read_ahead_to = self._read_ahead(buffer, start - len(raw))
                yield from self._handle_line(raw)
        finally:
            if self.closed or self.wants_tls:
                # RFC 2595 s.4: nothing the client pipelined after STLS may be executed (CVE-2011-0411).
                buffer.clear()
            else:
                del buffer[:start]
            self._read_ahead_to = 0

    def _read_ahead(self, buffer: bytearray, start: int) -> int:
        """Tell the maildrop which messages the RETR and TOP commands waiting in ``buffer`` from ``start`` on
        will read (RFC 2449 PIPELINING), so it can read small ones together; returns where the scan ended.

        Looks at most ``read_ahead_lines`` complete lines, up to a QUIT. Only numbers valid now are named; the
        commands themselves are checked again when they run. The scan counts as done up to the line of the
        last number the maildrop took, so the next RETR after those announces the following ones."""
        maildrop = self._maildrop
        assert maildrop is not None
        count = len(maildrop)
        numbers: list[int] = []
        ends: list[int] = []  # where the line of each number ends
        position = start
        for _ in range(self.read_ahead_lines):
            end = buffer.find(b"\n", position, position + self.command_line_limit)
            if end < 0:
                break
            words = buffer[position:end].split(None, 2)
            position = end + 1
            verb = words[0].upper() if words else b""
            if verb == b"QUIT":
                break
            if verb in (b"RETR", b"TOP") and len(words) > 1 and words[1].isdigit() and len(words[1]) <= 10:
                number = int(words[1])
                if 0 < number <= count and not maildrop.is_deleted(number):
                    numbers.append(number)
                    ends.append(position)
        if len(numbers) < 2:
            return position
        taken = maildrop.prefetch(numbers)
        return ends[taken - 1] if 0 < taken < len(numbers) else position

    def _handle_line(self, raw: bytes) -> Iterator[bytes]:
        if self.state is State.AUTHORIZATION:
            self._commands_before_login += 1
            if self._commands_before_login > self.max_commands_before_login:
                # DEBUG: the server's session-end line gives the reason (cut_before_login) at INFO
                log.debug("%s: over %d commands before login", self.peer, self.max_commands_before_login)
                self._continuation = None
                yield wire.err("Too many commands before login.")
                self._cut("Too many commands before login")
                return
        # PASS takes the rest of the line, and Django allows long passwords: it gets the continuation limit.
        long_ok = self._continuation is not None or raw[:5].upper() == b"PASS "
        limit = self.continuation_line_limit if long_ok else self.command_line_limit
        if len(raw) > limit:
            log.debug("%s C: <line of %d octets>", self.peer, len(raw))
            self._continuation = None
            yield wire.err("Input line too long.")
            yield from self._refused(unknown=True)
            return
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        yield from self._run(line)

    # Dispatch: the one exception boundary per command --------------------------------------------
    def _run(self, line: bytes) -> Iterator[bytes]:
        started = False
        first = b""
        try:
            if self._continuation is not None:
                log.debug("%s C: ***", self.peer)
                step, self._continuation = self._continuation, None
                yield wire.FLUSH  # a SASL step may check a password: earlier replies must not wait for it
                reply = step(line)
            else:
                self._log_command(line)
                cmd, args = self._resolve(line)
                if cmd.flush_before:
                    yield wire.FLUSH
                reply = cmd.handler(self, *args)
            for piece in (reply,) if isinstance(reply, bytes) else reply:
                if not started:
                    started, first = True, piece[:8]
                    self._log_reply(piece)
                yield piece
                del piece  # not kept while the next piece is made
        except CommandError as exc:
            self._continuation = None
            if started:  # a handler must not refuse after output began
                log.error("%s: command refused after its output began: %s", self.peer, exc.text)
                self._close()
                return
            reply_line = wire.err(exc.text)
            self._log_reply(reply_line)
            yield reply_line
            yield from self._refused(unknown=isinstance(exc, UnknownCommand))
        except LoginRefused as exc:
            # A failed login is not a bad command (RFC 1939 s.4); throttling is the authenticator's job.
            reply_line = wire.err(exc.reply)
            self._log_reply(reply_line)
            yield reply_line
            self._bad_commands = 0
            if exc.close_connection:
                self._close()
        except ServerBusy as exc:
            # The database is out of reach for now (the server logged it once for all sessions): [SYS/TEMP],
            # and the session goes on; after output began, only closing keeps the stream well-formed.
            self._continuation = None
            if started:
                self._close()
                return
            yield wire.err(exc.reply)
        except MessageExpunged:
            # Before any output, RETR and TOP answer "-ERR Message N expunged." themselves.
            log.warning("%s: a message was expunged while it was being sent; closing", self.peer)
            if not started:
                yield wire.err(INTERNAL_ERROR)
            self._close()
        except BodyUnavailable as exc:
            # Before any output, RETR and TOP answer -ERR [SYS/TEMP] themselves; in the middle, only closing
            # tells the client the message is incomplete.
            log.error("%s: a message body failed while it was being sent; closing: %s", self.peer, exc)
            if not started:
                yield wire.err(INTERNAL_ERROR)
            self._close()
        except Exception:
            log.exception("%s: internal error in command %s", self.peer, printable(line.split(b" ", 1)[0]))
            self._continuation = None
            if started:
                self._close()
                return
            yield wire.err(INTERNAL_ERROR)
            yield from self._refused(unknown=True)
        else:
            if first.startswith((b"+OK", b"+ ")):  # an accepted AUTH's challenge is a success too
                self._bad_commands = 0
            elif first.startswith(b"-ERR"):
                yield from self._refused(unknown=False)

    def _resolve(self, line: bytes) -> tuple[Command, tuple[bytes, ...]]:
        """The command and its arguments, or ``CommandError`` (unknown verb, wrong state, arity)."""
        verb_bytes, space, rest = line.partition(b" ")
        verb = verb_bytes.upper().decode("ascii", "replace")
        cmd = self.commands.get(verb)
        if cmd is None:
            if not verb_bytes:
                raise UnknownCommand("Empty command.")
            if not ECHOABLE_VERB.fullmatch(verb_bytes):  # never echo what might be a secret or garbage
                raise UnknownCommand("Unknown command.")
            raise UnknownCommand(f"Unknown command: {verb_bytes.upper().decode('ascii')}")
        if not cmd.allowed_in(self.state):
            when = "before" if self.state is State.AUTHORIZATION else "after"
            raise UnknownCommand(f"{verb} is not valid {when} login.")
        if not cmd.is_available(self):
            raise CommandError(cmd.unavailable_reply(self))
        return cmd, cmd.parse_arguments(rest if space else None)

    def _refused(self, *, unknown: bool) -> Iterator[bytes]:
        """Count a refused command; too many in a row end the session (Dovecot's limits).

        Before login only unknown verbs (and over-long lines) count, and a refusal of a known verb resets the
        count, as in Dovecot's pop3-login, whose USER, PASS, AUTH and STLS never count as bad commands."""
        if self.state is State.AUTHORIZATION and not unknown:
            self._bad_commands = 0
            return
        self._bad_commands += 1
        if self.state is State.AUTHORIZATION and self._bad_commands >= self.max_bad_commands_before_login:
            yield wire.err("Too many invalid bad commands.")
            self._cut("Too many invalid commands")
        elif self.state is State.TRANSACTION and self._bad_commands > self.max_bad_commands_after_login:
            # Dovecot's pop3: the 21st bad command in a row closes (``++bad_counter > 20``); pop3-login's
            # limit above closes at the 3rd.
            yield wire.err("Too many bad commands.")
            self._close()

    def _cut(self, reason: str) -> None:
        """Close for abuse; before login ``cut_before_login`` says why (Dovecot's words where it has them)."""
        if self.state is State.AUTHORIZATION:
            self.cut_before_login = reason
        self._close()

    def _close(self) -> None:
        """End the session from our side; a maildrop still open is released, never committed."""
        self.closed = True
        self._release()

    def _release(self) -> None:
        maildrop, self._maildrop = self._maildrop, None
        if maildrop is None:
            return
        try:
            maildrop.release()
        except Exception:
            log.exception("%s: releasing the maildrop failed", self.peer)

    # Logging -----------------------------------------------------------------------------------------
    def _log_command(self, line: bytes) -> None:
        if not log.isEnabledFor(logging.DEBUG):
            return
        words = line.split(None, 2)
        upper = words[0].upper() if words else b""
        if upper.startswith(b"PASS"):
            shown = "PASS ***"
        elif upper.startswith(b"AUTH") and len(words) > 2:
            shown = f"AUTH {printable(words[1])} ***"
        elif upper.startswith(b"AUTH"):
            shown = printable(line, 40)
        elif upper and not ECHOABLE_VERB.fullmatch(words[0]):
            shown = f"<{len(line)} octets>"  # perhaps a SASL response sent after a refused AUTH
        else:
            shown = printable(line, 200)
        log.debug("%s C: %s", self.peer, shown)

    def _log_reply(self, reply: bytes) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s S: %s", self.peer, printable(reply[:200].split(b"\r\n", 1)[0], 200))

    # Helpers for the verbs ---------------------------------------------------------------------------
    def _opened(self) -> Maildrop:
        assert self._maildrop is not None  # the state gate allows TRANSACTION verbs only with a maildrop
        return self._maildrop

    def _message_number(self, arg: bytes) -> int:
        """A message number that can be used now (RFC 1939 s.4: 1-based, deleted ones are invisible)."""
        if not arg.isdigit() or len(arg) > 10:
            raise CommandError(f"Invalid message number: {printable(arg)}")
        number = int(arg)
        maildrop = self._opened()
        if number == 0 or number > len(maildrop):  # Dovecot says the same for 0
            raise CommandError(f"There's no message {number}.")
        if maildrop.is_deleted(number):
            raise CommandError("Message is deleted.")
        return number

    def _login(self, username: bytes, password: bytes | None, mechanism: str) -> bytes:
        """Open the maildrop through ``authenticate`` and enter TRANSACTION (RFC 1939 s.4).

        ``password`` None: credentials that cannot be right. They still go to the authenticator, which
        refuses them like a wrong password (Dovecot delays every failure)."""
        try:
            name = username.decode("utf-8")
            secret = password.decode("utf-8") if password is not None else None
        except UnicodeDecodeError:
            name, secret = username.decode("utf-8", "replace"), None  # no valid credential has such bytes
        if (
            "\x00" in name
        ):  # no account has one, and PostgreSQL cannot even store it (the audit, the throttle)
            name, secret = name.replace("\x00", "\ufffd"), None
        if not name:
            secret = None
        maildrop = self.authenticate(name, secret, mechanism=mechanism)
        if "oe-ns-eoh" in self.client_workarounds:
            maildrop.add_missing_header_ends()
        self._maildrop = maildrop
        self.state = State.TRANSACTION
        self.username = name
        self.stats.messages = len(maildrop)
        self.stats.mailbox_size = sum(info.size for info in maildrop.messages)
        log.debug("%s: %s logged in (%s), %d messages", self.peer, name, mechanism, len(maildrop))
        return wire.ok("Logged in.")

    def _send_message(self, number: int, status: bytes, top_lines: int | None) -> Iterator[bytes]:
        """Stream message ``number`` as a multi-line response (RFC 1939 s.3): the status line, the stuffed
        chunks, the terminator; the connection handler batches them into few writes. Returns the number of
        message octets sent.

        The status line and the first chunk wait for the second read, so a message found expunged by then
        still gets a clean ``-ERR`` (nothing has gone out); later, the session can only close.
        """
        stuffer = wire.DotStuffer()
        truncator = wire.TopTruncator(top_lines) if top_lines is not None else None
        no_nuls = "outlook-no-nuls" in self.client_workarounds
        sent = 0
        held: list[bytes] | None = [status]
        first_read = True
        chunks = self._opened().read(number)
        try:
            # The names are dropped before the next read, so a large message's previous chunk is not kept
            # alive while the next one is read (memory stays at about one chunk and its stuffed form).
            for chunk in chunks:
                data = truncator.feed(chunk) if truncator is not None else chunk
                del chunk
                if no_nuls:  # Dovecot's outlook-no-nuls: Outlook stops at a NUL; same size
                    data = data.replace(b"\0", b"\x80")
                sent += len(data)
                stuffed = stuffer.feed(data)
                del data
                if held is not None and not first_read:
                    yield from held
                    held = None
                first_read = False
                if stuffed:
                    if held is not None:
                        held.append(stuffed)
                    else:
                        yield stuffed
                del stuffed
                if truncator is not None and truncator.done:
                    break
        except MessageExpunged:
            if held is None:
                raise
            log.warning("%s: message %d was expunged by something else", self.peer, number)
            raise CommandError(f"Message {number} expunged.") from None
        except BodyUnavailable as exc:
            if held is None:
                raise
            # One line, no traceback; the message stays (nothing is deleted or hidden for it).
            log.error("%s: message %d cannot be read now: %s", self.peer, number, exc)
            raise CommandError(INTERNAL_ERROR) from None
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        if held is not None:
            yield from held
        if "oe-ns-eoh" in self.client_workarounds and not self._opened().info(number).header_end:
            # Dovecot's oe-ns-eoh: the blank line that ends the header (counted in LIST's size); an
            # unterminated last line gets its CRLF first, uncounted as always.
            blank_line = wire.CRLF if stuffer.ends_line else wire.CRLF + wire.CRLF
            yield stuffer.feed(blank_line)
            sent += 2
        yield stuffer.finish()
        return sent

    # AUTHORIZATION and both states -------------------------------------------------------------------
    @command("CAPA", states=BOTH_STATES, capability="CAPA")
    def pop_CAPA(self) -> Reply:
        """RFC 2449 s.5: the capabilities, one per line, derived from the registry.

        Before login the reply is built once per session while what it depends on stays the same (TLS, the
        plaintext policy): a client that repeats CAPA, as floods do, costs a comparison, not a new list. The
        server's EXPIRE policy before login is read for the first CAPA only: a policy changed during the short
        time before login shows in the next session (Dovecot reads its settings once per process)."""
        if self.state is not State.AUTHORIZATION:
            return wire.multiline(wire.ok(), self.capabilities())
        key = (self.tls_active, self.tls_available, self.plaintext_allowed)
        if self._capa_before_login is None or self._capa_before_login[0] != key:
            self._capa_before_login = (key, wire.multiline(wire.ok(), self.capabilities()))
        return self._capa_before_login[1]

    @command(
        "STLS",
        states=AUTHORIZATION_ONLY,
        capability="STLS",
        available=lambda s: s.tls_available and not s.tls_active,
        unavailable=lambda s: "TLS is already active." if s.tls_active else "TLS support isn't enabled.",
    )
    def pop_STLS(self) -> Reply:
        """RFC 2595 s.4: start TLS. The server does the handshake; buffered input is discarded."""
        self.wants_tls = True
        return wire.ok("Begin TLS negotiation now.")

    @command(
        "USER",
        states=AUTHORIZATION_ONLY,
        rest_of_line=True,
        syntax="USER name",
        capability="USER",
        available=lambda s: s.plaintext_allowed,
        unavailable=PLAINTEXT_DISALLOWED,
    )
    def pop_USER(self, name: bytes) -> Reply:
        """RFC 1939 s.7: remember the name for PASS. Nothing is checked yet, so nothing is disclosed.

        The name is the rest of the line, as in Dovecot (login names of some backends contain spaces)."""
        name = name.strip(b" \t")
        if not name:
            raise CommandError("Missing argument. Syntax: USER name")
        self._user = name
        return wire.ok()

    @command(
        "PASS",
        states=AUTHORIZATION_ONLY,
        rest_of_line=True,
        syntax="PASS password",
        flush_before=True,  # the password check and the failure delay take seconds
        available=lambda s: s.plaintext_allowed,
        unavailable=PLAINTEXT_DISALLOWED,
    )
    def pop_PASS(self, password: bytes) -> Reply:
        """RFC 1939 s.7: the password is the rest of the line after one space, spaces included."""
        if self._user is None:
            raise CommandError("No username given.")
        username, self._user = self._user, None  # a failed PASS forgets the USER
        return self._login(username, password, "USER")

    @command(
        "AUTH",
        states=AUTHORIZATION_ONLY,
        max_args=2,
        syntax="AUTH [mechanism [initial-response]]",
        flush_before=True,
        capability=lambda s: "SASL " + " ".join(s.sasl_mechanisms) if s.sasl_mechanisms else None,
        available=lambda s: s.plaintext_allowed,
        unavailable=PLAINTEXT_DISALLOWED,
    )
    def pop_AUTH(self, mechanism: bytes | None = None, initial_response: bytes | None = None) -> Reply:
        """RFC 5034: SASL PLAIN (RFC 4616) and LOGIN; without arguments, the mechanisms (as Outlook asks)."""
        if mechanism is None:
            return wire.multiline(wire.ok(), self.sasl_mechanisms)
        name = mechanism.upper().decode("ascii", "replace")
        if name not in self.sasl_mechanisms:
            raise CommandError("[AUTH] Unsupported authentication mechanism.")  # RFC 3206 s.5, as Dovecot
        if name == "PLAIN":
            if initial_response is None:
                self._continuation = self._auth_plain_response
                return wire.continuation()
            return self._auth_plain_response(initial_response, initial=True)
        if initial_response is None:
            self._continuation = self._auth_login_username
            return wire.continuation(base64.b64encode(b"Username:"))
        return self._auth_login_username(initial_response, initial=True)

    def _sasl_decode(self, response: bytes, initial: bool = False) -> bytes:
        """A client response: ``*`` cancels; ``=`` is an empty initial response (RFC 5034 s.4)."""
        if not initial and response == b"*":
            raise CommandError("Authentication aborted by client.")
        if initial and response == b"=":
            return b""
        padded = response + b"=" * (-len(response) % 4)  # some clients leave out the padding
        try:
            return base64.b64decode(padded, validate=True)
        except (binascii.Error, ValueError):
            # Dovecot's words, with [AUTH] (RFC 3206 s.5)
            where = "initial" if initial else "continued"
            raise CommandError(f"[AUTH] Invalid base64 data in {where} response") from None

    def _auth_plain_response(self, response: bytes, initial: bool = False) -> Reply:
        """RFC 4616: ``authzid NUL authcid NUL passwd``; an authzid other than the user is refused."""
        message = self._sasl_decode(response, initial)
        parts = message.split(b"\0")
        if len(parts) != 3:  # a failed login, as in Dovecot's mech-plain (with its delay)
            # The name only when it stands between two NULs: in "alice\0secret" the second part is a password.
            return self._login(parts[1] if len(parts) > 3 else b"", None, "PLAIN")
        authzid, authcid, password = parts
        if authzid and authzid != authcid:
            raise CommandError("[AUTH] Logging in as another user is not supported.")
        return self._login(authcid, password, "PLAIN")

    def _auth_login_username(self, response: bytes, initial: bool = False) -> Reply:
        self._sasl_username = self._sasl_decode(response, initial)
        self._continuation = self._auth_login_password
        return wire.continuation(base64.b64encode(b"Password:"))

    def _auth_login_password(self, response: bytes) -> Reply:
        password = self._sasl_decode(response)
        username, self._sasl_username = self._sasl_username, b""
        return self._login(username, password, "LOGIN")

    @command(
        "UTF8", states=AUTHORIZATION_ONLY, capability=lambda s: "UTF8 USER" if s.plaintext_allowed else "UTF8"
    )
    def pop_UTF8(self) -> Reply:
        """RFC 6856 s.2: UTF-8 mode. User names and passwords are taken as UTF-8 whether or not it is sent
        (the USER argument says so where USER/PASS may be used); messages are served as stored: this server
        does not downgrade (s.4 leaves that to the server)."""
        self.utf8 = True
        return wire.ok("UTF8 enabled")

    @command("QUIT", states=BOTH_STATES, flush_before=True)
    def pop_QUIT(self) -> Reply:
        """RFC 1939 s.6: from TRANSACTION, UPDATE: commit the deletions; ``+OK`` only if that succeeded.

        The texts are Dovecot's: "Logging out" before login, "Logging out, messages deleted." after DELE."""
        self.quit_received = True
        if self.state is State.AUTHORIZATION:
            self._close()
            return wire.ok("Logging out")
        maildrop = self._opened()
        deleted = sorted(maildrop.numbers_to_remove())
        # Counted before the commit, which may record the session with them; taken back if it fails.
        self.stats.deleted_count = len(deleted)
        self.stats.deleted_bytes = sum(maildrop.info(number).size for number in deleted)
        try:
            maildrop.commit()
        except Exception as exc:
            self.stats.deleted_count = self.stats.deleted_bytes = 0
            if not isinstance(exc, ServerBusy):  # that one is logged by the server, once for all sessions
                log.exception("%s: QUIT: committing %d deletions failed", self.peer, len(deleted))
            self._close()  # releases the lock; nothing was deleted; the state stays TRANSACTION
            return wire.err(COMMIT_FAILED)
        self.state = State.UPDATE
        self._maildrop = None  # commit() released the lock
        self._close()
        return wire.ok("Logging out, messages deleted." if deleted else "Logging out.")

    # TRANSACTION ---------------------------------------------------------------------------------------
    @command("STAT", states=TRANSACTION_ONLY)
    def pop_STAT(self) -> Reply:
        """RFC 1939 s.5: ``+OK count octets`` of the messages not marked deleted."""
        count, octets = self._opened().totals()
        return wire.ok(f"{count} {octets}")

    @command("LIST", states=TRANSACTION_ONLY, max_args=1, syntax="LIST [msg]")
    def pop_LIST(self, number: bytes | None = None) -> Reply:
        """RFC 1939 s.5: sizes in octets of the presented (CRLF) form."""
        maildrop = self._opened()
        if number is not None:
            n = self._message_number(number)
            return wire.ok(f"{n} {maildrop.info(n).size}")
        visible = list(maildrop.visible())
        return wire.multiline(
            wire.ok(f"{len(visible)} messages:"), (f"{n} {info.size}" for n, info in visible)
        )

    @command("RETR", states=TRANSACTION_ONLY, min_args=1, syntax="RETR msg")
    def pop_RETR(self, number: bytes) -> Iterator[bytes]:
        """RFC 1939 s.5: the whole message, dot-stuffed, streamed."""
        n = self._message_number(number)
        status = wire.ok(f"{self._opened().info(n).size} octets")
        sent = yield from self._send_message(n, status, top_lines=None)
        self._opened().mark_retrieved(n)
        self.stats.retr_count += 1
        self.stats.retr_bytes += sent

    @command("TOP", states=TRANSACTION_ONLY, min_args=2, syntax="TOP msg lines", capability="TOP")
    def pop_TOP(self, number: bytes, lines: bytes) -> Iterator[bytes]:
        """RFC 1939 s.7: the headers, the blank line and the first ``lines`` lines of the body."""
        n = self._message_number(number)
        if not lines.isdigit() or len(lines) > 20:
            raise CommandError(f"Invalid number of lines: {printable(lines)}")
        sent = yield from self._send_message(n, wire.ok(), top_lines=int(lines))
        self.stats.top_count += 1
        self.stats.top_bytes += sent

    @command("DELE", states=TRANSACTION_ONLY, min_args=1, syntax="DELE msg")
    def pop_DELE(self, number: bytes) -> Reply:
        """RFC 1939 s.5: only marks; QUIT deletes."""
        self._opened().mark_deleted(self._message_number(number))
        return wire.ok("Marked to be deleted.")

    @command("RSET", states=TRANSACTION_ONLY)
    def pop_RSET(self) -> Reply:
        """RFC 1939 s.5: unmark every message."""
        self._opened().reset()
        return wire.ok()

    @command("NOOP", states=TRANSACTION_ONLY)
    def pop_NOOP(self) -> Reply:
        """RFC 1939 s.5."""
        return wire.ok()

    @command("UIDL", states=TRANSACTION_ONLY, max_args=1, syntax="UIDL [msg]", capability="UIDL")
    def pop_UIDL(self, number: bytes | None = None) -> Reply:
        """RFC 1939 s.7: the unique ids, fixed across sessions."""
        maildrop = self._opened()
        if number is not None:
            n = self._message_number(number)
            return wire.ok(f"{n} {maildrop.info(n).uid}")
        return wire.multiline(wire.ok(), (f"{n} {info.uid}" for n, info in maildrop.visible()))


Pop3Session.commands = collect_commands(Pop3Session)
