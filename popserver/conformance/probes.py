"""The probes: sessions against the server under test, each recording the results of several checks.

They run in this order: the first contact (greeting, CAPA, QUIT), the login and the emptying of the mailbox,
the delivery of the corpus, then the probes of ``PROBES``, the global checks over every status line seen, and
the final emptying. Probes that change the mailbox (new mail, deletions) come after those that read it.
"""

from __future__ import annotations

import base64
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from popserver.conformance.checks import BY_ID
from popserver.conformance.client import Connection, ProtocolError, Reply, ServerClosed, ServerSilent
from popserver.conformance.corpus import expected_top, first_difference, trace_prefix_ok
from popserver.conformance.runner import (
    Context,
    LoginFailed,
    MailboxMismatch,
    SetupError,
    parse_stat,
    tls_hint,
)

SCAN_LINE = re.compile(rb"(\d+) (\d+)(?: .*)?")  # RFC 1939 s.5: more may follow the size
UIDL_LINE = re.compile(rb"(\d+) (.*)")
UNIQUE_ID = re.compile(rb"[\x21-\x7e]{1,70}")  # RFC 1939 s.7
RESP_CODE = re.compile(rb"\[[\x21-\x5a\x5c-\x7f]+(?:/[\x21-\x5a\x5c-\x7f]+)*\]")  # RFC 2449 s.3 resp-code
LOCK_RELEASE_LIMIT = 5.0  # seconds a dropped session may keep the lock (Dovecot: at once)


@dataclass
class Probe:
    function: Callable[[Context], None]
    ids: tuple[str, ...]
    needs_corpus: bool = True

    @property
    def name(self) -> str:
        return self.function.__name__


_REGISTERED: dict[str, Probe] = {}


def probe(*ids: str, needs_corpus: bool = True):
    """Declare the checks a probe function records (``--only`` picks probes by them)."""
    unknown = [i for i in ids if i not in BY_ID]
    assert not unknown, unknown

    def register(function: Callable[[Context], None]) -> Callable[[Context], None]:
        _REGISTERED[function.__name__] = Probe(function, ids, needs_corpus)
        return function

    return register


# Helpers ---------------------------------------------------------------------------------------------------
def expect_err(ctx: Context, conn: Connection, check_id: str, command: str) -> bool:
    reply = conn.command(command)
    return ctx.check(check_id, reply.err, f"{command} answered {reply.show()!r}, not -ERR")


def scan_listing(reply: Reply, lines: list[bytes] | None) -> list[tuple[int, int]] | None:
    if not reply.ok or lines is None:
        return None
    listing = []
    for line in lines:
        match = SCAN_LINE.fullmatch(line)
        if not match:
            raise ProtocolError(f"LIST: a line that is not 'n size': {line[:60]!r}")
        listing.append((int(match.group(1)), int(match.group(2))))
    return listing


def uidl_listing(lines: list[bytes]) -> list[tuple[int, bytes]]:
    listing = []
    for line in lines:
        match = UIDL_LINE.fullmatch(line)
        if not match:
            raise ProtocolError(f"UIDL: a line that is not 'n unique-id': {line[:60]!r}")
        listing.append((int(match.group(1)), match.group(2)))
    return listing


def uid_map(conn: Connection) -> dict[int, bytes] | None:
    reply, lines = conn.lines("UIDL")
    return dict(uidl_listing(lines)) if reply.ok and lines is not None else None


def sizes(conn: Connection) -> list[tuple[int, int]]:
    reply, lines = conn.lines("LIST")
    listing = scan_listing(reply, lines)
    if listing is None:
        raise ProtocolError(f"LIST: {reply.show()}")
    return listing


def drain_quit(conn: Connection) -> None:
    """End a session whose state does not matter: QUIT, or just close if the server no longer answers."""
    try:
        conn.quit()
    except ProtocolError:
        conn.drop()


# First contact ---------------------------------------------------------------------------------------------
def first_contact(ctx: Context) -> None:
    """Greeting, CAPA before login (and inside TLS when --stls), QUIT in AUTHORIZATION."""
    config = ctx.config
    try:
        conn = ctx.open()
    except ProtocolError as exc:
        if config.implicit_tls:
            ctx.fail("tls.implicit", str(exc))
        if ctx.greeting is not None and not ctx.greeting.ok:
            ctx.fail("rfc1939.greeting", f"the greeting is {ctx.greeting.show()!r}")
        raise SetupError(str(exc)) from None
    ctx.passed("rfc1939.greeting")
    if config.implicit_tls:
        ctx.passed("tls.implicit")
    else:
        ctx.skip("tls.implicit", "no pop3s:// URL given")
    reply, lines = conn.lines("CAPA")
    if reply.ok and lines is not None:
        ctx.capa_before = [line.decode("utf-8", "replace") for line in lines]
        ctx.passed("rfc2449.capa")
        check_capa_syntax(ctx, ctx.capa_before, "before login")
    else:
        ctx.fail("rfc2449.capa", f"CAPA answered {reply.show()!r}")
        ctx.skip("rfc2449.capa-syntax", "no CAPA")
    try:
        reply = conn.command("QUIT")
    except ProtocolError as exc:
        ctx.fail("rfc1939.quit-authorization", f"QUIT before login got no answer: {exc}")
    else:
        if ctx.check("rfc1939.quit-authorization", reply.ok, f"QUIT before login answered {reply.show()!r}"):
            ctx.check(
                "rfc1939.quit-authorization",
                conn.wait_closed(),
                "the server did not close the connection after QUIT",
            )
    conn.drop()
    if config.stls:
        conn = ctx.open()
        try:
            ctx.start_tls(conn)
        except ProtocolError as exc:
            conn.drop()
            ctx.fail("tls.stls", str(exc))
            raise SetupError(f"--stls: {exc}") from None
        reply, lines = conn.lines("CAPA")
        if reply.ok and lines is not None:
            ctx.capa_tls = [line.decode("utf-8", "replace") for line in lines]
            check_capa_syntax(ctx, ctx.capa_tls, "inside TLS")
        drain_quit(conn)


KNOWN_TAGS = {
    "TOP": 0,
    "USER": 0,
    "RESP-CODES": 0,
    "PIPELINING": 0,
    "UIDL": 0,
    "STLS": 0,
    "AUTH-RESP-CODE": 0,
    "UTF8": None,
    "LANG": 0,
    "SASL": None,
    "LOGIN-DELAY": None,
    "EXPIRE": None,
    "IMPLEMENTATION": None,
    "CAPA": 0,
}


