"""The PROXY protocol, versions 1 and 2 (HAProxy's ``doc/proxy-protocol.txt``, 2020-03-05): a strict parser
and a reader that takes exactly the header off a socket.

A TCP load balancer (HAProxy ``send-proxy-v2``, AWS NLB, ...) puts one header in front of each connection
saying who the client is. The reader consumes the header and not one octet more (s.2: the bytes after it
belong to the proxied protocol: a TLS ClientHello follows at once on an implicit-TLS port), within a deadline,
and with a size bound. Everything that is not a complete, valid header raises ``ProxyHeaderError`` with a
short reason for the log line; nothing else escapes, whatever the bytes.

Written here rather than taken from the ``proxy-protocol`` package: that one reads through asyncio streams
(our server is threaded, on blocking sockets with deadlines), and both formats fit in this one module.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from dataclasses import dataclass, field

from ..exceptions import PopserverError

# s.2.1: "PROXY" SP ... CRLF, at most 107 octets ("PROXY TCP6" with two full IPv6 addresses and ports).
V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107
# s.2.2: a 12-octet signature, then version/command, family/transport, and a 16-bit length of what follows.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_PREFIX_LENGTH = 16
# Ours: address block (at most 216 octets, AF_UNIX) plus TLVs. HAProxy's (ALPN, authority, unique id of at
# most 128 octets, SSL with its sub-TLVs) fit several times over; a longer header is refused unread.
V2_MAX_PAYLOAD = 4096
# s.2 asks receivers to wait for the whole header; we wait this long (seconds) by default.
DEFAULT_TIMEOUT = 3.0

# s.2.2, the 13th and 14th octets.
V2_VERSION = 0x2
CMD_LOCAL, CMD_PROXY = 0x0, 0x1
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0x0, 0x1, 0x2, 0x3
TRANSPORT_UNSPEC, TRANSPORT_STREAM, TRANSPORT_DGRAM = 0x0, 0x1, 0x2
ADDRESS_BLOCK = {AF_UNSPEC: 0, AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

# s.2.2.x, TLV types.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_SUBTYPE_SSL_SIG_ALG = 0x24
PP2_SUBTYPE_SSL_KEY_ALG = 0x25
PP2_TYPE_NETNS = 0x30
# s.2.2.5, the PP2_TYPE_SSL "client" bit field.
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04


class ProxyHeaderError(PopserverError):
    """No complete, valid PROXY header: ``reason`` is a short text for the log line; ``kind`` is "invalid",
    "timeout" (not all of it within the time) or "closed" (the connection ended or failed first)."""

    def __init__(self, reason: str, kind: str = "invalid"):
        super().__init__(reason)
        self.reason, self.kind = reason, kind


@dataclass(frozen=True)
class ProxyHeader:
    """What a PROXY header says.

    ``source``/``destination`` are (ip, port), or None when the header carries no usable address: a health
    check (``local``: v2 LOCAL, v1 UNKNOWN) or a family we do not route (AF_UNIX, AF_UNSPEC); the connection
    then stands for itself. ``tls_at_proxy``: the client reached the proxy over TLS (PP2_TYPE_SSL with
    PP2_CLIENT_SSL)."""

    version: int
    local: bool
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tls_at_proxy: bool = False
    client_cert_verified: bool = False  # a client certificate was presented and verified by the proxy
    tls_version: str = ""  # PP2_SUBTYPE_SSL_VERSION, e.g. "TLSv1.3"
    # Top-level TLVs by type (the last of a repeated one).
    tlvs: dict[int, bytes] = field(default_factory=dict)
    ssl_tlvs: dict[int, bytes] = field(default_factory=dict)  # PP2_TYPE_SSL's sub-TLVs
    length: int = 0  # octets the header took on the wire

    @property
    def is_health_check(self) -> bool:
        return self.local


# Parsing ----------------------------------------------------------------------------------------------------
def parse(data: bytes, *, max_payload: int = V2_MAX_PAYLOAD) -> ProxyHeader:
    """The header at the start of ``data`` (which may go on past it: see ``ProxyHeader.length``)."""
    if data.startswith(V1_PREFIX):
        end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
        if end < 0:
            if len(data) >= V1_MAX_LENGTH:
                raise ProxyHeaderError(f"v1 header without CRLF in {V1_MAX_LENGTH} octets")
            raise ProxyHeaderError("v1 header truncated")
        return parse_v1(data[: end + 2])
    if data.startswith(V2_SIGNATURE):
        length = v2_payload_length(data[:V2_PREFIX_LENGTH], max_payload=max_payload)
        if len(data) < V2_PREFIX_LENGTH + length:
            raise ProxyHeaderError("v2 header truncated")
        return parse_v2(data[: V2_PREFIX_LENGTH + length], max_payload=max_payload)
    if V1_PREFIX.startswith(data) or V2_SIGNATURE.startswith(data):
        raise ProxyHeaderError("header truncated")
    raise ProxyHeaderError("not a PROXY header")


def parse_v1(line: bytes) -> ProxyHeader:
    """One v1 line, CRLF included (s.2.1): ``PROXY TCP4|TCP6 SRC DST SPORT DPORT`` or ``PROXY UNKNOWN ...``."""
    if len(line) > V1_MAX_LENGTH:
        raise ProxyHeaderError(f"v1 header over {V1_MAX_LENGTH} octets")
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyHeaderError("v1 header not PROXY ... CRLF")
    body = line[len(V1_PREFIX) : -2]
    if b"\r" in body or b"\n" in body:
        raise ProxyHeaderError("v1 header with a stray CR or LF")
    # s.2.1: with UNKNOWN "the receiver must ignore anything presented before the CRLF".
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        return ProxyHeader(version=1, local=True, length=len(line))
    fields = body.split(b" ")
    if len(fields) != 5:
        raise ProxyHeaderError("v1 header needs protocol, two addresses and two ports, one space apart")
    protocol, source, destination, source_port, destination_port = fields
    if protocol not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("v1 protocol is not TCP4, TCP6 or UNKNOWN")
    version = 4 if protocol == b"TCP4" else 6
    return ProxyHeader(
        version=1,
        local=False,
        source=(_v1_address(source, version), _v1_port(source_port)),
        destination=(_v1_address(destination, version), _v1_port(destination_port)),
        length=len(line),
    )


def _v1_address(text: bytes, version: int) -> str:
    try:
        ascii_text = text.decode("ascii")
        if "%" in ascii_text:  # a zone id is local to the proxy
            raise ValueError(ascii_text)
        address = (ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address)(ascii_text)
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError(f"v1 header with a bad IPv{version} address") from None
    return str(address)


def _v1_port(text: bytes) -> int:
    # s.2.1: decimal, 0 to 65535; strict: no sign, no leading zero, ASCII digits only (bytes.isdigit).
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")) or int(text) > 65535:
        raise ProxyHeaderError("v1 header with a bad port")
    return int(text)


def v2_payload_length(prefix: bytes, *, max_payload: int = V2_MAX_PAYLOAD) -> int:
    """Check the 16-octet v2 prefix (signature, version, command, family) and return the length after it."""
    if len(prefix) != V2_PREFIX_LENGTH:
        raise ProxyHeaderError("v2 header truncated")
    if not prefix.startswith(V2_SIGNATURE):
        raise ProxyHeaderError("wrong v2 signature")
    version, command = prefix[12] >> 4, prefix[12] & 0x0F
    if version != V2_VERSION:
        raise ProxyHeaderError(f"unsupported v2 version {version}")
    if command not in (CMD_LOCAL, CMD_PROXY):
        raise ProxyHeaderError(f"unknown v2 command {command}")
    family, transport = prefix[13] >> 4, prefix[13] & 0x0F
    if family not in ADDRESS_BLOCK or transport > TRANSPORT_DGRAM:
        raise ProxyHeaderError(f"unknown v2 family/transport 0x{prefix[13]:02x}")
    (length,) = struct.unpack("!H", prefix[14:16])
    if length > max_payload:
        raise ProxyHeaderError(f"v2 header of {length} octets is over {max_payload}")
    return length


def parse_v2(data: bytes, *, max_payload: int = V2_MAX_PAYLOAD) -> ProxyHeader:
    """A whole v2 header (s.2.2): the 16-octet prefix and exactly the length it announces."""
    length = v2_payload_length(data[:V2_PREFIX_LENGTH], max_payload=max_payload)
    if len(data) != V2_PREFIX_LENGTH + length:
        raise ProxyHeaderError("v2 header length does not match its data")
    command, family, transport = data[12] & 0x0F, data[13] >> 4, data[13] & 0x0F
    payload = data[V2_PREFIX_LENGTH:]
    if command == CMD_LOCAL:
        # s.2.2: "the receiver must ... use the real connection endpoints and discard the protocol block
        # including the family which is ignored".
        return ProxyHeader(version=2, local=True, length=len(data))
    block = ADDRESS_BLOCK[family]
    if len(payload) < block:
        raise ProxyHeaderError("v2 address block truncated")
    source = destination = None
    if family in (AF_INET, AF_INET6):
        if transport != TRANSPORT_STREAM:
            raise ProxyHeaderError("v2 header for a transport other than TCP")
        size = 4 if family == AF_INET else 16
        make = ipaddress.IPv4Address if family == AF_INET else ipaddress.IPv6Address
        source_port, destination_port = struct.unpack("!HH", payload[2 * size : 2 * size + 4])
        source = (str(make(payload[:size])), source_port)
        destination = (str(make(payload[size : 2 * size])), destination_port)
    # AF_UNIX and AF_UNSPEC: no address we can use; the connection's own stands in (s.2.2 lets us accept).
    tlvs, offsets = {}, {}
    for kind, value, at in _tlvs(payload[block:], "TLV", V2_PREFIX_LENGTH + block):
        tlvs[kind], offsets[kind] = value, at
    if PP2_TYPE_CRC32C in tlvs:
        if len(tlvs[PP2_TYPE_CRC32C]) != 4:
            raise ProxyHeaderError("v2 CRC32C TLV is not 4 octets")
        _check_crc32c(data, offsets[PP2_TYPE_CRC32C])
    tls_at_proxy = verified = False
    ssl_tlvs: dict[int, bytes] = {}
    if PP2_TYPE_SSL in tlvs:
        value = tlvs[PP2_TYPE_SSL]
        if len(value) < 5:
            raise ProxyHeaderError("v2 SSL TLV shorter than 5 octets")
        client, verify = value[0], struct.unpack("!I", value[1:5])[0]
        tls_at_proxy = bool(client & PP2_CLIENT_SSL)
        # s.2.2.5: verify is 0 when the client presented a certificate that was verified.
        verified = bool(client & (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS)) and verify == 0
        ssl_tlvs = {kind: sub for kind, sub, _ in _tlvs(value[5:], "SSL sub-TLV")}
    tls_version = ssl_tlvs.get(PP2_SUBTYPE_SSL_VERSION, b"").decode("ascii", "replace")
    return ProxyHeader(
        version=2,
        local=False,
        source=source,
        destination=destination,
        tls_at_proxy=tls_at_proxy,
        client_cert_verified=verified,
        tls_version=tls_version,
        tlvs=tlvs,
        ssl_tlvs=ssl_tlvs,
        length=len(data),
    )


def _tlvs(data: bytes, what: str, base: int = 0):
    """(type, value, offset of the value) triples; every octet must belong to a whole TLV (s.2.2.x: type,
    16-bit length, value)."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 3:
            raise ProxyHeaderError(f"v2 {what} truncated")
        kind, size = data[offset], struct.unpack("!H", data[offset + 1 : offset + 3])[0]
        if offset + 3 + size > len(data):
            raise ProxyHeaderError(f"v2 {what} runs past the header")
        yield kind, data[offset + 3 : offset + 3 + size], base + offset + 3
        offset += 3 + size


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (RFC 4960 appendix B), as PP2_TYPE_CRC32C uses it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _check_crc32c(header: bytes, at: int) -> None:
    """s.2.2.3: the checksum of the whole header, with the checksum's own four octets (at ``at``) as zeros."""
    value = header[at : at + 4]
    if len(value) != 4:
        raise ProxyHeaderError("v2 CRC32C TLV is not 4 octets")
    if crc32c(header[:at] + b"\0\0\0\0" + header[at + 4 :]) != struct.unpack("!I", value)[0]:
        raise ProxyHeaderError("v2 CRC32C mismatch")


