"""PROXY protocol headers made by hand for the tests (HAProxy's doc/proxy-protocol.txt, s.2.1 and s.2.2)."""

from __future__ import annotations

import ipaddress
import struct

from popserver.server import proxy_protocol as pp


def v1(
    source: tuple[str, int] = ("192.0.2.10", 50000),
    destination: tuple[str, int] = ("127.0.0.1", 110),
    protocol: str | None = None,
) -> bytes:
    if protocol is None:
        protocol = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {protocol} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(
    client: int = pp.PP2_CLIENT_SSL, verify: int = 0, version: str | None = "TLSv1.3", extra: bytes = b""
) -> bytes:
    """PP2_TYPE_SSL: the client bits, the verify result, then sub-TLVs (the TLS version, and ``extra``)."""
    subs = (tlv(pp.PP2_SUBTYPE_SSL_VERSION, version.encode()) if version is not None else b"") + extra
    return tlv(pp.PP2_TYPE_SSL, struct.pack("!BI", client, verify) + subs)


def v2(
    source: tuple[str, int] | None = ("192.0.2.10", 50000),
    destination: tuple[str, int] | None = ("127.0.0.1", 110),
    *,
    command: int = pp.CMD_PROXY,
    family: int | None = None,
    transport: int = pp.TRANSPORT_STREAM,
    tlvs: bytes = b"",
    version: int = 2,
    crc: bool = False,
    length: int | None = None,
    address_block: bytes | None = None,
) -> bytes:
    """A v2 header. ``family`` defaults to the sources's; ``address_block`` replaces the packed addresses;
    ``crc`` appends a correct PP2_TYPE_CRC32C; ``length`` overrides the announced length."""
    if family is None:
        family = pp.AF_UNSPEC if source is None else (pp.AF_INET6 if ":" in source[0] else pp.AF_INET)
    if address_block is None:
        address_block = b""
        if family in (pp.AF_INET, pp.AF_INET6) and source is not None and destination is not None:
            address_block = (
                ipaddress.ip_address(source[0]).packed
                + ipaddress.ip_address(destination[0]).packed
                + struct.pack("!HH", source[1], destination[1])
            )
        elif family == pp.AF_UNIX:
            address_block = b"/run/client.sock".ljust(108, b"\0") + b"/run/pop3.sock".ljust(108, b"\0")
    payload = address_block + tlvs
    if crc:
        payload += tlv(pp.PP2_TYPE_CRC32C, b"\0\0\0\0")
    announced = len(payload) if length is None else length
    header = pp.V2_SIGNATURE + bytes([(version << 4) | command, (family << 4) | transport])
    header += struct.pack("!H", announced) + payload
    if crc:
        header = header[:-4] + struct.pack("!I", pp.crc32c(header))
    return header