def check_capa_syntax(ctx: Context, capabilities: list[str], where: str) -> None:
    """RFC 2449 s.5, s.6: one capability per line, a tag and its arguments; the known tags' arguments."""
    problems = []
    for line in capabilities:
        words = line.split(" ")
        tag, args = words[0].upper(), words[1:]
        if not tag or "" in args or not all(0x21 <= ord(c) < 0x7F for c in tag):
            problems.append(f"malformed line {line!r}")
        elif tag == "PIPELINE":
            problems.append("'PIPELINE' is not a capability (RFC 2449 s.6.6 says PIPELINING)")
        elif KNOWN_TAGS.get(tag) == 0 and args:
            problems.append(f"{tag} takes no arguments: {line!r}")
        elif tag == "SASL" and not args:
            problems.append("SASL without mechanisms")
        elif tag == "LOGIN-DELAY" and not (
            len(args) in (1, 2) and args[0].isdigit() and args[1:] in ([], ["USER"])
        ):
            problems.append(f"LOGIN-DELAY needs seconds (and USER at most): {line!r}")
        elif tag == "EXPIRE" and not (
            len(args) in (1, 2) and (args[0].isdigit() or args[0] == "NEVER") and args[1:] in ([], ["USER"])
        ):
            problems.append(f"EXPIRE needs days or NEVER: {line!r}")
        elif tag == "UTF8" and args not in ([], ["USER"]):
            problems.append(f"UTF8 takes only USER: {line!r}")
    tags = [line.split(" ")[0].upper() for line in capabilities]
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates:
        problems.append(f"tags listed twice: {', '.join(duplicates)}")
    if problems:
        ctx.fail("rfc2449.capa-syntax", f"CAPA {where}: " + "; ".join(problems))
    else:
        ctx.passed("rfc2449.capa-syntax")


def first_login(ctx: Context) -> None:
    try:
        conn = ctx.session()
    except LoginFailed as exc:
        ctx.fail("rfc1939.login", str(exc))
        raise SetupError(f"{exc} (check the user and password)") from None
    ctx.passed("rfc1939.login")
    drain_quit(conn)


def deliver_corpus(ctx: Context) -> None:
    ctx.empty_mailbox("Emptying the mailbox first")
    assert ctx.deliverer is not None
    ctx.say(f"Delivering {len(ctx.corpus)} corpus messages by {ctx.deliverer.describe()}.")
    for message in ctx.corpus:
        ctx.deliver(message.raw)
    ctx.wait_for_count(len(ctx.corpus), "delivering the corpus")
    ctx.corpus_delivered = True


# RFC 1939: the corpus, byte for byte -----------------------------------------------------------------------
@probe(
    "rfc1939.stat",
    "rfc1939.list",
    "corpus.list-sizes",
    "corpus.retr",
    "corpus.dot-stuffing",
    "corpus.bare-lf",
    "corpus.unterminated-last-line",
    "corpus.8bit",
    "corpus.long-line",
    "corpus.lone-cr",
    "corpus.nul",
    "corpus.buffer-boundaries",
    "corpus.top-headers",
    "corpus.top-lines",
    "corpus.top-stuffing",
    "uidl.syntax",
    "uidl.unique",
    "uidl.single",
    "rfc2449.capa-honest",
)
def probe_corpus(ctx: Context) -> None:
    conn = ctx.session()
    count = len(ctx.corpus)
    stat = ctx.stat(conn)
    listing = sizes(conn)
    numbers = [n for n, _ in listing]
    ctx.check("rfc1939.stat", stat[0] == count, f"STAT says {stat[0]} messages; {count} were delivered")
    ctx.check(
        "rfc1939.stat",
        stat[1] == sum(s for _, s in listing),
        f"STAT says {stat[1]} octets; the LIST sizes add up to {sum(s for _, s in listing)}",
    )
    ctx.check(
        "rfc1939.list",
        numbers == list(range(1, count + 1)),
        f"LIST numbers the messages {numbers[:20]}, not 1 to {count}",
    )
    for number, size in listing:
        reply = conn.command(f"LIST {number}")
        ctx.check(
            "rfc1939.list",
            reply.line == f"+OK {number} {size}".encode()
            or reply.line.startswith(f"+OK {number} {size} ".encode()),
            f"LIST {number} answered {reply.show()!r}; the listing says {number} {size}",
        )
    size_of = dict(listing)

    uids = check_uidl_listing(ctx, conn, count)

    # RETR every message; a broken response costs its session, and the next message gets a new one.
    for number, message in enumerate(ctx.corpus, start=1):
        check_id = message.check_id
        try:
            reply, content = conn.multiline(f"RETR {number}")
        except (ServerSilent, ServerClosed) as exc:
            ctx.fail(
                check_id,
                f"RETR {number} ({message.name}): {exc}; a missing CRLF before the "
                "terminating '.' leaves a client waiting like this",
            )
            ctx.note("corpus.list-sizes", f"message {number} not checked: RETR {number} did not complete")
            conn.drop()
            conn = ctx.session()
            continue
        if content is None:
            ctx.fail(check_id, f"RETR {number} ({message.name}) answered {reply.show()!r}")
            continue
        check_order(ctx, number, message, content)
        expected = message.expected()
        if content.endswith(expected) and trace_prefix_ok(content[: len(content) - len(expected)]):
            ctx.contents[message.name] = content
            ctx.passed(check_id)
            prefix = len(content) - len(expected)
            if prefix:
                ctx.note(
                    check_id,
                    f"the delivery path put {prefix} octets of header fields on top of {message.short}",
                )
        else:
            ctx.contents[message.name] = expected  # what TOP is compared with
            ctx.fail(
                check_id,
                f"RETR {number} ({message.name}, {message.what}): " + first_difference(content, expected),
            )
            conn.drop()  # a response that went wrong may have left the stream out of step
            conn = ctx.session()
        size = size_of.get(number)
        uncounted = message.unterminated and ctx.deliverer is not None and ctx.deliverer.preserves_raw
        allowed = {len(content)} | ({len(content) - 2} if uncounted else set())
        counted = ctx.check(
            "corpus.list-sizes",
            size in allowed,
            f"message {number} ({message.name}): LIST says {size}, RETR sent {len(content)} octets",
        )
        if counted and uncounted and size == len(content) - 2:
            ctx.note(
                "corpus.list-sizes",
                "04: the CRLF added to the unterminated last line is not counted (as Dovecot)",
            )
    if ctx.deliverer is not None and not ctx.deliverer.preserves_raw:
        ctx.note(
            "corpus.unterminated-last-line",
            f"delivered by {ctx.deliverer.name}: the last line got its "
            "CRLF in transit, so only --deliver-command tests this fully",
        )
        ctx.note("corpus.bare-lf", f"delivered by {ctx.deliverer.name}: the bare LFs became CRLF in transit")

    conn = check_top(ctx, conn)
    check_capa_honest(ctx, conn, uids is not None)
    drain_quit(conn)


