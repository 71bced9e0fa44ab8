"""runpop3 behind a load balancer, in-thread: PROXY headers made by hand (tests/proxyheaders.py) on a
listener with ``proxy_protocol``; the client the header names is the peer everywhere."""

import socket
import ssl

import pytest

from popserver.delivery import deliver
from popserver.models import LoginEvent, LoginThrottle, Mailbox, SessionRecord
from popserver.server import proxy_protocol as pp
from popserver.server.tls import TlsContextHolder
from tests import backends
from tests.certs import make_cert_files
from tests.proxyheaders import ssl_tlv, v1, v2
from tests.test_server_live import read_lines, wait_for
from tests.test_tls_live import PLAINTEXT_REFUSED

pytestmark = pytest.mark.live
CLIENT = ("192.0.2.10", 50000)


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    deliver("alice", b"Subject: proxied\r\n\r\nhello\r\n")
    return mailbox


@pytest.fixture
def proxied(settings, pop3_server_factory):
    """A PROXY listener that trusts 127.0.0.1 as its load balancer."""
    settings.POPSERVER_PROXY_TRUSTED_NETWORKS = ["127.0.0.1/32"]
    settings.POPSERVER_NODE_NAME = "pop-test-1"
    return pop3_server_factory(proxy_protocol=True)


def connect(server, header: bytes = b"", port: int | None = None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port or server.port), timeout=10)
    if header:
        sock.sendall(header)
    return sock


def closed_without_a_word(sock: socket.socket) -> bool:
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


def logs(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_the_client_in_a_v2_header_is_the_peer_everywhere(proxied, alice, settings, caplog):
    settings.POPSERVER_PLAINTEXT_AUTH = "always"
    settings.AUTHENTICATION_BACKENDS = ["tests.backends.AddressRecordingBackend"]
    backends.seen_addresses.clear()
    sock = connect(proxied, v2(CLIENT))
    assert read_lines(sock, 1)[0].startswith(b"+OK")
    sock.sendall(b"USER alice\r\nPASS wrong\r\n")
    assert read_lines(sock, 2)[1].startswith(b"-ERR [AUTH]")
    assert LoginThrottle.objects.filter(key="alice|192.0.2.10").exists()
    sock.sendall(b"USER alice\r\nPASS secret\r\n")
    assert read_lines(sock, 2) == [b"+OK", b"+OK Logged in."]
    locked = Mailbox.objects.get(pk=alice.pk)
    assert locked.lock_peer == "192.0.2.10:50000" and locked.lock_host == "pop-test-1"
    sock.sendall(b"QUIT\r\n")
    assert read_lines(sock, 1)[0].startswith(b"+OK")
    sock.close()
    assert backends.seen_addresses == ["192.0.2.10", "192.0.2.10"]  # the request given to authenticate()
    events = list(LoginEvent.objects.order_by("time").values_list("peer_ip", "node", "outcome", "tls"))
    assert events == [
        ("192.0.2.10", "pop-test-1", "failed", False),
        ("192.0.2.10", "pop-test-1", "success", False),
    ]
    record = wait_for(lambda: SessionRecord.objects.first())
    assert (record.peer_ip, record.node) == ("192.0.2.10", "pop-test-1")
    line = wait_for(lambda: logs(caplog, "Disconnected: Logged out"))[0]
    assert "peer=192.0.2.10:50000" in line and line.endswith("node=pop-test-1")


def test_a_v1_header_works_the_same(proxied, alice, settings):
    settings.POPSERVER_PLAINTEXT_AUTH = "always"
    sock = connect(proxied, v1(("2001:db8::7", 4242), ("2001:db8::1", 110)))
    assert read_lines(sock, 1)[0].startswith(b"+OK")
    sock.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
    assert read_lines(sock, 3)[1] == b"+OK Logged in."
    assert LoginEvent.objects.get().peer_ip == "2001:db8::7"


def test_pop3_bytes_sent_with_the_header_are_answered(proxied, alice):
    sock = connect(proxied, v2(CLIENT) + b"CAPA\r\n")
    lines = read_lines(sock, 2)
    assert lines[0].startswith(b"+OK") and lines[1].startswith(b"+OK")  # the greeting, then CAPA's reply


def test_a_peer_outside_the_proxy_networks_is_closed(settings, pop3_server_factory, caplog):
    settings.POPSERVER_PROXY_TRUSTED_NETWORKS = ["192.0.2.0/24"]
    server = pop3_server_factory(proxy_protocol=True)
    sock = connect(server, v2(CLIENT))
    assert closed_without_a_word(sock)
    assert logs(caplog, "refusing 127.0.0.1: not in POPSERVER_PROXY_TRUSTED_NETWORKS")


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"USER alice\r\n", "not a PROXY header"),
        (v2(CLIENT, version=1), "unsupported v2 version 1"),
        (v2(CLIENT, length=60000)[:16], "over 4096"),
        (b"PROXY TCP4 192.0.2.10 127.0.0.1 50000\r\n", "v1 header needs"),
    ],
)
def test_a_bad_header_closes_the_connection_with_one_log_line(proxied, caplog, sent, reason):
    sock = connect(proxied, sent)
    assert closed_without_a_word(sock)
    lines = wait_for(lambda: logs(caplog, "bad PROXY header"))
    assert len(lines) == 1 and reason in lines[0] and "127.0.0.1:" in lines[0]


