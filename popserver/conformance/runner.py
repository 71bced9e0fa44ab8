"""Running the kit: the configuration, the shared context of the probes, and the results.

A probe is a function that opens the sessions it needs and records the results of several checks (one
RETR pass feeds the size, stuffing and 8-bit checks). Probes run in a fixed order, because some change the
mailbox (deletions, new mail) and later ones rely on what earlier ones saw.
"""

from __future__ import annotations

import base64
import re
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from popserver.conformance import checks as registry
from popserver.conformance.client import Connection, ProtocolError, Reply, wait_backoff
from popserver.conformance.corpus import CorpusMessage, load
from popserver.conformance.delivery import Deliverer, DeliveryError

NOT_RUN, PASS, FAIL, SKIP = "not run", "pass", "fail", "skip"


class SetupError(Exception):
    """The kit cannot go on (no connection, no login, no delivery): reported, exit status 2."""


class MailboxMismatch(ProtocolError):
    """The mailbox does not hold the messages the kit expects (delivery slow or lost, other mail arriving)."""


class LoginFailed(ProtocolError):
    def __init__(self, reply: Reply | None, message: str = ""):
        self.reply = reply
        super().__init__(message or f"login failed: {reply.show() if reply else 'no reply'}")


@dataclass
class Config:
    host: str
    port: int
    user: str
    password: str
    implicit_tls: bool = False
    stls: bool = False
    cafile: str | None = None
    insecure: bool = False
    auth: str = "auto"  # "auto", "user" (USER/PASS) or "plain" (AUTH PLAIN)
    timeout: float = 20.0
    delivery_timeout: float = 60.0
    lock_wait: float = 10.0
    failed_login: bool = True
    autologout_wait: float = 0.0
    keep_mail: bool = False
    only: list[str] | None = None
    skip: list[str] | None = None
    trace: bool = False

    @property
    def url(self) -> str:
        """The server's URL without the password."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'pop3s' if self.implicit_tls else 'pop3'}://{self.user}@{host}:{self.port}"


@dataclass
class Result:
    check: registry.Check
    status: str = NOT_RUN
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "id": self.check.id,
            "section": self.check.section,
            "level": self.check.level,
            "citation": self.check.citation,
            "title": self.check.title,
            "status": self.status,
            "reason": self.reason,
            "notes": self.notes,
        }


@dataclass
class Report:
    config: Config
    delivery: str
    results: list[Result]
    greeting: str = ""
    capabilities: list[str] | None = None
    tls_capabilities: list[str] | None = None
    started: float = 0.0
    duration: float = 0.0
    error: str = ""
    log: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        table = {level: {PASS: 0, FAIL: 0, SKIP: 0} for level in registry.LEVELS}
        for result in self.results:
            if result.status in (PASS, FAIL, SKIP):
                table[result.check.level][result.status] += 1
        return table

    @property
    def ok(self) -> bool:
        """Every MUST that ran passed, and the run was not cut short."""
        return not self.error and not any(
            r.status == FAIL and r.check.level == registry.MUST for r in self.results
        )

    def status(self, check_id: str) -> str:
        return next(r.status for r in self.results if r.check.id == check_id)

    def result(self, check_id: str) -> Result:
        return next(r for r in self.results if r.check.id == check_id)


class Context:
    """What the probes share: the configuration, the sessions' factory, what was learnt, the results."""

    def __init__(self, config: Config, deliverer: Deliverer | None, say: Callable[[str], None] | None = None):
        self.config = config
        self.deliverer = deliverer
        self.say = say or (lambda text: print(text, file=sys.stderr))
        self.results = {c.id: Result(c) for c in registry.select(config.only, config.skip)}
        self.run_id = uuid.uuid4().hex[:12]
        self.connections = 0
        self.open_connections: list[Connection] = []
        self.greeting: Reply | None = None
        self.capa_before: list[str] | None = None  # CAPA on a fresh plaintext or implicit-TLS connection
        self.capa_tls: list[str] | None = None  # CAPA after STLS
        self.status_lines: list[tuple[str, bytes, bool]] = []
        self.corpus: list[CorpusMessage] = load()
        self.corpus_delivered = False  # the corpus is in the mailbox: the probes that read it may run
        self.mail_delivered = False  # the kit put mail in: it empties the mailbox at the end
        self.contents: dict[str, bytes] = {}  # corpus name -> what RETR sent, unstuffed
        self.uid_of: dict[str, bytes] = {}  # corpus name -> unique-id, from the first listing
        self.uids_seen: set[bytes] = set()
        self.mailbox_count = 0  # messages in the maildrop as the kit last left it
        self.log: list[str] = []

    # Results -------------------------------------------------------------------------------------------
    def wants(self, *ids: str) -> bool:
        return any(i in self.results for i in ids)

    def passed(self, check_id: str, note: str = "") -> None:
        result = self.results.get(check_id)
        if result is not None and result.status in (NOT_RUN, SKIP):
            result.status = PASS
            result.reason = ""
        if note:
            self.note(check_id, note)

    def fail(self, check_id: str, reason: str) -> None:
        result = self.results.get(check_id)
        if result is None:
            return
        if result.status != FAIL:
            result.status = FAIL
            result.reason = reason
        elif reason != result.reason and len(result.notes) < 10:
            result.notes.append("also: " + reason)

    def check(self, check_id: str, ok: bool, reason: str) -> bool:
        if ok:
            self.passed(check_id)
        else:
            self.fail(check_id, reason)
        return ok

    def skip(self, check_id: str, reason: str) -> None:
        result = self.results.get(check_id)
        if result is not None and result.status == NOT_RUN:
            result.status = SKIP
            result.reason = reason

    def note(self, check_id: str, text: str) -> None:
        result = self.results.get(check_id)
        if result is not None and text not in result.notes:
            result.notes.append(text)

    def status(self, check_id: str) -> str:
        result = self.results.get(check_id)
        return result.status if result else NOT_RUN

    # Capabilities ----------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> list[str] | None:
        """The capabilities of the sessions the kit logs in with (inside TLS when --stls)."""
        return self.capa_tls if self.config.stls and self.capa_tls is not None else self.capa_before

    def has_capability(self, tag: str, capabilities: list[str] | None = None) -> bool:
        caps = self.capabilities if capabilities is None else capabilities
        return any(line.split(" ", 1)[0].upper() == tag for line in caps or [])

    def capability_args(self, tag: str, capabilities: list[str] | None = None) -> list[str]:
        for line in (self.capabilities if capabilities is None else capabilities) or []:
            words = line.split()
            if words and words[0].upper() == tag:
                return words[1:]
        return []

    # Connections -----------------------------------------------------------------------------------------
    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.config.cafile)
        if self.config.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _on_status(self, where: str, line: bytes, crlf: bool) -> None:
        if len(self.status_lines) < 100000:
            self.status_lines.append((where, line, crlf))

    def _trace(self, text: str) -> None:
        self.say(text)

    def open(self) -> Connection:
        """A new connection (implicit TLS for pop3s://), its greeting read; no STLS, no login."""
        self.connections += 1
        config = self.config
        try:
            conn = Connection.open(
                config.host,
                config.port,
                timeout=config.timeout,
                tls_context=self.tls_context() if config.implicit_tls else None,
                label=f"#{self.connections}",
                on_status=self._on_status,
                trace=self._trace if config.trace else None,
            )
        except ssl.SSLError as exc:
            raise ProtocolError(f"TLS handshake failed: {tls_hint(exc)}") from None
        except OSError as exc:
            raise ProtocolError(f"cannot connect to {config.host}:{config.port}: {exc}") from None
        self.open_connections.append(conn)
        greeting = conn.read_status("greeting")
        if self.greeting is None:
            self.greeting = greeting
        if not greeting.ok:
            conn.drop()
            raise ProtocolError(f"the greeting is not +OK: {greeting.show()}")
        return conn

    def drop_connections(self) -> None:
        """Close every connection the kit still has open (without QUIT: nothing is deleted)."""
        for conn in self.open_connections:
            conn.drop()
        self.open_connections = []

    def start_tls(self, conn: Connection) -> None:
        reply = conn.command("STLS")
        if not reply.ok:
            raise ProtocolError(f"STLS refused: {reply.show()}")
        try:
            conn.start_tls(self.tls_context(), self.config.host)
        except ssl.SSLError as exc:
            raise ProtocolError(f"TLS handshake after STLS failed: {tls_hint(exc)}") from None
        except OSError as exc:
            raise ProtocolError(f"TLS handshake after STLS failed: {exc}") from None

    def connect(self) -> Connection:
        """A connection ready for a login: greeting read, and STLS done when --stls."""
        conn = self.open()
        if self.config.stls:
            try:
                self.start_tls(conn)
            except ProtocolError:
                conn.drop()
                raise
        return conn

    def auth_method(self, capabilities: list[str] | None = None) -> str:
        """USER/PASS where announced (or when there is no CAPA), else AUTH PLAIN if announced."""
        if self.config.auth != "auto":
            return self.config.auth
        caps = self.capabilities if capabilities is None else capabilities
        if not caps or self.has_capability("USER", caps):
            return "user"
        if "PLAIN" in [m.upper() for m in self.capability_args("SASL", caps)]:
            return "plain"
        return "user"

    def login(
        self, conn: Connection, password: str | None = None, capabilities: list[str] | None = None
    ) -> Reply:
        """Log in on ``conn`` (USER/PASS or AUTH PLAIN); the final reply."""
        user = self.config.user.encode("utf-8")
        secret = (self.config.password if password is None else password).encode("utf-8")
        if self.auth_method(capabilities) == "plain":
            response = base64.b64encode(b"\0" + user + b"\0" + secret)
            return conn.command(b"AUTH PLAIN " + response, shown="AUTH PLAIN ***", continuation_ok=True)
        reply = conn.command(b"USER " + user)
        if not reply.ok:
            return reply
        return conn.command(b"PASS " + secret, shown="PASS ***")

    def session(self, wait: bool = True) -> Connection:
        """A logged-in session. A refusal because of the lock (a session the kit just dropped may still
        hold it) is retried for ``lock_wait`` seconds when ``wait``."""
        deadline = time.monotonic() + self.config.lock_wait
        attempt = 0
        while True:
            conn = self.connect()
            try:
                reply = self.login(conn)
            except ProtocolError:
                conn.drop()
                raise
            if reply.ok:
                return conn
            conn.drop()
            if not (wait and is_temporary_refusal(reply) and time.monotonic() < deadline):
                raise LoginFailed(reply)
            wait_backoff(attempt)
            attempt += 1

    # Mail ----------------------------------------------------------------------------------------------
    def deliver(self, message: bytes) -> None:
        if self.deliverer is None:
            raise SetupError("no way to deliver mail: give --deliver-command, --lmtp or --smtp")
        self.mail_delivered = True
        self.deliverer.deliver(message)

    def extra_message(self, tag: str) -> bytes:
        return (
            "From: POP3 conformance kit <conformance@example.invalid>\r\n"
            f"Subject: pop3 conformance {tag} {self.run_id}\r\n"
            f"Message-ID: <{tag}.{self.run_id}@conformance.invalid>\r\n"
            "\r\n"
            f"Delivered by the POP3 conformance kit ({tag}).\r\n"
        ).encode("ascii")

    def stat(self, conn: Connection) -> tuple[int, int]:
        reply = conn.command("STAT")
        parsed = parse_stat(reply)
        if parsed is None:
            raise ProtocolError(f"STAT: {reply.show()}")
        return parsed

    def wait_for_count(self, count: int, what: str) -> None:
        """Poll new sessions until STAT shows ``count`` messages (an MTA may queue for a while)."""
        deadline = time.monotonic() + self.config.delivery_timeout
        attempt = 0
        while True:
            conn = self.session()
            found = self.stat(conn)[0]
            conn.quit()
            if found == count:
                self.mailbox_count = count
                return
            if found > count:
                raise MailboxMismatch(
                    f"{what}: the mailbox has {found} messages, expected {count}; is other mail arriving?"
                )
            if time.monotonic() >= deadline:
                raise MailboxMismatch(
                    f"{what}: only {found} of {count} messages arrived within "
                    f"{self.config.delivery_timeout:g} s"
                )
            wait_backoff(attempt)
            attempt += 1

    def empty_mailbox(self, why: str) -> int:
        conn = self.session()
        count, octets = self.stat(conn)
        for number in range(1, count + 1):
            reply = conn.command(f"DELE {number}")
            if not reply.ok:
                conn.drop()
                raise SetupError(f"emptying the mailbox: DELE {number}: {reply.show()}")
        reply = conn.quit()
        if count and (reply is None or not reply.ok):
            raise SetupError(f"emptying the mailbox: QUIT: {reply.show() if reply else 'no answer'}")
        self.say(
            f"{why}: deleted {count} messages ({octets} octets) from {self.config.user}'s mailbox "
            "through POP3."
        )
        self.mailbox_count = 0
        return count


def is_temporary_refusal(reply: Reply) -> bool:
    if reply.code in ("IN-USE", "SYS/TEMP", "LOGIN-DELAY"):
        return True
    return bool(re.search(rb"lock|in use|busy", reply.text, re.IGNORECASE))


def parse_stat(reply: Reply) -> tuple[int, int] | None:
    """``+OK nn mm`` (RFC 1939 s.5: exactly one space between the fields; more text may follow)."""
    match = re.fullmatch(rb"\+OK (\d+) (\d+)(?: .*)?", reply.line)
    return (int(match.group(1)), int(match.group(2))) if match else None


def tls_hint(exc: ssl.SSLError) -> str:
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return text + " (give the CA with --cafile, or --insecure for a test certificate)"
    return text


__all__ = [
    "FAIL",
    "NOT_RUN",
    "PASS",
    "SKIP",
    "Config",
    "Context",
    "DeliveryError",
    "LoginFailed",
    "Report",
    "Result",
    "SetupError",
]