def check_order(ctx: Context, number: int, message, content: bytes) -> None:
    """The messages must be listed in the order they were delivered (the kit relies on it)."""

    def has_subject(subject: bytes) -> bool:
        return (
            bool(subject)
            and re.search(rb"(?m)^Subject: " + re.escape(subject) + rb"\r?$", content) is not None
        )

    if has_subject(message.subject):
        return
    other = next((m for m in ctx.corpus if m is not message and has_subject(m.subject)), None)
    if other is not None:
        raise ProtocolError(
            f"message {number} is {other.name}, not {message.name}: the server lists the messages in another "
            "order than they were delivered"
        )


def check_uidl_listing(ctx: Context, conn: Connection, count: int) -> dict[int, bytes] | None:
    reply, lines = conn.lines("UIDL")
    if not reply.ok or lines is None:
        for check_id in (
            "uidl.syntax",
            "uidl.unique",
            "uidl.single",
            "uidl.stable",
            "uidl.deleted-hidden",
            "uidl.not-reused",
        ):
            ctx.skip(check_id, f"UIDL is not supported (optional, RFC 1939 s.7): {reply.show()!r}")
        return None
    listing = uidl_listing(lines)
    uids = dict(listing)
    bad = [uid for _, uid in listing if not UNIQUE_ID.fullmatch(uid)]
    ctx.check("uidl.syntax", not bad, f"unique-ids outside 1-70 characters of 0x21-0x7E: {bad[:3]!r}")
    ctx.check(
        "uidl.unique",
        len(set(uids.values())) == len(listing) == count,
        f"{len(listing)} lines, {len(set(uids.values()))} distinct unique-ids, {count} messages",
    )
    for number, uid in listing:
        reply = conn.command(f"UIDL {number}")
        ctx.check(
            "uidl.single",
            reply.line == b"+OK %d %s" % (number, uid),
            f"UIDL {number} answered {reply.show()!r}; the listing says {number} {uid.decode('latin-1')}",
        )
    for number, message in enumerate(ctx.corpus, start=1):
        if number in uids:
            ctx.uid_of[message.name] = uids[number]
    ctx.uids_seen.update(uids.values())
    return uids


TOP_CASES = (
    # (corpus file prefix, lines, check)
    ("01", 0, "corpus.top-headers"),
    ("08", 0, "corpus.top-headers"),
    ("14", 0, "corpus.top-headers"),
    ("14", 1, "corpus.top-lines"),
    ("14", 5, "corpus.top-lines"),
    ("14", 20, "corpus.top-lines"),
    ("14", 25, "corpus.top-lines"),
    ("02", 3, "corpus.top-stuffing"),
    ("02", 100, "corpus.top-stuffing"),
)


def check_top(ctx: Context, conn: Connection) -> Connection:
    """TOP n k (RFC 1939 s.7), against what RETR sent for the same message."""
    numbers = {m.short: n for n, m in enumerate(ctx.corpus, start=1)}
    names = {m.short: m.name for m in ctx.corpus}
    announced = ctx.has_capability("TOP")
    for short, lines, check_id in TOP_CASES:
        content = ctx.contents.get(names[short])
        number = numbers[short]
        if content is None:
            ctx.note(check_id, f"TOP {number} {lines} not tried: RETR {number} failed")
            continue
        try:
            reply, top = conn.multiline(f"TOP {number} {lines}")
        except (ServerSilent, ServerClosed) as exc:
            ctx.fail(check_id, f"TOP {number} {lines}: {exc}")
            conn.drop()
            conn = ctx.session()
            continue
        if top is None:
            if not announced:
                for other in ("corpus.top-headers", "corpus.top-lines", "corpus.top-stuffing"):
                    ctx.skip(other, f"TOP is not supported (optional, RFC 1939 s.7): {reply.show()!r}")
                return conn
            ctx.fail(check_id, f"TOP {number} {lines} answered {reply.show()!r}")
            continue
        expected = expected_top(content, lines)
        if not ctx.check(
            check_id,
            top == expected,
            f"TOP {number} {lines}: " + first_difference(top, expected),
        ):
            conn.drop()
            conn = ctx.session()
    return conn


def check_capa_honest(ctx: Context, conn: Connection, uidl_works: bool) -> None:
    if ctx.capabilities is None:
        ctx.skip("rfc2449.capa-honest", "no CAPA")
        return
    if ctx.has_capability("TOP"):
        reply = conn.command("TOP 1 0")
        if reply.ok:
            conn.read_multiline()
        ctx.check("rfc2449.capa-honest", reply.ok, f"TOP is announced but TOP 1 0 answered {reply.show()!r}")
    if ctx.has_capability("UIDL"):
        ctx.check("rfc2449.capa-honest", uidl_works, "UIDL is announced but does not work")
    ctx.passed("rfc2449.capa-honest")


