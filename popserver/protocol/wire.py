"""POP3 wire formatting: status lines, multi-line responses, dot-stuffing and TOP's truncation.

Everything here works on bytes and knows nothing of sessions. Message data is handled in large chunks with
C-level ``bytes`` operations, never line by line in Python, so a 50 MB RETR costs a few copies, not a loop
over a million lines.

The presented form of a message (RFC 1939 s.5, s.11; Dovecot's virtual size): every bare LF becomes CRLF, a
lone CR stays data, every other octet is unchanged. Sizes count that form before dot-stuffing.
"""

from collections.abc import Iterable

CRLF = b"\r\n"
TERMINATOR = b".\r\n"  # RFC 1939 s.3: a multi-line response ends with a line holding a single "."


class Flush(bytes):
    """The session's flush mark, yielded between replies: what came before must reach the client now (a
    password check or a TLS handshake follows). It is empty bytes, so output joined with ``b"".join`` is
    unchanged; the connection handler recognises it by identity (``piece is FLUSH``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FLUSH"


FLUSH = Flush()

MAX_RESPONSE_LINE = 512  # RFC 2449 s.4: the first line of a response, CRLF included
_OK = b"+OK"
_ERR = b"-ERR"


def status_line(indicator: bytes, text: str = "") -> bytes:
    """``indicator [SP text] CRLF``, kept within ``MAX_RESPONSE_LINE`` octets and free of line breaks."""
    line = indicator
    if text:
        encoded = text.encode("utf-8", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
        line = indicator + b" " + encoded
        if len(line) > MAX_RESPONSE_LINE - 2:
            # Cut, then drop a UTF-8 sequence the cut may have split.
            line = line[: MAX_RESPONSE_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
    return line + CRLF


def ok(text: str = "") -> bytes:
    """A positive status line (RFC 1939 s.3): ``+OK text``."""
    return status_line(_OK, text)


def err(text: str) -> bytes:
    """A negative status line (RFC 1939 s.3): ``-ERR text``; ``text`` may start with an RFC 2449 code."""
    return status_line(_ERR, text)


def continuation(data: bytes = b"") -> bytes:
    """A SASL server challenge (RFC 5034 s.4): ``+ base64`` (``+ `` alone for an empty one)."""
    return b"+ " + data + CRLF


def multiline(first_line: bytes, lines: Iterable[bytes | str]) -> bytes:
    """A small multi-line response (CAPA, LIST, UIDL): first line, stuffed lines, terminator (RFC 1939 s.3).

    ``first_line`` is a complete status line from ``ok()``; ``lines`` carry no line endings.
    """
    parts = [first_line]
    for line in lines:
        data = line.encode("utf-8", "replace") if isinstance(line, str) else line
        if data.startswith(b"."):
            data = b"." + data
        parts.append(data + CRLF)
    parts.append(TERMINATOR)
    return b"".join(parts)


def normalize_line_endings(data: bytes) -> bytes:
    """The presented form: every bare LF becomes CRLF; a lone CR and every other octet stay as they are.

    Two ``replace`` passes (CRLF -> LF, then LF -> CRLF) are exact, since CRLF pairs cannot overlap, and are
    several times faster than a look-behind regex on large messages; data already in CRLF form is returned
    as is after two counting scans.
    """
    lf = data.count(b"\n")
    if lf == 0 or lf == data.count(b"\r\n"):
        return bytes(data)
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def expire_value(days: int | None) -> str:
    """RFC 2449 s.6.7: the EXPIRE capability's policy, days or NEVER."""
    return "NEVER" if days is None else str(days)


def has_header_end(data: bytes) -> bool:
    """True if the header of CRLF ``data`` is followed by a blank line (RFC 5322 s.2.1), or it starts with one."""
    return data.startswith(CRLF) or b"\r\n\r\n" in data


class DotStuffer:
    """Byte-stuffs a stream of chunks for a multi-line response (RFC 1939 s.3) and ends it.

    Every line that begins with "." gets another "." in front; a line start that falls on a chunk boundary is
    caught by remembering whether the previous chunk ended with LF. ``finish()`` returns the terminator,
    preceded by CRLF when the data did not end with one (that CRLF is not part of the message's size).
    """

    __slots__ = ("_at_line_start", "_tail")

    def __init__(self) -> None:
        self._at_line_start = True
        self._tail = b""  # the last two octets seen, to know whether the data ended with CRLF

    def feed(self, chunk: bytes) -> bytes:
        """The stuffed form of ``chunk`` (``b""`` for an empty chunk)."""
        if not chunk:
            return b""
        if b"." in chunk:  # a memchr scan: base64 and binary bodies (most large ones) have no dot at all
            stuffed = chunk.replace(b"\n.", b"\n..")
            if self._at_line_start and chunk[:1] == b".":
                stuffed = b"." + stuffed
        else:
            stuffed = chunk
        self._at_line_start = chunk[-1:] == b"\n"
        self._tail = (self._tail + chunk[-2:])[-2:]
        return stuffed

    @property
    def ends_line(self) -> bool:
        """True when the data so far is empty or ends with CRLF."""
        return not self._tail or self._tail == CRLF

    def finish(self) -> bytes:
        """CRLF if the data's last line had none, then ``.CRLF``. Empty data has no lines: just ``.CRLF``."""
        if self._tail and self._tail != CRLF:
            return CRLF + TERMINATOR
        return TERMINATOR


class TopTruncator:
    """Cuts a message stream to TOP's form (RFC 1939 s.7): the headers, the blank line, then ``lines`` lines.

    Works on the presented (CRLF) form, in chunks: the end of the headers (``CRLF CRLF``) may straddle chunk
    boundaries. A message without a blank line is all headers and is passed through whole. Once ``done`` is
    True the caller can stop reading.
    """

    __slots__ = ("_in_headers", "_remaining", "_tail", "done")

    _HEADER_END = b"\n\r\n"  # in CRLF data, the LF of the last header line and the blank line

    def __init__(self, lines: int) -> None:
        if lines < 0:
            raise ValueError("lines must be >= 0")
        self._remaining = lines
        self._in_headers = True
        # A virtual line end before the message, so that a message starting with a blank line has no headers.
        self._tail = b"\n"
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """The part of ``chunk`` that belongs to the output (possibly ``b""``)."""
        if self.done or not chunk:
            return b""
        head = b""
        if self._in_headers:
            window = self._tail + chunk
            found = window.find(self._HEADER_END)
            if found < 0:
                self._tail = window[-2:]
                return chunk
            cut = found + len(self._HEADER_END) - len(self._tail)  # just after the blank line, in chunk
            self._in_headers = False
            head, chunk = chunk[:cut], chunk[cut:]
        if self._remaining == 0:
            self.done = True
            return head
        newlines = chunk.count(b"\n")
        if newlines < self._remaining:
            self._remaining -= newlines
            return head + chunk if head else chunk
        # The last wanted line ends in this chunk: keep everything up to its LF.
        rest = chunk.split(b"\n", self._remaining)[-1]
        self.done = True
        return head + chunk[: len(chunk) - len(rest)]


def stuff_message(data: bytes) -> bytes:
    """The whole multi-line body for ``data`` (stuffed, with terminator): a convenience for small messages."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.finish()