# Reading from a socket -------------------------------------------------------------------------------------
def read_header(
    sock: socket.socket, timeout: float = DEFAULT_TIMEOUT, *, max_payload: int = V2_MAX_PAYLOAD
) -> ProxyHeader:
    """Take exactly one PROXY header off ``sock`` within ``timeout`` seconds, leaving what follows unread.

    v2: the 16-octet prefix, then exactly the length it announces. v1: the bytes up to CRLF, found with
    MSG_PEEK and then consumed, never past the CRLF. The socket's timeout is restored afterwards."""
    deadline = time.monotonic() + timeout
    previous_timeout = sock.gettimeout()
    try:
        # Six octets tell the versions apart and are part of either header (the shortest is 15 octets).
        start = _recv_exact(sock, len(V1_PREFIX), deadline)
        if start == V1_PREFIX:
            return parse_v1(_read_v1_line(sock, start, deadline))
        if start == V2_SIGNATURE[: len(start)]:
            prefix = start + _recv_exact(sock, V2_PREFIX_LENGTH - len(start), deadline)
            length = v2_payload_length(prefix, max_payload=max_payload)
            return parse_v2(prefix + _recv_exact(sock, length, deadline), max_payload=max_payload)
        raise ProxyHeaderError("not a PROXY header")
    finally:
        try:
            sock.settimeout(previous_timeout)
        except OSError:
            pass