# RFC 1939: commands in TRANSACTION -------------------------------------------------------------------------
@probe(
    "rfc1939.case-insensitive",
    "rfc1939.noop",
    "rfc1939.bad-message-number",
    "rfc1939.unknown-command",
    "rfc1939.wrong-state",
    "rfc2449.capa-transaction",
    "rfc2449.pipelining",
    "tls.stls-transaction",
    "sasl.after-login",
    "utf8.after-login",
)
def probe_transaction(ctx: Context) -> None:
    conn = ctx.session()
    count, octets = ctx.stat(conn)
    first_size = dict(sizes(conn)).get(1)

    if ctx.capabilities is not None:
        reply, lines = conn.lines("CAPA")
        ctx.check(
            "rfc2449.capa-transaction",
            reply.ok and lines is not None,
            f"CAPA after login answered {reply.show()!r}",
        )
    else:
        ctx.skip("rfc2449.capa-transaction", "no CAPA")

    reply = conn.command("stat")
    ctx.check(
        "rfc1939.case-insensitive", parse_stat(reply) == (count, octets), f"'stat' answered {reply.show()!r}"
    )
    reply = conn.command("List 1")
    ctx.check(
        "rfc1939.case-insensitive",
        reply.line.startswith(b"+OK 1 %d" % (first_size or 0)),
        f"'List 1' answered {reply.show()!r}",
    )
    reply = conn.command("nOoP")
    ctx.check("rfc1939.case-insensitive", reply.ok, f"'nOoP' answered {reply.show()!r}")

    reply = conn.command("NOOP")
    ctx.check("rfc1939.noop", reply.ok, f"NOOP answered {reply.show()!r}")

    past = count + 1
    bad = [
        "RETR 0",
        f"RETR {past}",
        "LIST 0",
        f"LIST {past}",
        f"DELE {past}",
        "DELE 0",
        "RETR abc",
        "RETR -1",
        "LIST x1",
    ]
    if ctx.has_capability("TOP"):
        bad += [f"TOP {past} 0", "TOP 0 0"]
    for index, command in enumerate(bad):
        expect_err(ctx, conn, "rfc1939.bad-message-number", command)
        if index % 3 == 2:
            conn.command("NOOP")  # a success between refusals: no bad-command limit is reached
    ctx.check(
        "rfc1939.bad-message-number",
        ctx.stat(conn) == (count, octets),
        "the refused commands changed what STAT reports",
    )

    try:
        reply = conn.command("XCONFORMANCE")
    except ServerClosed as exc:
        ctx.fail("rfc1939.unknown-command", f"after an unknown command: {exc}")
        conn = ctx.session()
        reply = Reply(b"-ERR")
    if ctx.check("rfc1939.unknown-command", reply.err, f"XCONFORMANCE answered {reply.show()!r}"):
        reply = conn.command("NOOP")
        ctx.check(
            "rfc1939.unknown-command", reply.ok, f"after the unknown command NOOP answered {reply.show()!r}"
        )

    expect_err(ctx, conn, "rfc1939.wrong-state", f"USER {ctx.config.user}")
    expect_err(ctx, conn, "rfc1939.wrong-state", "PASS conformance")
    conn.command("NOOP")

    if ctx.has_capability("PIPELINING"):
        conn = check_pipelining(ctx, conn, count, octets)
    else:
        ctx.skip("rfc2449.pipelining", "PIPELINING is not announced")

    if ctx.has_capability("SASL"):
        reply = conn.command(
            b"AUTH PLAIN " + base64.b64encode(b"\0x\0y"), shown="AUTH PLAIN ***", continuation_ok=True
        )
        ctx.check("sasl.after-login", reply.err, f"AUTH after login answered {reply.show()!r}")
    else:
        ctx.skip("sasl.after-login", "SASL is not announced")
    if ctx.has_capability("UTF8"):
        expect_err(ctx, conn, "utf8.after-login", "UTF8")
    else:
        ctx.skip("utf8.after-login", "UTF8 is not announced")
    conn.command("NOOP")

    # Last: a server that wrongly accepts STLS here leaves the session unusable.
    if ctx.has_capability("STLS", ctx.capa_before) or ctx.config.stls:
        reply = conn.command("STLS")
        ctx.check("tls.stls-transaction", reply.err, f"STLS after login answered {reply.show()!r}")
        if not reply.err:
            conn.drop()
            return
    else:
        ctx.skip("tls.stls-transaction", "STLS is not announced")
    drain_quit(conn)


def check_pipelining(ctx: Context, conn: Connection, count: int, octets: int) -> Connection:
    """RFC 2449 s.6.6: several commands in one write, every reply in order."""
    listing = sizes(conn)
    conn.send(b"STAT\r\nLIST\r\nNOOP\r\nLIST 1\r\nSTAT\r\n")
    try:
        replies = [conn.read_status("pipelined STAT")]
        list_reply = conn.read_status("pipelined LIST")
        list_body = conn.read_multiline() if list_reply.ok else None
        replies += [
            conn.read_status("pipelined NOOP"),
            conn.read_status("pipelined LIST 1"),
            conn.read_status("pipelined STAT"),
        ]
    except ServerSilent:
        ctx.fail("rfc2449.pipelining", "five commands sent in one write did not all get an answer")
        conn.drop()
        return ctx.session()
    got_listing = scan_listing(list_reply, list_body.split(b"\r\n")[:-1] if list_body is not None else None)
    ok = (
        parse_stat(replies[0]) == (count, octets)
        and got_listing == listing
        and replies[1].ok
        and replies[2].line.startswith(b"+OK 1 ")
        and parse_stat(replies[3]) == (count, octets)
    )
    ctx.check(
        "rfc2449.pipelining",
        ok,
        "the replies to STAT, LIST, NOOP, LIST 1, STAT sent in one write "
        f"were {[r.show(40) for r in replies]}",
    )
    return conn


# RFC 1939 in AUTHORIZATION ---------------------------------------------------------------------------------
@probe(
    "rfc1939.wrong-state",
    "rfc1939.wrong-password",
    "rfc2449.command-length",
    "rfc2449.auth-code",
    "rfc2449.capa-honest",
    needs_corpus=False,
)
def probe_authorization(ctx: Context) -> None:
    conn = ctx.connect()
    if ctx.has_capability("USER"):
        reply = conn.command(f"USER {ctx.config.user}")
        ctx.check("rfc2449.capa-honest", reply.ok, f"USER is announced but USER answered {reply.show()!r}")
    can_reset = ctx.capabilities is not None
    for command in ("STAT", "LIST", "RETR 1", "DELE 1", "NOOP"):
        expect_err(ctx, conn, "rfc1939.wrong-state", command)
        if can_reset:
            conn.lines("CAPA")  # a success: Dovecot closes after 3 bad commands in a row before login
        else:
            drain_quit(conn)
            conn = ctx.connect()

    line = "USER " + "a" * 248  # 255 octets with CRLF (RFC 2449 s.4)
    reply = conn.command(line)
    refused_as_long = reply.err and re.search(rb"long|length", reply.text, re.IGNORECASE)
    ctx.check(
        "rfc2449.command-length",
        reply.ok or (reply.err and not refused_as_long),
        f"a 255-octet USER line answered {reply.show()!r}",
    )
    reply = conn.quit()
    ctx.check(
        "rfc2449.command-length",
        reply is not None and reply.ok,
        "after a 255-octet line QUIT did not get +OK (was the line split in two?)",
    )

    if not ctx.config.failed_login:
        for check_id in ("rfc1939.wrong-password", "rfc2449.auth-code"):
            ctx.skip(check_id, "not tried: --no-failed-login")
        return
    conn = ctx.connect()
    reply = ctx.login(conn, password="wrong-" + ctx.run_id)
    if ctx.check("rfc1939.wrong-password", reply.err, f"a wrong password got {reply.show()!r}"):
        if ctx.has_capability("AUTH-RESP-CODE"):
            ctx.check(
                "rfc2449.auth-code",
                reply.code == "AUTH",
                f"AUTH-RESP-CODE is announced but a wrong password got {reply.show()!r}",
            )
        else:
            ctx.skip("rfc2449.auth-code", "AUTH-RESP-CODE is not announced")
        try:
            reply = conn.command("STAT")
        except ServerClosed:
            ctx.note("rfc1939.wrong-password", "the server closed the connection after the failed login")
        else:
            ctx.check(
                "rfc1939.wrong-password", reply.err, f"after a failed login STAT answered {reply.show()!r}"
            )
    else:
        ctx.skip("rfc2449.auth-code", "the wrong password was accepted")
    drain_quit(conn)


