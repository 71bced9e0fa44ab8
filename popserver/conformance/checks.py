"""Every check the kit makes: its id, section, level, citation and what it verifies.

Levels: MUST and SHOULD are the RFCs' requirement levels (RFC 1939 predates RFC 2119 and writes most of its
rules as plain statements of what the server does; those are MUST here). "Dovecot-practice" is what a mature
server does where the RFCs leave the choice open. The kit exits 0 when every MUST that ran passed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

MUST = "MUST"
SHOULD = "SHOULD"
PRACTICE = "Dovecot-practice"
LEVELS = (MUST, SHOULD, PRACTICE)

SECTIONS = {
    "rfc1939": "RFC 1939: states and commands",
    "corpus": "RFC 1939 s.3, s.5, s.7, s.11: message bytes (the corpus)",
    "uidl": "RFC 1939 s.7, s.8: UIDL",
    "rfc2449": "RFC 2449 and RFC 3206: CAPA and response codes",
    "tls": "RFC 2595 and RFC 8314: TLS",
    "sasl": "RFC 5034: SASL",
    "utf8": "RFC 6856: UTF8 (only if the server announces it)",
    "robustness": "Robustness: bounded probes, safe on a production server",
}


@dataclass(frozen=True)
class Check:
    id: str
    level: str
    citation: str
    title: str

    @property
    def section(self) -> str:
        return self.id.split(".", 1)[0]


def _checks(*rows: tuple[str, str, str, str]) -> tuple[Check, ...]:
    return tuple(Check(*row) for row in rows)


CHECKS = _checks(
    # RFC 1939: states and commands
    ("rfc1939.greeting", MUST, "RFC 1939 s.4", "The greeting is a +OK line"),
    (
        "rfc1939.status-indicators",
        MUST,
        "RFC 1939 s.3",
        "Every status line starts with +OK or -ERR, in upper case, and ends with CRLF",
    ),
    ("rfc1939.login", MUST, "RFC 1939 s.4, s.7", "The given credentials open the maildrop"),
    (
        "rfc1939.wrong-password",
        MUST,
        "RFC 1939 s.7",
        "A wrong password gets -ERR and the session stays in AUTHORIZATION",
    ),
    (
        "rfc1939.quit-authorization",
        MUST,
        "RFC 1939 s.4",
        "QUIT before login answers +OK and the server closes the connection",
    ),
    (
        "rfc1939.wrong-state",
        MUST,
        "RFC 1939 s.4, s.5",
        "TRANSACTION commands are refused before login, USER and PASS after it",
    ),
    ("rfc1939.case-insensitive", MUST, "RFC 1939 s.3", "Keywords are case-insensitive (stat, List, noop)"),
    (
        "rfc1939.stat",
        MUST,
        "RFC 1939 s.5",
        "STAT answers '+OK nn mm': the count and the sum of the LIST sizes",
    ),
    (
        "rfc1939.list",
        MUST,
        "RFC 1939 s.5",
        "LIST gives one 'n size' line per message numbered from 1, and LIST n agrees",
    ),
    (
        "rfc1939.bad-message-number",
        MUST,
        "RFC 1939 s.5",
        "RETR, LIST, TOP and DELE of 0, of a number past the last or of a non-number get -ERR",
    ),
    ("rfc1939.noop", MUST, "RFC 1939 s.5", "NOOP answers +OK"),
    ("rfc1939.unknown-command", MUST, "RFC 1939 s.3", "An unknown command gets -ERR and the session goes on"),
    (
        "rfc1939.dele-marks",
        MUST,
        "RFC 1939 s.5",
        "DELE only marks: the message leaves STAT and LIST, using it gets -ERR, other numbers stay",
    ),
    ("rfc1939.dele-drop-keeps", MUST, "RFC 1939 s.6", "A connection dropped after DELE removes nothing"),
    (
        "rfc1939.quit-deletes",
        MUST,
        "RFC 1939 s.6",
        "QUIT after DELE answers +OK and removes exactly the marked messages",
    ),
    (
        "rfc1939.rset",
        MUST,
        "RFC 1939 s.5",
        "RSET unmarks: the messages come back and QUIT then removes nothing",
    ),
    (
        "rfc1939.lock-exclusive",
        MUST,
        "RFC 1939 s.4",
        "A second login while a session holds the maildrop is refused with -ERR",
    ),
    (
        "rfc1939.lock-holder-unaffected",
        MUST,
        "RFC 1939 s.4",
        "The session holding the maildrop works on after another login was tried",
    ),
    ("rfc1939.lock-released-quit", MUST, "RFC 1939 s.6", "After QUIT the next login succeeds at once"),
    (
        "rfc1939.lock-released-drop",
        PRACTICE,
        "RFC 1939 s.6; Dovecot",
        "After a dropped connection the next login succeeds within 5 seconds",
    ),
    (
        "rfc1939.snapshot",
        SHOULD,
        "RFC 1939 s.4, s.5",
        "Mail delivered during a session is not listed until the next session, which lists it",
    ),
    (
        "rfc1939.autologout",
        MUST,
        "RFC 1939 s.3",
        "An idle session survives at least 10 minutes (only with --autologout-wait)",
    ),
    # The corpus, byte for byte
    (
        "corpus.list-sizes",
        MUST,
        "RFC 1939 s.5, s.11",
        "LIST sizes are the octets RETR sends, unstuffed, with CRLF line endings",
    ),
    (
        "corpus.retr",
        MUST,
        "RFC 1939 s.5",
        "RETR returns ordinary messages unchanged (01, 08 headers only, 09, 11, 12, 14)",
    ),
    (
        "corpus.dot-stuffing",
        MUST,
        "RFC 1939 s.3",
        "Lines starting with '.' are dot-stuffed; a lone '.' in the body does not end the response (02)",
    ),
    ("corpus.bare-lf", MUST, "RFC 1939 s.3, s.11", "Bare LF line endings go out as CRLF (03)"),
    (
        "corpus.unterminated-last-line",
        MUST,
        "RFC 1939 s.3",
        "A last line without a line ending gets CRLF before the terminating '.' (04)",
    ),
    ("corpus.8bit", MUST, "RFC 1939 s.5", "8-bit octets, UTF-8 or not, come back unchanged (05, 06)"),
    ("corpus.long-line", MUST, "RFC 1939 s.5", "A 5000-octet line comes back unchanged (07)"),
    (
        "corpus.lone-cr",
        PRACTICE,
        "RFC 1939 s.11; Dovecot",
        "A lone CR stays data while LF and CRLF both go out as CRLF (10)",
    ),
    ("corpus.nul", MUST, "RFC 1939 s.5", "A NUL octet does not truncate the message (13)"),
    (
        "corpus.buffer-boundaries",
        MUST,
        "RFC 1939 s.3",
        "Dot-stuffing and CRLFs survive buffer boundaries from 1 KiB to 1 MiB (15, generated, 1 MB)",
    ),
    ("corpus.top-headers", MUST, "RFC 1939 s.7", "TOP n 0 sends the headers and the blank line (01, 08, 14)"),
    (
        "corpus.top-lines",
        MUST,
        "RFC 1939 s.7",
        "TOP n k sends exactly k body lines (14 with k = 1, 5, 20, 25)",
    ),
    ("corpus.top-stuffing", MUST, "RFC 1939 s.3, s.7", "TOP dot-stuffs like RETR (02)"),
    # UIDL
    ("uidl.syntax", MUST, "RFC 1939 s.7", "Every unique-id is 1 to 70 characters in 0x21-0x7E"),
    ("uidl.unique", MUST, "RFC 1939 s.7", "Unique-ids are unique within the maildrop"),
    ("uidl.single", MUST, "RFC 1939 s.7", "UIDL n agrees with the UIDL listing"),
    (
        "uidl.stable",
        MUST,
        "RFC 1939 s.7, s.8",
        "A message keeps its unique-id across sessions and when others are deleted",
    ),
    (
        "uidl.deleted-hidden",
        MUST,
        "RFC 1939 s.7",
        "A message marked deleted is not in the UIDL listing and UIDL n gets -ERR",
    ),
    (
        "uidl.not-reused",
        SHOULD,
        "RFC 1939 s.7",
        "The unique-id of a deleted message is not given to new mail",
    ),
    # RFC 2449, RFC 3206
    ("rfc2449.capa", SHOULD, "RFC 2449 s.5", "CAPA answers before login"),
    ("rfc2449.capa-transaction", MUST, "RFC 2449 s.5", "CAPA answers after login too"),
    (
        "rfc2449.capa-syntax",
        MUST,
        "RFC 2449 s.5, s.6",
        "Capability lines are well formed and the known tags have valid arguments",
    ),
    ("rfc2449.capa-honest", MUST, "RFC 2449 s.5, s.6", "Announced TOP, UIDL and USER work"),
    ("rfc2449.command-length", MUST, "RFC 2449 s.4", "A command line of 255 octets is accepted"),
    (
        "rfc2449.response-length",
        MUST,
        "RFC 2449 s.4",
        "The first line of every response, the greeting too, fits in 512 octets",
    ),
    (
        "rfc2449.resp-codes",
        MUST,
        "RFC 2449 s.3, s.8",
        "With RESP-CODES, every response text starting with '[' is a well-formed response code",
    ),
    ("rfc2449.in-use", SHOULD, "RFC 2449 s.8.1.1", "The login refused because of the lock carries [IN-USE]"),
    ("rfc2449.auth-code", MUST, "RFC 3206", "With AUTH-RESP-CODE, a wrong password gets -ERR [AUTH]"),
    (
        "rfc2449.pipelining",
        MUST,
        "RFC 2449 s.6.6",
        "With PIPELINING, commands sent in one write are all answered, in order",
    ),
    # TLS
    ("tls.implicit", MUST, "RFC 8314 s.3", "Implicit TLS (pop3s://): the handshake, then a +OK greeting"),
    ("tls.stls", MUST, "RFC 2595 s.4", "Announced STLS answers +OK, the handshake succeeds, and login works"),
    ("tls.capa-after-stls", SHOULD, "RFC 2595 s.4", "CAPA inside TLS no longer announces STLS"),
    ("tls.stls-once", SHOULD, "RFC 2595 s.4", "STLS inside TLS gets -ERR"),
    (
        "tls.stls-injection",
        MUST,
        "RFC 2595 s.4; CVE-2011-0411",
        "Commands pipelined in plaintext after STLS never run: discarded, or the handshake refused",
    ),
    ("tls.stls-transaction", MUST, "RFC 2595 s.4", "STLS after login gets -ERR"),
    # SASL
    ("sasl.plain", MUST, "RFC 5034 s.4; RFC 4616", "AUTH PLAIN with an initial response logs in"),
    (
        "sasl.plain-continuation",
        MUST,
        "RFC 5034 s.4",
        "AUTH PLAIN without an initial response answers '+ ' and takes the response on the next line",
    ),
    ("sasl.login", SHOULD, "RFC 5034 s.4", "AUTH LOGIN logs in (when LOGIN is announced)"),
    ("sasl.cancel", MUST, "RFC 5034 s.4", "A '*' response cancels the exchange with -ERR"),
    ("sasl.bad-base64", MUST, "RFC 5034 s.4", "A response that is not base64 gets -ERR"),
    ("sasl.unknown-mechanism", MUST, "RFC 5034 s.4", "AUTH with an unknown mechanism gets -ERR"),
    ("sasl.after-login", MUST, "RFC 5034 s.4", "AUTH after login gets -ERR"),
    ("sasl.list-mechanisms", PRACTICE, "Dovecot; Outlook", "AUTH without arguments lists the mechanisms"),
    # UTF8
    ("utf8.command", MUST, "RFC 6856 s.2", "UTF8 before login answers +OK"),
    ("utf8.after-login", SHOULD, "RFC 6856 s.2", "UTF8 after login gets -ERR"),
    ("utf8.retr", MUST, "RFC 6856 s.2", "After UTF8, 8-bit UTF-8 mail comes back unchanged (05)"),
    # Robustness
    ("robustness.empty-line", SHOULD, "RFC 1939 s.3", "An empty line gets -ERR and the session goes on"),
    (
        "robustness.garbage",
        SHOULD,
        "RFC 1939 s.3",
        "A line of binary garbage gets -ERR (or a close) and the server goes on",
    ),
    (
        "robustness.overlong-line",
        SHOULD,
        "RFC 2449 s.4",
        "A 4096-octet line gets -ERR (or -ERR and a close), neither silence nor a crash",
    ),
    ("robustness.lf-only", PRACTICE, "Dovecot", "A command ended by a bare LF is accepted"),
    (
        "robustness.server-alive",
        MUST,
        "RFC 1939 s.3",
        "After every probe a new session still logs in and STAT works",
    ),
)

BY_ID = {check.id: check for check in CHECKS}


def _matches(check: Check, pattern: str) -> bool:
    return check.id == pattern or check.section == pattern or fnmatch.fnmatchcase(check.id, pattern)


def select(only: list[str] | None, skip: list[str] | None) -> list[Check]:
    """The checks chosen by ``--only`` and ``--skip``: ids, sections or patterns (``rfc1939.lock-*``)."""
    chosen = [c for c in CHECKS if not only or any(_matches(c, p) for p in only)]
    return [c for c in chosen if not (skip and any(_matches(c, p) for p in skip))]


def unknown_patterns(patterns: list[str]) -> list[str]:
    return [p for p in patterns if not any(_matches(c, p) for c in CHECKS)]