def test_a_missing_header_times_out(proxied, settings, caplog):
    settings.POPSERVER_PROXY_HEADER_TIMEOUT = 0.3
    sock = connect(proxied, b"PROXY TCP4 ")
    assert closed_without_a_word(sock)
    assert "timed out" in wait_for(lambda: logs(caplog, "bad PROXY header"))[0]


def test_tls_at_the_proxy_counts_as_tls_for_the_plaintext_policy(proxied, alice, settings):
    settings.POPSERVER_PLAINTEXT_AUTH = "never"  # TLS required, even from trusted networks
    plain = connect(proxied, v2(CLIENT))
    read_lines(plain, 1)
    plain.sendall(b"USER alice\r\n")
    assert read_lines(plain, 1) == [PLAINTEXT_REFUSED]
    plain.close()

    sock = connect(proxied, v2(CLIENT, tlvs=ssl_tlv(version="TLSv1.3")))
    read_lines(sock, 1)
    sock.sendall(b"CAPA\r\n")
    capa = b""
    while not capa.endswith(b"\r\n.\r\n"):
        capa += sock.recv(1000)
    assert b"\r\nUSER\r\n" in capa and b"STLS" not in capa
    sock.sendall(b"STLS\r\nUSER alice\r\nPASS secret\r\nQUIT\r\n")
    assert read_lines(sock, 4) == [
        b"-ERR TLS is already active.",
        b"+OK",
        b"+OK Logged in.",
        b"+OK Logging out.",
    ]
    success = LoginEvent.objects.get(outcome="success")
    assert success.tls and success.tls_at_proxy and success.peer_ip == "192.0.2.10"
    assert not LoginEvent.objects.filter(tls_at_proxy=True).exclude(pk=success.pk).exists()


def test_an_ssl_tlv_without_the_client_flag_is_not_tls(proxied, alice, settings):
    settings.POPSERVER_PLAINTEXT_AUTH = "never"
    sock = connect(proxied, v2(CLIENT, tlvs=ssl_tlv(client=0)))
    read_lines(sock, 1)
    sock.sendall(b"USER alice\r\n")
    assert read_lines(sock, 1) == [PLAINTEXT_REFUSED]


@pytest.mark.parametrize("header", [v2(command=pp.CMD_LOCAL), b"PROXY UNKNOWN\r\n"])
def test_a_health_check_uses_the_proxys_address_and_logs_quietly(proxied, caplog, header):
    caplog.set_level("DEBUG", logger="popserver")
    sock = connect(proxied, header)
    assert read_lines(sock, 1)[0] == b"+OK popserver ready."
    sock.sendall(b"QUIT\r\n")
    assert read_lines(sock, 1)[0].startswith(b"+OK")
    record = wait_for(lambda: [r for r in caplog.records if r.getMessage().startswith("Disconnected")])[0]
    assert record.levelname == "DEBUG" and "peer=127.0.0.1:" in record.getMessage()


def test_a_header_without_an_address_keeps_the_proxys(proxied, alice, settings):
    settings.POPSERVER_PLAINTEXT_AUTH = "always"
    sock = connect(proxied, v2(None, None, family=pp.AF_UNIX, transport=pp.TRANSPORT_STREAM))
    read_lines(sock, 1)
    sock.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
    assert read_lines(sock, 3)[1] == b"+OK Logged in."
    assert LoginEvent.objects.get().peer_ip == "127.0.0.1"


def test_the_per_ip_cap_counts_the_client_not_the_proxy(proxied, settings):
    settings.POPSERVER_MAX_UNAUTHENTICATED_PER_IP = 2
    settings.POPSERVER_TRUSTED_NETWORKS = []  # the proxy's own address would be exempt anyway
    greeted = []
    for source in (("192.0.2.10", 1), ("192.0.2.10", 2), ("192.0.2.11", 1), ("192.0.2.11", 2)):
        greeted.append(connect(proxied, v2(source)))  # one after the other: "oldest" is well defined
        assert read_lines(greeted[-1], 1)[0].startswith(b"+OK")  # four from 127.0.0.1: the proxy has no cap
    first, second, *others = greeted
    third = connect(proxied, v2(("192.0.2.10", 3)))
    assert read_lines(third, 1)[0].startswith(b"+OK")
    assert closed_without_a_word(first)  # 192.0.2.10's oldest idle connection made room
    for sock in (second, *others, third):
        sock.sendall(b"CAPA\r\n")
        assert read_lines(sock, 1)[0].startswith(b"+OK")


def test_implicit_tls_reads_the_header_before_the_handshake(settings, pop3_server_factory, alice, tmp_path):
    settings.POPSERVER_PROXY_TRUSTED_NETWORKS = ["127.0.0.1/32"]
    certs = make_cert_files(tmp_path)
    client_context = certs.client_context
    server = pop3_server_factory(
        tls=TlsContextHolder(certs.certfile, certs.keyfile), implicit_tls=True, proxy_protocol=True
    )
    raw = connect(server, v2(CLIENT), port=server.tls_port)
    with client_context.wrap_socket(raw, server_hostname="localhost") as sock:
        assert read_lines(sock, 1)[0].startswith(b"+OK")
        sock.sendall(b"USER alice\r\nPASS secret\r\nQUIT\r\n")
        assert read_lines(sock, 3)[1] == b"+OK Logged in."
    event = LoginEvent.objects.get()
    assert event.peer_ip == "192.0.2.10" and event.tls and not event.tls_at_proxy
    # Without a header the TLS listener closes too (the ClientHello is not a PROXY header).
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client_context.wrap_socket(connect(server, port=server.tls_port), server_hostname="localhost")