# RFC 1939 s.4: the exclusive lock --------------------------------------------------------------------------
@probe(
    "rfc1939.lock-exclusive", "rfc1939.lock-holder-unaffected", "rfc1939.lock-released-quit", "rfc2449.in-use"
)
def probe_lock(ctx: Context) -> None:
    first = ctx.session()
    before = ctx.stat(first)
    second = ctx.connect()
    reply = ctx.login(second)
    if ctx.check(
        "rfc1939.lock-exclusive",
        reply.err,
        "a second session logged in while the first held the maildrop (RFC 1939 s.4: the server "
        "takes an exclusive-access lock)",
    ):
        ctx.check("rfc2449.in-use", reply.code == "IN-USE", f"the refusal was {reply.show()!r}")
    else:
        ctx.skip("rfc2449.in-use", "the second login was not refused")
    drain_quit(second)

    try:
        ok = first.command("NOOP").ok and ctx.stat(first) == before
        reply, body = first.multiline("RETR 1")
        ok = ok and body is not None
    except ProtocolError as exc:
        ctx.fail("rfc1939.lock-holder-unaffected", f"the first session broke: {exc}")
        first.drop()
        first = ctx.session()
    else:
        ctx.check("rfc1939.lock-holder-unaffected", ok, "the first session no longer works as before")
    reply = first.quit()
    if reply is None or not reply.ok:
        raise ProtocolError(f"QUIT answered {reply.show() if reply else 'nothing'}")
    conn = ctx.connect()
    reply = ctx.login(conn)
    ctx.check("rfc1939.lock-released-quit", reply.ok, f"a login right after QUIT got {reply.show()!r}")
    drain_quit(conn)


# RFC 1939 s.4: the session's view is fixed at login --------------------------------------------------------
@probe("rfc1939.snapshot")
def probe_snapshot(ctx: Context) -> None:
    conn = ctx.session()
    stat = ctx.stat(conn)
    listing = sizes(conn)
    uids = uid_map(conn)
    ctx.deliver(ctx.extra_message("mid-session"))
    if ctx.deliverer is not None and not ctx.deliverer.synchronous:
        ctx.note(
            "rfc1939.snapshot",
            f"{ctx.deliverer.name} may queue: the new mail may have arrived only "
            "after this session looked, which makes a pass weaker",
        )
    ok = ctx.stat(conn) == stat and sizes(conn) == listing and conn.command(f"LIST {stat[0] + 1}").err
    if uids is not None:
        ok = ok and uid_map(conn) == uids
    ctx.check(
        "rfc1939.snapshot",
        ok,
        "mail delivered during the session showed up in it (STAT, LIST or UIDL changed)",
    )
    reply = conn.quit()
    if reply is None or not reply.ok:
        raise ProtocolError("QUIT failed")
    try:
        ctx.wait_for_count(stat[0] + 1, "the message delivered during a session")
    except MailboxMismatch as exc:
        ctx.fail("rfc1939.snapshot", f"the next session does not list it: {exc}")
        raise ProtocolError(str(exc)) from None
    ctx.passed("rfc1939.snapshot")


