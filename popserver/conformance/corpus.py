"""The kit's own copy of the test corpus (``corpus/*.eml``, package data) and what RETR must send for each.

The rule is Dovecot's and the corpus README's: a bare LF is presented as CRLF, a lone CR stays data, every
other octet is unchanged; a last line without a line ending gets CRLF on the wire. A leading mbox ``From ``
line is an envelope that an MDA drops (12), and an MTA may put trace fields (``Received:``, ``Return-Path:``,
``Delivered-To:``) on top: what RETR sends must END with the expected form, and anything before it must be
header fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
_BARE_LF = re.compile(rb"(?<!\r)\n")
_HEADER_LINE = re.compile(rb"[!-9;-~]+:|[ \t]")

# file -> (check id, what it tries)
CATALOGUE = {
    "01-plain-crlf.eml": ("corpus.retr", "ordinary message"),
    "02-dot-lines.eml": ("corpus.dot-stuffing", "lines that begin with '.'"),
    "03-bare-lf.eml": ("corpus.bare-lf", "bare LF line endings"),
    "04-no-final-newline.eml": ("corpus.unterminated-last-line", "no line ending after the last line"),
    "05-8bit-utf8.eml": ("corpus.8bit", "raw UTF-8"),
    "06-latin1-bytes.eml": ("corpus.8bit", "bytes that are not UTF-8"),
    "07-long-line.eml": ("corpus.long-line", "a 5000-octet line"),
    "08-headers-only.eml": ("corpus.retr", "headers only, no blank line"),
    "09-empty-body.eml": ("corpus.retr", "an empty body"),
    "10-mixed-endings.eml": ("corpus.lone-cr", "CRLF, LF and a lone CR"),
    "11-multipart-attachment.eml": ("corpus.retr", "a 40 KB attachment"),
    "12-from-line.eml": ("corpus.retr", "an mbox 'From ' line on top"),
    "13-nul-byte.eml": ("corpus.nul", "a NUL octet"),
    "14-top-lines.eml": ("corpus.retr", "20 numbered body lines"),
}


@dataclass(frozen=True)
class CorpusMessage:
    name: str
    raw: bytes  # as delivered to an MDA
    check_id: str
    what: str

    @property
    def short(self) -> str:
        return self.name[:2]

    @property
    def subject(self) -> bytes:
        match = re.search(rb"(?m)^Subject: ([^\r\n]*)", self.raw)
        return match.group(1) if match else b""

    @property
    def unterminated(self) -> bool:
        return not self.raw.endswith(b"\n")

    def expected(self) -> bytes:
        """What RETR must end with, once unstuffed: no envelope line, CRLF endings, a final CRLF."""
        return presented(strip_envelope(self.raw))


def strip_envelope(raw: bytes) -> bytes:
    """Drop a leading mbox ``From `` line, as an MDA (dovecot-lda, ``manage.py deliver``) does."""
    if raw.startswith(b"From "):
        end = raw.find(b"\n")
        return raw[end + 1 :] if end >= 0 else b""
    return raw


def presented(data: bytes) -> bytes:
    """The CRLF form of ``data`` as RETR sends it: bare LF as CRLF, and a final CRLF."""
    data = _BARE_LF.sub(b"\r\n", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def smtp_form(raw: bytes) -> bytes:
    """What an SMTP or LMTP client sends: no mbox envelope line (MAIL FROM is the envelope), CRLF line
    endings and a final CRLF (RFC 5321 s.2.3.8, s.4.1.1.4)."""
    return presented(strip_envelope(raw))


BOUNDARY_NAME = "15-buffer-boundaries (generated)"


def boundary_targets() -> list[tuple[int, int]]:
    """(offset, variant) pairs. ``k << p`` for odd k is a boundary of 2^p-octet buffers and of no larger
    power of two, so each buffer size from 1 KiB to 64 KiB meets all three variants; 128 KiB to 1 MiB
    (popserver's body chunks) meet one each at their first boundary."""
    targets = [(k << p, variant) for p in range(10, 17) for variant, k in enumerate((1, 3, 5))]
    targets += [(1 << 17, 0), (1 << 18, 2), (1 << 19, 1), (1 << 20, 0)]
    return sorted(targets)


def boundary_message() -> bytes:
    """A CRLF message (about 1 MB) built so that buffer boundaries fall on the hard places: at each target
    offset a lone '.' line starts exactly there (variant 0), a CRLF is split across it (1: CR before, LF
    after, then a '.' line), or a '..' line starts one octet before it (2). Servers that stuff or convert
    line endings buffer by buffer get these wrong (Mailpit #299, GreenMail #984)."""
    out = bytearray(
        b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: buffer boundaries\r\n"
        b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <buffer-boundaries@example.org>\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    special = {0: b".\r\n", 1: b".after a split CRLF\r\n", 2: b"..two dots across a boundary\r\n"}
    for target, variant in boundary_targets():
        start = target + {0: 0, 1: 1, 2: -1}[variant]  # where the special line begins
        _fill(out, start)
        out += special[variant]
    out += b"end\r\n"
    return bytes(out)


def _fill(out: bytearray, upto: int) -> None:
    """Append filler lines (at most 78 octets each) so that ``out`` is exactly ``upto`` octets long."""
    while len(out) < upto:
        left = upto - len(out)
        length = left if left <= 80 else min(80, left - 3)  # never leave a gap too short for a line
        out += b"f" * (length - 2) + b"\r\n"
    assert len(out) == upto, (len(out), upto)


def load() -> list[CorpusMessage]:
    """The corpus files, then the generated buffer-boundaries message."""
    messages = []
    for name, (check_id, what) in CATALOGUE.items():
        messages.append(CorpusMessage(name, (CORPUS_DIR / name).read_bytes(), check_id, what))
    messages.append(
        CorpusMessage(
            BOUNDARY_NAME, boundary_message(), "corpus.buffer-boundaries", "'.' lines and CRLFs at boundaries"
        )
    )
    return messages


def trace_prefix_ok(prefix: bytes) -> bool:
    """Whether what a delivery path put before the message looks like header fields (or is empty)."""
    if not prefix:
        return True
    if not prefix.endswith(b"\r\n"):
        return False
    return all(_HEADER_LINE.match(line) for line in prefix[:-2].split(b"\r\n"))


def first_difference(got: bytes, expected: bytes) -> str:
    """One line on where ``got`` (perhaps with trace fields on top) departs from ``expected``."""
    start = 0 if got.startswith(expected[:32]) else max(0, len(got) - len(expected))
    index = next(
        (i for i, (a, b) in enumerate(zip(got[start:], expected)) if a != b),
        min(len(got) - start, len(expected)),
    )
    after = " after what the delivery added on top" if start else ""
    return (
        f"got {len(got)} octets, expected {len(expected)}{after}; first difference at octet {index}: "
        f"got {got[start + max(0, index - 8) : start + index + 16]!r}, "
        f"expected {expected[max(0, index - 8) : index + 16]!r}"
    )


def split_headers(content: bytes) -> tuple[bytes, bytes]:
    """(the header section with its blank line, the body) of what RETR sent."""
    if content.startswith(b"\r\n"):
        return b"\r\n", content[2:]
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 4], content[end + 4 :]


def expected_top(content: bytes, lines: int) -> bytes:
    """What TOP n ``lines`` must send, unstuffed, for a message whose RETR sent ``content`` (RFC 1939 s.7)."""
    head, body = split_headers(content)
    return head + b"".join(_crlf_lines(body)[:lines])


def _crlf_lines(data: bytes) -> list[bytes]:
    parts = data.split(b"\r\n")
    lines = [part + b"\r\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines
