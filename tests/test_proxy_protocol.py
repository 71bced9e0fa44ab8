"""The PROXY protocol parser and reader (popserver.server.proxy_protocol): HAProxy's spec, v1 and v2,
byte-exact, with hypothesis fuzzing. No database, no server."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popserver.server import proxy_protocol as pp
from popserver.server.proxy_protocol import ProxyHeaderError, parse, read_header
from tests.proxyheaders import ssl_tlv, tlv, v1, v2

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POP3 = b"USER alice\r\n"


# v1 -------------------------------------------------------------------------------------------------------
def test_v1_tcp4():
    header = parse(b"PROXY TCP4 192.0.2.10 127.0.0.1 50000 110\r\n" + POP3)
    assert header.version == 1 and not header.local
    assert header.source == ("192.0.2.10", 50000) and header.destination == ("127.0.0.1", 110)
    assert header.length == len(b"PROXY TCP4 192.0.2.10 127.0.0.1 50000 110\r\n")
    assert not header.tls_at_proxy


def test_v1_tcp6_is_normalised():
    header = parse(b"PROXY TCP6 2001:DB8:0:0::1 ::1 65535 0\r\n")
    assert header.source == ("2001:db8::1", 65535) and header.destination == ("::1", 0)


def test_v1_unknown_is_a_health_check_and_ignores_the_rest_of_its_line():
    assert parse(b"PROXY UNKNOWN\r\n").local
    header = parse(b"PROXY UNKNOWN whatever the proxy put here\r\n" + POP3)
    assert header.local and header.is_health_check and header.source is None
    assert header.length == len(b"PROXY UNKNOWN whatever the proxy put here\r\n")


def test_v1_longest_line_is_107_octets():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    longest = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(longest) == 107 and parse(longest).local
    with pytest.raises(ProxyHeaderError, match="107"):
        parse(longest[:-2] + b"5\r\n")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.10 127.0.0.1 50000\r\n",  # a field missing
        b"PROXY TCP4 192.0.2.10 127.0.0.1 50000 110 7\r\n",  # one too many
        b"PROXY TCP4  192.0.2.10 127.0.0.1 50000 110\r\n",  # two spaces
        b"PROXY TCP4 192.0.2.10 127.0.0.1 50000 110 \r\n",  # trailing space
        b"PROXY TCP5 192.0.2.10 127.0.0.1 50000 110\r\n",
        b"PROXY tcp4 192.0.2.10 127.0.0.1 50000 110\r\n",
        b"PROXY TCP4 ::1 127.0.0.1 50000 110\r\n",  # IPv6 in TCP4
        b"PROXY TCP6 192.0.2.10 ::1 50000 110\r\n",  # IPv4 in TCP6
        b"PROXY TCP4 192.0.2.256 127.0.0.1 50000 110\r\n",
        b"PROXY TCP4 192.0.2.010 127.0.0.1 50000 110\r\n",  # leading zero
        b"PROXY TCP6 fe80::1%eth0 ::1 50000 110\r\n",  # zone id
        b"PROXY TCP4 192.0.2.10 127.0.0.1 65536 110\r\n",
        b"PROXY TCP4 192.0.2.10 127.0.0.1 050000 110\r\n",
        b"PROXY TCP4 192.0.2.10 127.0.0.1 +5000 110\r\n",
        b"PROXY TCP4 192.0.2.10 127.0.0.1 -1 110\r\n",
        b"PROXY TCP4 192.0.2.10 127.0.0.1 \xd9\xa1 110\r\n",  # an Arabic-Indic digit
        b"PROXY TCP4 192.0.2.10 127.0.0.1 50000 110\n",  # LF only
        b"PROXY TCP4 192.0.2.10\n127.0.0.1 50000 110\r\n",  # bare LF inside
        b"PROXY TCP4 192.0.2.10\r127.0.0.1 50000 110\r\n",  # bare CR inside
        b"PROXY \r\n",
        b"proxy TCP4 192.0.2.10 127.0.0.1 50000 110\r\n",
    ],
)
def test_v1_malformed(line):
    with pytest.raises(ProxyHeaderError):
        parse(line)


# v2 -------------------------------------------------------------------------------------------------------
def test_v2_ipv4():
    data = v2(("192.0.2.10", 50000), ("127.0.0.1", 110))
    header = parse(data + POP3)
    assert header.version == 2 and not header.local
    assert header.source == ("192.0.2.10", 50000) and header.destination == ("127.0.0.1", 110)
    assert header.length == len(data) == 16 + 12


def test_v2_ipv6():
    header = parse(v2(("2001:db8::7", 1234), ("2001:db8::1", 995)))
    assert header.source == ("2001:db8::7", 1234) and header.destination == ("2001:db8::1", 995)
    assert header.length == 16 + 36


def test_v2_local_is_a_health_check_whatever_its_block_says():
    header = parse(v2(command=pp.CMD_LOCAL, address_block=b"\xff" * 7, family=pp.AF_INET))
    assert header.local and header.is_health_check and header.source is None and header.length == 16 + 7
    assert parse(v2(None, None, command=pp.CMD_LOCAL)).local


@pytest.mark.parametrize("family", [pp.AF_UNIX, pp.AF_UNSPEC])
def test_v2_unix_and_unspec_families_carry_no_address(family):
    header = parse(v2(None, None, family=family, transport=pp.TRANSPORT_UNSPEC))
    assert not header.local and header.source is None and header.destination is None


def test_v2_ssl_tlv_says_tls_at_proxy_with_its_version_and_verify_result():
    header = parse(v2(tlvs=ssl_tlv(version="TLSv1.3")))
    assert header.tls_at_proxy and header.tls_version == "TLSv1.3" and not header.client_cert_verified
    verified = parse(v2(tlvs=ssl_tlv(client=pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN, verify=0)))
    assert verified.tls_at_proxy and verified.client_cert_verified
    refused = parse(v2(tlvs=ssl_tlv(client=pp.PP2_CLIENT_SSL | pp.PP2_CLIENT_CERT_CONN, verify=1)))
    assert not refused.client_cert_verified


def test_v2_ssl_tlv_without_the_client_flag_is_not_tls():
    header = parse(v2(tlvs=ssl_tlv(client=0, version=None)))
    assert pp.PP2_TYPE_SSL in header.tlvs and not header.tls_at_proxy


def test_v2_other_tlvs_are_kept_and_unknown_ones_ignored():
    tlvs = tlv(pp.PP2_TYPE_ALPN, b"pop3") + tlv(pp.PP2_TYPE_NOOP, b"") + tlv(0xEE, b"x" * 300)
    tlvs += tlv(pp.PP2_TYPE_UNIQUE_ID, b"id-1") + ssl_tlv(extra=tlv(pp.PP2_SUBTYPE_SSL_CIPHER, b"AES"))
    header = parse(v2(tlvs=tlvs))
    assert header.tlvs[pp.PP2_TYPE_ALPN] == b"pop3" and header.tlvs[pp.PP2_TYPE_UNIQUE_ID] == b"id-1"
    assert header.ssl_tlvs[pp.PP2_SUBTYPE_SSL_CIPHER] == b"AES" and header.tls_at_proxy


def test_v2_crc32c_is_checked():
    assert pp.crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    good = v2(tlvs=ssl_tlv(), crc=True)
    assert parse(good).tls_at_proxy
    corrupted = good[:20] + bytes([good[20] ^ 1]) + good[21:]  # a source address octet
    with pytest.raises(ProxyHeaderError, match="CRC32C mismatch"):
        parse(corrupted)
    with pytest.raises(ProxyHeaderError, match="not 4 octets"):
        parse(v2(tlvs=tlv(pp.PP2_TYPE_CRC32C, b"\0\0\0")))


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (v2(version=1), "version 1"),
        (v2(version=3), "version 3"),
        (v2(command=2), "command 2"),
        (v2(family=4, address_block=b""), "family"),
        (v2(transport=3), "family/transport"),
        (v2(transport=pp.TRANSPORT_DGRAM), "other than TCP"),
        (v2(family=pp.AF_INET, transport=pp.TRANSPORT_UNSPEC), "other than TCP"),
        (v2(address_block=b"\x7f\0\0\x01" * 2 + b"\0\x01", family=pp.AF_INET), "address block truncated"),
        (v2(family=pp.AF_UNIX, address_block=b"\0" * 215), "address block truncated"),
        (v2(tlvs=b"\x01\x00"), "TLV truncated"),
        (v2(tlvs=b"\x01\x00\x09abc"), "runs past"),
        (v2(tlvs=tlv(pp.PP2_TYPE_SSL, b"\x01\0\0\0")), "shorter than 5"),
        (v2(tlvs=tlv(pp.PP2_TYPE_SSL, b"\x01\0\0\0\0\x21\x00")), "SSL sub-TLV truncated"),
        (v2(length=13)[:16] + b"\0" * 13, "truncated"),
        (v2(length=pp.V2_MAX_PAYLOAD + 1), "over"),
        (b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\0" * 12, "not a PROXY header"),
    ],
)
def test_v2_malformed(data, reason):
    with pytest.raises(ProxyHeaderError, match=reason):
        parse(data)


def test_v2_length_must_match_exactly_in_parse_v2():
    data = v2()
    with pytest.raises(ProxyHeaderError, match="does not match"):
        pp.parse_v2(data + b"\0")
    with pytest.raises(ProxyHeaderError, match="wrong v2 signature"):
        pp.v2_payload_length(b"\r\n\r\n\x00\r\nQUIT\r" + data[12:16])


@pytest.mark.parametrize("data", [b"", b"PRO", b"PROXY", b"\r\n\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x21"])
def test_prefixes_of_a_header_are_truncated(data):
    with pytest.raises(ProxyHeaderError, match="truncated"):
        parse(data)


@pytest.mark.parametrize("data", [b"USER alice\r\n", b"\x16\x03\x01\x02\x00\x01", b"GET / HTTP/1.0\r\n"])
def test_other_protocols_are_not_a_header(data):
    with pytest.raises(ProxyHeaderError, match="not a PROXY header"):
        parse(data)


# Fuzzing the parser ----------------------------------------------------------------------------------------
addresses_v4 = st.ip_addresses(v=4).map(str)
addresses_v6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def valid_headers(draw) -> tuple[bytes, pp.ProxyHeader | None]:
    """A valid header of either version (and the source it names)."""
    v6 = draw(st.booleans())
    address = addresses_v6 if v6 else addresses_v4
    source, destination = (draw(address), draw(ports)), (draw(address), draw(ports))
    if draw(st.booleans()):
        return v1(source, destination), source
    tlvs = b"".join(
        draw(
            st.lists(
                st.sampled_from(
                    [
                        tlv(pp.PP2_TYPE_ALPN, b"pop3"),
                        tlv(pp.PP2_TYPE_NOOP, b"\0" * 3),
                        ssl_tlv(),
                        tlv(0x99, b"?"),
                        tlv(pp.PP2_TYPE_AUTHORITY, b"mail.example.com"),
                    ]
                ),
                max_size=4,
            )
        )
    )
    return v2(source, destination, tlvs=tlvs, crc=draw(st.booleans())), source


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_the_parsers_own_error(data):
    try:
        header = parse(data)
    except ProxyHeaderError:
        return
    assert 15 <= header.length <= len(data)


@SETTINGS
@given(
    st.sampled_from([pp.V2_SIGNATURE, b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN"]),
    st.binary(max_size=300),
)
def test_random_bytes_after_a_real_prefix_only_raise_the_parsers_own_error(prefix, rest):
    try:
        parse(prefix + rest)
    except ProxyHeaderError:
        pass


@SETTINGS
@given(valid_headers(), st.binary(max_size=64))
def test_valid_headers_parse_and_say_how_long_they_are(made, tail):
    data, source = made
    header = parse(data + tail)
    assert header.length == len(data) and header.source == (str(ipaddress.ip_address(source[0])), source[1])


@SETTINGS
@given(valid_headers(), st.data())
def test_truncated_headers_are_refused(made, data):
    header_bytes, _ = made
    cut = data.draw(st.integers(0, len(header_bytes) - 1))
    with pytest.raises(ProxyHeaderError):
        parse(header_bytes[:cut])


@SETTINGS
@given(valid_headers(), st.data())
def test_a_changed_octet_never_crashes_the_parser(made, data):
    header_bytes, _ = made
    at = data.draw(st.integers(0, len(header_bytes) - 1))
    changed = header_bytes[:at] + bytes([data.draw(st.integers(0, 255))]) + header_bytes[at + 1 :]
    try:
        parse(changed)
    except ProxyHeaderError:
        pass


@SETTINGS
@given(st.integers(pp.V2_MAX_PAYLOAD + 1, 65535))
def test_overlong_v2_lengths_are_refused_before_the_payload(length):
    with pytest.raises(ProxyHeaderError, match="over"):
        pp.v2_payload_length(v2(length=length)[:16])


# Reading from a socket -------------------------------------------------------------------------------------
def pair():
    server, client = socket.socketpair()
    server.settimeout(5)
    return server, client


def test_reader_leaves_the_bytes_after_a_v2_header_unread():
    server, client = pair()
    with server, client:
        client.sendall(v2(tlvs=ssl_tlv()) + POP3)
        header = read_header(server)
        assert header.source == ("192.0.2.10", 50000) and header.tls_at_proxy
        assert server.recv(100) == POP3


def test_reader_leaves_the_bytes_after_a_v1_header_unread():
    server, client = pair()
    with server, client:
        client.sendall(v1() + POP3)
        assert read_header(server).source == ("192.0.2.10", 50000)
        assert server.recv(100) == POP3


def test_reader_leaves_a_tls_client_hello_after_the_shortest_header_unread():
    hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1"
    server, client = pair()
    with server, client:
        client.sendall(b"PROXY UNKNOWN\r\n" + hello)
        assert read_header(server).local
        assert server.recv(100) == hello


@pytest.mark.parametrize("header", [v1(("2001:db8::7", 1), ("2001:db8::1", 110)), v2(tlvs=ssl_tlv())])
def test_reader_assembles_a_header_sent_one_octet_at_a_time(header):
    server, client = pair()

    def trickle():
        for octet in header + POP3:
            client.sendall(bytes([octet]))
            time.sleep(0.002)  # sync-ok: spreads the octets over separate segments on purpose

    with server, client:
        sender = threading.Thread(target=trickle)
        sender.start()
        assert read_header(server).length == len(header)
        sender.join(5)
        assert server.recv(100) == POP3


def test_reader_times_out_and_restores_the_socket_timeout():
    server, client = pair()
    with server, client:
        client.sendall(b"PROXY TCP4 192.0.2.10")
        started = time.monotonic()
        with pytest.raises(ProxyHeaderError, match="timed out"):
            read_header(server, timeout=0.3)
        assert 0.25 < time.monotonic() - started < 2
        assert server.gettimeout() == 5


def test_reader_refuses_a_silent_client_within_the_deadline():
    server, client = pair()
    with server, client, pytest.raises(ProxyHeaderError, match="timed out"):
        read_header(server, timeout=0.2)


def test_reader_refuses_a_v1_line_without_crlf_reading_no_more_than_107_octets():
    server, client = pair()
    with server, client:
        client.sendall(b"PROXY UNKNOWN " + b"x" * 200)
        with pytest.raises(ProxyHeaderError, match="107"):
            read_header(server)
        assert len(server.recv(1000)) == 14 + 200 - 107


def test_reader_refuses_an_oversized_v2_header_without_reading_it():
    server, client = pair()
    with server, client:
        client.sendall(v2(length=60000)[:16] + b"\0" * 100)
        with pytest.raises(ProxyHeaderError, match="over"):
            read_header(server)
        assert len(server.recv(1000)) == 100


def test_reader_refuses_a_connection_closed_mid_header():
    server, client = pair()
    with server:
        client.sendall(v2()[:20])
        client.close()
        with pytest.raises(ProxyHeaderError, match="closed"):
            read_header(server)


def test_reader_refuses_pop3_without_a_header():
    server, client = pair()
    with server, client:
        client.sendall(POP3)
        with pytest.raises(ProxyHeaderError, match="not a PROXY header"):
            read_header(server)


@SETTINGS
@given(st.binary(max_size=400))
def test_reader_on_random_bytes_only_raises_the_parsers_own_error(data):
    server, client = pair()
    with server, client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        try:
            header = read_header(server, timeout=2)
        except ProxyHeaderError:
            return
        assert server.recv(1000) == data[header.length :]


@SETTINGS
@given(valid_headers(), st.binary(min_size=1, max_size=200))
def test_reader_never_consumes_what_follows_a_valid_header(made, tail):
    header_bytes, _ = made
    server, client = pair()
    with server, client:
        client.sendall(header_bytes + tail)
        client.shutdown(socket.SHUT_WR)
        assert read_header(server, timeout=2).length == len(header_bytes)
        rest = b""
        while chunk := server.recv(1000):
            rest += chunk
        assert rest == tail