# RFC 1939 s.5, s.6: DELE, RSET, QUIT, and dropped connections ----------------------------------------------
@probe(
    "rfc1939.dele-marks",
    "rfc1939.dele-drop-keeps",
    "rfc1939.lock-released-drop",
    "rfc1939.rset",
    "rfc1939.quit-deletes",
    "uidl.deleted-hidden",
    "uidl.stable",
    "uidl.not-reused",
)
def probe_deletion(ctx: Context) -> None:
    conn = ctx.session()
    count, octets = ctx.stat(conn)
    listing = sizes(conn)
    size = dict(listing)
    uids = uid_map(conn)
    if uids is None:
        for check_id in ("uidl.deleted-hidden", "uidl.stable", "uidl.not-reused"):
            ctx.skip(check_id, "UIDL is not supported (optional, RFC 1939 s.7)")
    elif ctx.uid_of:
        first_uids = {ctx.uid_of[m.name] for m in ctx.corpus if m.name in ctx.uid_of}
        ctx.check(
            "uidl.stable",
            first_uids <= set(uids.values()),
            "the corpus messages have other unique-ids than in an earlier session",
        )

    # DELE marks only.
    for number in (1, 2):
        reply = conn.command(f"DELE {number}")
        ctx.check("rfc1939.dele-marks", reply.ok, f"DELE {number} answered {reply.show()!r}")
    ctx.check(
        "rfc1939.dele-marks",
        ctx.stat(conn) == (count - 2, octets - size[1] - size[2]),
        "STAT after DELE 1 and DELE 2 still counts them (or miscounts)",
    )
    ctx.check(
        "rfc1939.dele-marks",
        [n for n, _ in sizes(conn)] == list(range(3, count + 1)),
        "LIST after DELE 1 and DELE 2 lists them, or the other messages got new numbers",
    )
    for command in ("LIST 1", "RETR 1", "DELE 2"):
        expect_err(ctx, conn, "rfc1939.dele-marks", command)
    conn.command("NOOP")
    if ctx.has_capability("TOP"):
        expect_err(ctx, conn, "rfc1939.dele-marks", "TOP 1 0")
    reply = conn.command("LIST 3")
    ctx.check(
        "rfc1939.dele-marks",
        reply.line.startswith(b"+OK 3 %d" % size[3]),
        f"after DELE 1 and DELE 2, LIST 3 answered {reply.show()!r}",
    )
    if uids is not None:
        expect_err(ctx, conn, "uidl.deleted-hidden", "UIDL 1")
        conn.command("NOOP")
        after = uid_map(conn)
        ctx.check(
            "uidl.deleted-hidden",
            after == {n: u for n, u in uids.items() if n > 2},
            "the UIDL listing after DELE 1 and DELE 2 is not the old one without them",
        )

    # A dropped connection removes nothing (RFC 1939 s.6).
    conn.drop()
    dropped = time.monotonic()
    try:
        conn = ctx.session()
    except LoginFailed as exc:
        ctx.fail(
            "rfc1939.lock-released-drop",
            f"{ctx.config.lock_wait:g} s after a dropped connection logins were still refused: {exc}",
        )
        raise
    waited = time.monotonic() - dropped
    ctx.check(
        "rfc1939.lock-released-drop",
        waited <= LOCK_RELEASE_LIMIT,
        f"the next login succeeded only after {waited:.1f} s",
    )
    stat = ctx.stat(conn)
    ctx.check(
        "rfc1939.dele-drop-keeps",
        stat == (count, octets),
        f"after DELE 1, DELE 2 and a dropped connection STAT says {stat}, not {(count, octets)}",
    )
    if uids is not None:
        ctx.check("uidl.stable", uid_map(conn) == uids, "the unique-ids changed from one session to the next")

    # RSET unmarks, and QUIT then deletes nothing.
    for number in (1, 3):
        conn.command(f"DELE {number}")
    reply = conn.command("RSET")
    ctx.check("rfc1939.rset", reply.ok, f"RSET answered {reply.show()!r}")
    ctx.check(
        "rfc1939.rset", ctx.stat(conn) == (count, octets), "STAT after DELE, DELE, RSET is not as before"
    )
    reply = conn.command("LIST 1")
    ctx.check(
        "rfc1939.rset", reply.line.startswith(b"+OK 1 %d" % size[1]), f"LIST 1 after RSET: {reply.show()!r}"
    )
    reply = conn.quit()
    ctx.check("rfc1939.rset", reply is not None and reply.ok, "QUIT after RSET did not answer +OK")
    conn = ctx.session()
    ctx.check("rfc1939.rset", ctx.stat(conn) == (count, octets), "QUIT after RSET removed messages")

    # QUIT removes exactly what was marked.
    marked = (1, count)
    for number in marked:
        conn.command(f"DELE {number}")
    reply = conn.quit()
    ctx.check(
        "rfc1939.quit-deletes",
        reply is not None and reply.ok,
        f"QUIT after DELE answered {reply.show() if reply else 'nothing'}",
    )
    conn = ctx.session()
    kept = [s for n, s in listing if n not in marked]
    after_sizes = [s for _, s in sizes(conn)]
    after_stat = ctx.stat(conn)
    ctx.mailbox_count = after_stat[0]
    ctx.check(
        "rfc1939.quit-deletes",
        after_stat == (count - 2, sum(kept)) and after_sizes == kept,
        f"after DELE 1, DELE {count} and QUIT the maildrop is not the old one without them",
    )
    if uids is not None:
        after = uid_map(conn) or {}
        expected = [u for n, u in sorted(uids.items()) if n not in marked]
        ctx.check(
            "rfc1939.quit-deletes",
            [after[n] for n in sorted(after)] == expected,
            "the unique-ids left after QUIT are not the old ones without the deleted messages",
        )
        ctx.check(
            "uidl.stable",
            [after[n] for n in sorted(after)] == expected,
            "the messages left after a deletion have other unique-ids",
        )
    drain_quit(conn)

    # A new message gets a unique-id never seen before.
    if uids is None:
        return
    survivors = {u for n, u in uids.items() if n not in marked}
    ctx.uids_seen.update(uids.values())
    ctx.deliver(ctx.extra_message("after-deletion"))
    ctx.wait_for_count(ctx.mailbox_count + 1, "a message delivered after a deletion")
    ctx.mailbox_count += 1
    conn = ctx.session()
    now = uid_map(conn) or {}
    new = [u for u in now.values() if u not in survivors]
    ctx.check(
        "uidl.not-reused",
        len(new) == 1 and new[0] not in ctx.uids_seen,
        f"the new message got {new!r}, a unique-id used before (the deleted ones were "
        f"{sorted(uids[n] for n in marked)!r})",
    )
    ctx.uids_seen.update(now.values())
    drain_quit(conn)


# RFC 2595, RFC 8314: TLS -----------------------------------------------------------------------------------
@probe("tls.stls", "tls.capa-after-stls", "tls.stls-once", "tls.stls-injection", needs_corpus=False)
def probe_tls(ctx: Context) -> None:
    if ctx.config.implicit_tls:
        for check_id in ("tls.stls", "tls.capa-after-stls", "tls.stls-once", "tls.stls-injection"):
            ctx.skip(check_id, "the connection is implicit TLS (pop3s://)")
        if ctx.capa_before is not None:
            ctx.check(
                "tls.capa-after-stls",
                not ctx.has_capability("STLS", ctx.capa_before),
                "CAPA on an implicit-TLS connection announces STLS",
            )
        return
    if not (ctx.has_capability("STLS", ctx.capa_before) or ctx.config.stls):
        for check_id in ("tls.stls", "tls.capa-after-stls", "tls.stls-once", "tls.stls-injection"):
            ctx.skip(check_id, "STLS is not announced")
        return
    conn = ctx.open()
    try:
        ctx.start_tls(conn)
    except ProtocolError as exc:
        ctx.fail("tls.stls", str(exc))
        conn.drop()
        return
    reply, lines = conn.lines("CAPA")
    caps = [line.decode("utf-8", "replace") for line in lines or []]
    ctx.check(
        "tls.capa-after-stls",
        reply.ok and not ctx.has_capability("STLS", caps),
        f"CAPA inside TLS: {reply.show()!r}, {caps}",
    )
    reply = conn.command("STLS")
    ctx.check("tls.stls-once", reply.err, f"STLS inside TLS answered {reply.show()!r}")
    if not reply.err:  # the session is of no more use
        conn.drop()
        conn = ctx.open()
        ctx.start_tls(conn)
    login = ctx.login(conn, capabilities=caps or ctx.capabilities)
    if ctx.check("tls.stls", login.ok, f"login inside TLS got {login.show()!r}"):
        ctx.stat(conn)
    drain_quit(conn)

    check_stls_injection(ctx)


# OpenSSL's words for a TLS peer that sent something that is not TLS (here: a plaintext POP3 reply).
NOT_TLS = re.compile(
    r"WRONG_VERSION_NUMBER|RECORD_LAYER_FAILURE|PACKET_LENGTH_TOO_LONG|UNKNOWN_PROTOCOL", re.I
)
PLAINTEXT_GRACE = 1.0  # seconds to wait for a plaintext answer to the injected command before the handshake