def _recv(sock: socket.socket, size: int, deadline: float, flags: int = 0) -> bytes:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise ProxyHeaderError("timed out waiting for the PROXY header", "timeout")
    try:
        sock.settimeout(remaining)
        data = sock.recv(size, flags)
    except TimeoutError:
        raise ProxyHeaderError("timed out waiting for the PROXY header", "timeout") from None
    except OSError as exc:
        raise ProxyHeaderError(
            f"connection error before the PROXY header: {exc.__class__.__name__}", "closed"
        ) from None
    if not data:
        raise ProxyHeaderError("connection closed before the end of the PROXY header", "closed")
    return data


def _recv_exact(sock: socket.socket, size: int, deadline: float) -> bytes:
    data = b""
    while len(data) < size:
        data += _recv(sock, size - len(data), deadline)
    return data


def _read_v1_line(sock: socket.socket, start: bytes, deadline: float) -> bytes:
    """The rest of a v1 line: peek at what has arrived, consume up to the CRLF if it is there, else consume
    all of it (header bytes, none of them past the line) and wait for more."""
    line = start
    while True:
        budget = V1_MAX_LENGTH - len(line)
        if budget <= 0:
            raise ProxyHeaderError(f"v1 header without CRLF in {V1_MAX_LENGTH} octets")
        peeked = _recv(sock, budget, deadline, socket.MSG_PEEK)
        end = (line + peeked).find(b"\r\n", max(0, len(line) - 1))
        take = (end + 2 - len(line)) if end >= 0 else len(peeked)
        candidate = line + peeked[:take]
        if b"\n" in (candidate[:-2] if end >= 0 else candidate):
            raise ProxyHeaderError("v1 header with a bare LF")
        line += _recv_exact(sock, take, deadline)
        if end >= 0:
            return line
