"""A raw POP3 client for the kit: exact bytes, bounded reads, and a record of every status line.

poplib is no use here: it strips line endings, refuses lines over 2048 octets and hides what the server
really sent. This client keeps the bytes, unstuffs multi-line responses itself (RFC 1939 s.3), gives every
read an idle deadline (a server that never ends a response fails a check instead of hanging the kit) and
bounds what it buffers.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Callable

CRLF = b"\r\n"
RESP_CODE = re.compile(rb"\[([^\]\r\n]*)\]")


class ProtocolError(Exception):
    """The conversation broke: the server closed, went silent, or sent more than the kit accepts."""


class ServerClosed(ProtocolError):
    pass


class ServerSilent(ProtocolError):
    pass


class Reply:
    """A status line (RFC 1939 s.3), without its line ending."""

    def __init__(self, line: bytes):
        self.line = line

    @property
    def ok(self) -> bool:
        return self.line.startswith(b"+OK")

    @property
    def err(self) -> bool:
        return self.line.startswith(b"-ERR")

    @property
    def continuation(self) -> bool:
        """A SASL challenge (RFC 5034 s.4): ``+ base64`` (some servers send a bare ``+``)."""
        return self.line == b"+" or self.line.startswith(b"+ ")

    @property
    def text(self) -> bytes:
        for indicator in (b"+OK", b"-ERR"):
            if self.line.startswith(indicator):
                return self.line[len(indicator) :].lstrip(b" ")
        return self.line

    @property
    def code(self) -> str | None:
        """The RFC 2449 s.8 response code at the start of the text (``IN-USE``, ``AUTH``...), or None."""
        match = RESP_CODE.match(self.text)
        return match.group(1).decode("ascii", "replace").upper() if match else None

    def show(self, limit: int = 120) -> str:
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in self.line[:limit])
        return text + ("..." if len(self.line) > limit else "")

    def __repr__(self) -> str:
        return f"Reply({self.line!r})"


def unstuff(data: bytes) -> bytes:
    """Remove the leading '.' a line got from dot-stuffing (RFC 1939 s.3). ``data`` holds whole lines."""
    if data.startswith(b"."):
        data = data[1:]
    return data.replace(b"\r\n.", b"\r\n")


class Connection:
    """One POP3 connection. ``on_status(where, line, ended_by_crlf)`` hears of every status line read."""

    max_status_line = 64 * 1024  # far over RFC 2449's 512; a check reports anything over 512
    max_multiline = 256 * 1024 * 1024

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float,
        label: str = "",
        on_status: Callable[[str, bytes, bool], None] | None = None,
        trace: Callable[[str], None] | None = None,
    ):
        self.sock = sock
        self.timeout = timeout
        self.label = label
        self.on_status = on_status
        self.trace = trace
        self.buffer = bytearray()
        self.closed = False
        self.tls = isinstance(sock, ssl.SSLSocket)

    # Opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        timeout: float,
        tls_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        **kwargs,
    ) -> Connection:
        """Connect (with implicit TLS when ``tls_context`` is given: RFC 8314)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls_context is not None:
            try:
                sock = tls_context.wrap_socket(sock, server_hostname=server_hostname or host)
            except BaseException:
                sock.close()
                raise
        return cls(sock, timeout=timeout, **kwargs)

    def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        """The client side of STLS after its ``+OK`` (RFC 2595 s.4). Plaintext still buffered is an error."""
        if self.buffer:
            raise ProtocolError(f"the server sent plaintext after +OK to STLS: {bytes(self.buffer[:60])!r}")
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)
        self.tls = True

    # Writing -------------------------------------------------------------------------------------------
    def send(self, data: bytes, shown: str | None = None) -> None:
        if self.trace:
            self.trace(f"{self.label} C: {shown if shown is not None else _printable(data)}")
        try:
            self.sock.settimeout(self.timeout)
            self.sock.sendall(data)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            raise ServerClosed(f"sending failed: {exc}") from None

    # Reading -------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Read more into the buffer, waiting at most ``timeout`` seconds for it."""
        try:
            self.sock.settimeout(self.timeout)
            data = self.sock.recv(256 * 1024)
        except TimeoutError:
            raise ServerSilent(f"no data from the server within {self.timeout:g} s") from None
        except (ssl.SSLError, OSError) as exc:
            raise ServerClosed(f"the connection failed: {exc}") from None
        if not data:
            raise ServerClosed("the server closed the connection")
        self.buffer += data

    def read_line(self) -> tuple[bytes, bool]:
        """One line without its ending, and whether that ending was CRLF (not a bare LF)."""
        scanned = 0
        while True:
            end = self.buffer.find(b"\n", scanned)
            if end >= 0:
                break
            scanned = len(self.buffer)
            if scanned > self.max_status_line:
                raise ProtocolError(f"a status line of over {self.max_status_line} octets")
            self._fill()
        raw = bytes(self.buffer[: end + 1])
        del self.buffer[: end + 1]
        crlf = raw.endswith(CRLF)
        return raw[: -2 if crlf else -1], crlf

    def read_status(self, where: str = "", continuation_ok: bool = False) -> Reply:
        line, crlf = self.read_line()
        if self.trace:
            self.trace(f"{self.label} S: {_printable(line)}")
        reply = Reply(line)
        if self.on_status and not (continuation_ok and reply.continuation):
            self.on_status(where, line, crlf)
        return reply

    def read_multiline(self) -> bytes:
        """The body of a multi-line response up to its terminating line, unstuffed (RFC 1939 s.3).

        The result is whole lines with their CRLF; a response ended by ``CRLF . CRLF`` is the only end
        recognised (a server that forgets the CRLF before the dot leaves this waiting: ``ServerSilent``).
        """
        scanned = 0
        while True:
            if self.buffer.startswith(b".\r\n"):  # the body starts the buffer: this is an empty body
                del self.buffer[:3]
                return b""
            end = self.buffer.find(b"\r\n.\r\n", scanned)
            if end >= 0:
                break
            scanned = max(0, len(self.buffer) - 4)
            if len(self.buffer) > self.max_multiline:
                raise ProtocolError(f"a multi-line response of over {self.max_multiline} octets")
            self._fill()
        data = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 5]
        if self.trace:
            self.trace(f"{self.label} S: <{len(data)} octets> .")
        return unstuff(data)

    # Commands ------------------------------------------------------------------------------------------
    def command(self, line: str | bytes, shown: str | None = None, continuation_ok: bool = False) -> Reply:
        """Send one command line and read its status line (``continuation_ok``: a SASL challenge may come)."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.send(data + CRLF, shown=shown)
        return self.read_status(
            where=shown or _printable(data).split(" ")[0], continuation_ok=continuation_ok
        )

    def multiline(self, line: str | bytes) -> tuple[Reply, bytes | None]:
        """A command whose ``+OK`` is followed by a multi-line body (RETR, TOP, LIST, UIDL, CAPA)."""
        reply = self.command(line)
        return reply, (self.read_multiline() if reply.ok else None)

    def lines(self, line: str | bytes) -> tuple[Reply, list[bytes] | None]:
        reply, body = self.multiline(line)
        return reply, (body.split(CRLF)[:-1] if body is not None else None)

    def quit(self) -> Reply | None:
        """QUIT and close; None if the server closed or went silent instead of answering."""
        try:
            reply = self.command("QUIT")
        except ProtocolError:
            reply = None
        self.drop()
        return reply

    def unsolicited(self, wait: float) -> bytes | None:
        """What the server sends within ``wait`` seconds without being asked: b"" if nothing, None if it
        closed the connection. Used where the client should speak next (the TLS ClientHello after STLS)."""
        if self.buffer:
            return bytes(self.buffer)
        try:
            self.sock.settimeout(wait)
            data = self.sock.recv(4096)
        except TimeoutError:
            return b""
        except OSError:
            return None
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            return None
        self.buffer += data
        return data

    def wait_closed(self) -> bool:
        """True if the server closes the connection within the timeout (and sends nothing before that)."""
        try:
            self._fill()
        except ServerClosed:
            return True
        except ServerSilent:
            return False
        return False

    def drop(self) -> None:
        """Close without QUIT (RFC 1939 s.6: the session ends without UPDATE)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


def _printable(data: bytes, limit: int = 120) -> str:
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in data.rstrip(b"\r\n")[:limit])
    return text + ("..." if len(data) > limit + 2 else "")


def wait_backoff(attempt: int) -> None:
    """A short, growing pause between attempts (polling a server the kit does not control)."""
    time.sleep(min(0.05 * (2**attempt), 1.0))