def check_stls_injection(ctx: Context) -> None:
    """RFC 2595 s.4; CVE-2011-0411: a command pipelined in plaintext after STLS must never run.

    Two answers are safe: discard the plaintext and complete the handshake (the first reply inside TLS is
    then to the kit's own CAPA), or take the octets after the CRLF of +OK as the start of the TLS
    negotiation, which RFC 2595 s.4 says begins right there, and fail the handshake. Unsafe: answering the
    injected command in plaintext, or running it inside TLS."""
    conn = ctx.open()
    conn.send(b"STLS\r\nXCONFORMANCE-INJECTED\r\n")
    reply = conn.read_status("STLS")
    if not reply.ok:
        ctx.fail("tls.stls-injection", f"STLS answered {reply.show()!r}")
        conn.drop()
        return
    early = conn.unsolicited(PLAINTEXT_GRACE)  # in TLS the client speaks first: the server must wait
    if early:
        ctx.fail("tls.stls-injection", f"the injected command was answered in plaintext: {early[:60]!r}")
        conn.drop()
        return
    try:
        conn.start_tls(ctx.tls_context(), ctx.config.host)
    except ProtocolError as exc:
        ctx.fail("tls.stls-injection", f"the injected command was answered in plaintext: {exc}")
        conn.drop()
        return
    except (ssl.SSLError, OSError) as exc:
        conn.drop()
        if NOT_TLS.search(str(exc)):
            ctx.fail("tls.stls-injection", f"the server sent plaintext instead of TLS: {tls_hint(exc)}")
            return
        ctx.passed(
            "tls.stls-injection",
            "the handshake failed with plaintext pipelined behind STLS, where RFC 2595 s.4 starts the TLS "
            f"negotiation ({exc}): the injected command did not run",
        )
        return
    reply = conn.command("CAPA")
    ctx.check(
        "tls.stls-injection",
        reply.ok,
        f"the first answer inside TLS was {reply.show()!r}: the command sent in plaintext after STLS ran",
    )
    if reply.ok:
        conn.read_multiline()
    drain_quit(conn)


# RFC 5034: SASL ----------------------------------------------------------------------------------------------
SASL_IDS = (
    "sasl.plain",
    "sasl.plain-continuation",
    "sasl.login",
    "sasl.cancel",
    "sasl.bad-base64",
    "sasl.unknown-mechanism",
    "sasl.list-mechanisms",
)


@probe(*SASL_IDS, needs_corpus=False)
def probe_sasl(ctx: Context) -> None:
    if not ctx.has_capability("SASL"):
        for check_id in SASL_IDS:
            ctx.skip(check_id, "SASL is not announced")
        return
    mechanisms = [m.upper() for m in ctx.capability_args("SASL")]
    user, secret = ctx.config.user.encode("utf-8"), ctx.config.password.encode("utf-8")
    plain = base64.b64encode(b"\0" + user + b"\0" + secret)

    def logged_in(conn: Connection, reply: Reply, check_id: str, what: str) -> None:
        if ctx.check(check_id, reply.ok, f"{what} got {reply.show()!r}"):
            ctx.check(check_id, ctx.stat(conn)[0] >= 0, "STAT failed after the login")
            reply = conn.quit()
            ctx.check(check_id, reply is not None and reply.ok, "QUIT failed after the login")
        else:
            conn.drop()

    if "PLAIN" in mechanisms:
        conn = ctx.connect()
        logged_in(
            conn,
            conn.command(b"AUTH PLAIN " + plain, shown="AUTH PLAIN ***", continuation_ok=True),
            "sasl.plain",
            "AUTH PLAIN with an initial response",
        )
        conn = ctx.connect()
        reply = conn.command("AUTH PLAIN", continuation_ok=True)
        if ctx.check("sasl.plain-continuation", reply.continuation, f"AUTH PLAIN answered {reply.show()!r}"):
            conn.send(plain + b"\r\n", shown="***")
            logged_in(
                conn, conn.read_status("AUTH PLAIN response"), "sasl.plain-continuation", "the PLAIN response"
            )
        else:
            conn.drop()
        sasl_refusal(ctx, "sasl.cancel", b"*", "a '*' response")
        sasl_refusal(ctx, "sasl.bad-base64", b"!!not*base64!!", "a response that is not base64")
    else:
        for check_id in ("sasl.plain", "sasl.plain-continuation", "sasl.cancel", "sasl.bad-base64"):
            ctx.skip(check_id, "PLAIN is not among the SASL mechanisms")

    if "LOGIN" in mechanisms:
        conn = ctx.connect()
        reply = conn.command("AUTH LOGIN", continuation_ok=True)
        ok = reply.continuation
        if ok:
            conn.send(base64.b64encode(user) + b"\r\n", shown="***")
            reply = conn.read_status("AUTH LOGIN user", continuation_ok=True)
            ok = reply.continuation
        if ok:
            conn.send(base64.b64encode(secret) + b"\r\n", shown="***")
            logged_in(conn, conn.read_status("AUTH LOGIN password"), "sasl.login", "AUTH LOGIN")
        else:
            ctx.fail("sasl.login", f"AUTH LOGIN answered {reply.show()!r}")
            conn.drop()
    else:
        ctx.skip("sasl.login", "LOGIN is not among the SASL mechanisms")

    conn = ctx.connect()
    reply = conn.command("AUTH X-CONFORMANCE-UNKNOWN", continuation_ok=True)
    ctx.check("sasl.unknown-mechanism", reply.err, f"AUTH X-CONFORMANCE-UNKNOWN answered {reply.show()!r}")
    drain_quit(conn)

    conn = ctx.connect()
    reply = conn.command("AUTH")
    if reply.ok:
        listed = [
            line.decode("utf-8", "replace").upper() for line in conn.read_multiline().split(b"\r\n")[:-1]
        ]
        ctx.check(
            "sasl.list-mechanisms",
            set(mechanisms) <= set(listed),
            f"AUTH listed {listed}; CAPA announces {mechanisms}",
        )
    else:
        ctx.fail("sasl.list-mechanisms", f"AUTH without arguments answered {reply.show()!r}")
    drain_quit(conn)


def sasl_refusal(ctx: Context, check_id: str, response: bytes, what: str) -> None:
    conn = ctx.connect()
    reply = conn.command("AUTH PLAIN", continuation_ok=True)
    if not reply.continuation:
        ctx.fail(check_id, f"AUTH PLAIN answered {reply.show()!r}")
        conn.drop()
        return
    conn.send(response + b"\r\n")
    reply = conn.read_status(f"AUTH PLAIN {what}", continuation_ok=True)
    if ctx.check(check_id, reply.err, f"{what} got {reply.show()!r}"):
        reply = conn.quit()
        ctx.check(check_id, reply is not None and reply.ok, f"after {what}, QUIT did not get +OK")
    else:
        conn.drop()


# RFC 6856: UTF8 -----------------------------------------------------------------------------------------------
@probe("utf8.command", "utf8.retr")
def probe_utf8(ctx: Context) -> None:
    if not ctx.has_capability("UTF8"):
        for check_id in ("utf8.command", "utf8.retr"):
            ctx.skip(check_id, "UTF8 is not announced (RFC 6856 is optional)")
        return
    conn = ctx.connect()
    reply = conn.command("UTF8")
    if not ctx.check("utf8.command", reply.ok, f"UTF8 answered {reply.show()!r}"):
        conn.drop()
        ctx.skip("utf8.retr", "UTF8 was refused")
        return
    reply = ctx.login(conn)
    if not reply.ok:
        raise LoginFailed(reply)
    message = next(m for m in ctx.corpus if m.short == "05")
    number = ctx.corpus.index(message) + 1
    reply, content = conn.multiline(f"RETR {number}")
    expected = message.expected()
    ctx.check(
        "utf8.retr",
        content is not None and content.endswith(expected),
        f"RETR {number} after UTF8: "
        + (first_difference(content, expected) if content is not None else reply.show()),
    )
    drain_quit(conn)


# RFC 1939 s.3: an idle session --------------------------------------------------------------------------------
@probe("rfc1939.autologout", needs_corpus=False)
def probe_autologout(ctx: Context) -> None:
    wait = ctx.config.autologout_wait
    if wait <= 0:
        ctx.skip("rfc1939.autologout", "not tried: give --autologout-wait 600 (ten minutes)")
        return
    conn = ctx.session()
    time.sleep(wait)  # idling is the test
    try:
        reply = conn.command("NOOP")
    except ProtocolError as exc:
        ctx.fail("rfc1939.autologout", f"after {wait:g} s idle: {exc}")
        conn.drop()
        return
    ctx.check("rfc1939.autologout", reply.ok, f"after {wait:g} s idle NOOP answered {reply.show()!r}")
    if wait < 600:
        ctx.note("rfc1939.autologout", f"waited {wait:g} s, less than the 10 minutes RFC 1939 s.3 asks")
    drain_quit(conn)


# Robustness -----------------------------------------------------------------------------------------------
@probe(
    "robustness.empty-line",
    "robustness.garbage",
    "robustness.overlong-line",
    "robustness.lf-only",
    "robustness.server-alive",
    needs_corpus=False,
)
def probe_robustness(ctx: Context) -> None:
    bounded_probe(ctx, "robustness.empty-line", b"\r\n", may_close=False)
    bounded_probe(
        ctx, "robustness.garbage", b"\x00\x01\xfe\xff\x80 GARBAGE \x1b[2J\x7f\x00\r\n", may_close=True
    )
    bounded_probe(ctx, "robustness.overlong-line", b"X" * 4094 + b"\r\n", may_close=True)

    try:
        conn = ctx.open()
        conn.send(b"QUIT\n")
        reply = conn.read_status("QUIT ended by LF")
        ctx.check("robustness.lf-only", reply.ok, f"'QUIT' ended by a bare LF answered {reply.show()!r}")
        conn.drop()
    except ProtocolError as exc:
        ctx.fail("robustness.lf-only", f"'QUIT' ended by a bare LF: {exc}")

    try:
        conn = ctx.session()
        ctx.stat(conn)
        reply = conn.quit()
        ctx.check("robustness.server-alive", reply is not None and reply.ok, "QUIT failed")
    except (ProtocolError, OSError) as exc:
        ctx.fail("robustness.server-alive", f"after the probes: {exc}")


def bounded_probe(ctx: Context, check_id: str, data: bytes, may_close: bool) -> None:
    """Send ``data`` on a fresh connection before login; expect -ERR (or, if allowed, -ERR and a close),
    then a working session; then a new connection must still be greeted."""
    conn = ctx.open()
    conn.send(data, shown=f"<{len(data)} octets>")
    try:
        reply = conn.read_status(check_id)
    except ServerClosed:
        reply = None
    except ServerSilent as exc:
        ctx.fail(check_id, f"no answer to {len(data)} octets: {exc}")
        conn.drop()
        return
    if reply is not None and not reply.err:
        ctx.fail(check_id, f"{len(data)} octets of bad input got {reply.show()!r}, not -ERR")
    elif reply is None and not may_close:
        ctx.fail(check_id, "the server closed the connection instead of answering -ERR")
    else:
        try:
            quit_reply = conn.command("QUIT")
            ctx.check(check_id, quit_reply.ok, f"after the bad input QUIT answered {quit_reply.show()!r}")
        except (ServerClosed, ServerSilent):
            if not may_close:
                ctx.fail(check_id, "the session did not go on after -ERR")
    conn.drop()
    try:
        again = ctx.open()
        again.quit()
        ctx.passed(check_id)
    except (ProtocolError, OSError) as exc:
        ctx.fail(check_id, f"the server no longer greets new connections: {exc}")


# Over every status line the run saw -----------------------------------------------------------------------
def global_checks(ctx: Context) -> None:
    lines = ctx.status_lines
    bad = [
        (where, line) for where, line, crlf in lines if not crlf or not re.match(rb"(\+OK|-ERR)( |$)", line)
    ]
    ctx.check(
        "rfc1939.status-indicators",
        not bad,
        "; ".join(f"{where}: {line[:60]!r}" for where, line in bad[:3]) + " (not +OK/-ERR, or no CRLF)",
    )
    long = sorted({(where, len(line) + 2) for where, line, _ in lines if len(line) + 2 > 512})
    ctx.check(
        "rfc2449.response-length", not long, "; ".join(f"{where}: {size} octets" for where, size in long[:3])
    )
    if ctx.has_capability("RESP-CODES"):
        malformed = []
        for where, line, _ in lines:
            text = re.sub(rb"^(\+OK|-ERR) ?", b"", line)
            if text.startswith(b"[") and not RESP_CODE.match(text):
                malformed.append((where, line))
        ctx.check(
            "rfc2449.resp-codes",
            not malformed,
            "; ".join(f"{where}: {line[:60]!r}" for where, line in malformed[:3]),
        )
    else:
        ctx.skip("rfc2449.resp-codes", "RESP-CODES is not announced")


# Checks made by the first contact, the first login and over every status line: they always run.
SETUP_IDS = (
    "rfc1939.greeting",
    "rfc1939.login",
    "rfc1939.quit-authorization",
    "rfc1939.status-indicators",
    "rfc2449.capa",
    "rfc2449.capa-syntax",
    "rfc2449.response-length",
    "rfc2449.resp-codes",
    "tls.implicit",
)

# The order matters: reading probes first, then those that add mail (snapshot) and delete it.
PROBES = [
    _REGISTERED[name]
    for name in (
        "probe_corpus",
        "probe_transaction",
        "probe_authorization",
        "probe_utf8",
        "probe_lock",
        "probe_snapshot",
        "probe_deletion",
        "probe_tls",
        "probe_sasl",
        "probe_autologout",
        "probe_robustness",
    )
]
assert len(PROBES) == len(_REGISTERED)
