"""TLS and SASL over the wire: STLS (RFC 2595), implicit TLS (RFC 8314), AUTH (RFC 5034), plaintext policy."""

import base64
import poplib
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from popserver.mailin.delivery import deliver
from popserver.server.tls import TlsContextHolder

pytestmark = pytest.mark.live
PLAINTEXT_REFUSED = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."


@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture
def cert_files(ca, tmp_path):
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return str(certfile), str(keyfile), str(cafile)


@pytest.fixture
def client_context(ca):
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    deliver("alice", b"Subject: over tls\r\n\r\nhello\r\n")
    return mailbox


@pytest.fixture
def tls_server(pop3_server_factory, cert_files):
    certfile, keyfile, _ = cert_files
    return pop3_server_factory(tls=TlsContextHolder(certfile, keyfile), implicit_tls=True)


def line(sock) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(data)
        data += chunk
    return data


def test_implicit_tls_with_poplib(tls_server, alice, client_context):
    client = poplib.POP3_SSL("127.0.0.1", tls_server.tls_port, context=client_context, timeout=10)
    caps = client.capa()
    assert "STLS" not in caps and "USER" in caps
    client.user("alice")
    client.pass_("secret")
    assert client.retr(1)[1][-1] == b"hello"
    client.quit()


def test_stls_with_poplib(tls_server, alice, client_context):
    client = poplib.POP3("127.0.0.1", tls_server.port, timeout=10)
    assert "STLS" in client.capa()
    client.stls(client_context)
    assert "STLS" not in client.capa()  # only once
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == 1
    client.quit()


def test_stls_discards_pipelined_plaintext(tls_server, alice, client_context):
    raw = socket.create_connection(("127.0.0.1", tls_server.port), timeout=10)
    assert line(raw).startswith(b"+OK")
    raw.sendall(b"STLS\r\nUSER alice\r\nCAPA\r\n")  # one packet: the injection of CVE-2011-0411
    assert line(raw) == b"+OK Begin TLS negotiation now.\r\n"
    sock = client_context.wrap_socket(raw, server_hostname="localhost")
    sock.sendall(b"PASS secret\r\n")
    assert line(sock) == b"-ERR No username given.\r\n"  # the pipelined USER was never executed
    sock.sendall(b"NOOP\r\n")
    assert line(sock).startswith(b"-ERR")  # and no CAPA reply is waiting in front of it
    sock.close()


def test_stls_refused_in_transaction_and_without_certificate(pop3_server, alice):
    sock = pop3_server.socket()
    line(sock)
    sock.sendall(b"CAPA\r\n")
    capa = b""
    while not capa.endswith(b"\r\n.\r\n"):
        capa += sock.recv(4096)
    assert b"STLS" not in capa
    sock.sendall(b"STLS\r\n")
    assert line(sock).startswith(b"-ERR")


def test_stalled_handshake_blocks_no_one(tls_server, alice, client_context):
    stalled = socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10)
    plaintext_on_tls_port = socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10)
    plaintext_on_tls_port.sendall(b"USER alice\r\n")
    client = poplib.POP3_SSL("127.0.0.1", tls_server.tls_port, context=client_context, timeout=10)
    client.user("alice")
    client.pass_("secret")
    assert client.retr(1)[1][-1] == b"hello"
    client.quit()
    # Plaintext on the TLS port fails its handshake and is closed (maybe after a TLS alert, maybe with a
    # reset): never a POP3 line.
    received = b""
    try:
        while chunk := plaintext_on_tls_port.recv(4096):
            received += chunk
    except ConnectionResetError:
        pass  # closed with unread data: a reset is a close too
    assert not received.startswith((b"+OK", b"-ERR"))
    assert b"alice" not in received
    stalled.close()
    plaintext_on_tls_port.close()


def test_plaintext_policy_for_untrusted_peers(pop3_server_factory, cert_files, alice, client_context):
    certfile, keyfile, _ = cert_files
    server = pop3_server_factory(tls=TlsContextHolder(certfile, keyfile), is_trusted=lambda ip: False)
    client = poplib.POP3("127.0.0.1", server.port, timeout=10)
    caps = client.capa()
    assert "USER" not in caps and not any(c.startswith("SASL") for c in caps) and "STLS" in caps
    with pytest.raises(poplib.error_proto) as info:
        client.user("alice")
    assert info.value.args[0] == PLAINTEXT_REFUSED
    client.sock.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0secret") + b"\r\n")
    assert client.file.readline() == PLAINTEXT_REFUSED + b"\r\n"
    client.stls(client_context)
    caps = client.capa()
    assert "USER" in caps and caps["SASL"] == ["PLAIN", "LOGIN"]
    client.user("alice")
    client.pass_("secret")
    client.quit()


def test_plaintext_policy_never_and_always(pop3_server, alice, settings):
    settings.POPSERVER_PLAINTEXT_AUTH = "never"
    client = poplib.POP3("127.0.0.1", pop3_server.port, timeout=10)
    with pytest.raises(poplib.error_proto, match="Plaintext authentication disallowed"):
        client.user("alice")
    settings.POPSERVER_PLAINTEXT_AUTH = "always"
    client = poplib.POP3("127.0.0.1", pop3_server.port, timeout=10)
    client.user("alice")
    client.pass_("secret")
    client.quit()


def test_sasl_plain_and_login_live(pop3_server, alice):
    sock = pop3_server.socket()
    line(sock)
    sock.sendall(b"AUTH\r\n")
    listing = b""
    while not listing.endswith(b"\r\n.\r\n"):
        listing += sock.recv(4096)
    assert listing == b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    sock.sendall(b"AUTH PLAIN\r\n")
    assert line(sock) == b"+ \r\n"
    sock.sendall(base64.b64encode(b"\0alice\0wrong") + b"\r\n")
    assert line(sock) == b"-ERR [AUTH] Authentication failed.\r\n"
    sock.sendall(b"AUTH LOGIN\r\n")
    assert line(sock) == b"+ VXNlcm5hbWU6\r\n"
    sock.sendall(base64.b64encode(b"alice") + b"\r\n")
    assert line(sock) == b"+ UGFzc3dvcmQ6\r\n"
    sock.sendall(base64.b64encode(b"secret") + b"\r\n")
    assert line(sock) == b"+OK Logged in.\r\n"
    sock.sendall(b"AUTH PLAIN\r\nQUIT\r\n")
    assert line(sock).startswith(b"-ERR")
    assert line(sock) == b"+OK Logging out.\r\n"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_pop3s_and_ssl_reqd(tls_server, alice, cert_files):
    _, _, cafile = cert_files
    for url, extra in (
        (f"pop3s://127.0.0.1:{tls_server.tls_port}/1", []),
        (f"pop3://127.0.0.1:{tls_server.port}/1", ["--ssl-reqd"]),
    ):
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", cafile, *extra, "--user", "alice:secret", url],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.endswith(b"hello\r\n") and b"Subject: over tls" in result.stdout


def test_runpop3_refuses_a_missing_certificate(tmp_path):
    from tests.conftest import manage_py_command, subprocess_env

    result = subprocess.run(
        manage_py_command("runpop3", "127.0.0.1:0", "--certfile", str(tmp_path / "none.pem")),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "certificate or key not found" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def _peer_cert(port: int, cafile: str) -> bytes:
    context = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as sock,
    ):
        return sock.getpeercert(binary_form=True)


def test_sighup_reloads_the_certificate(runpop3, alice, ca, cert_files):
    certfile, keyfile, cafile = cert_files
    server = runpop3("--certfile", certfile, "--keyfile", keyfile, "--tls-port", "0")
    before = _peer_cert(server.tls_port, cafile)
    renewed = ca.issue_cert("localhost", "127.0.0.1")
    renewed.cert_chain_pems[0].write_to_path(certfile)
    renewed.private_key_pem.write_to_path(keyfile)
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while _peer_cert(server.tls_port, cafile) == before:
        assert time.monotonic() < deadline, "the certificate was not reloaded"
        threading.Event().wait(0.1)
    assert server.terminate() == 0


def test_a_handshake_has_one_deadline_not_one_per_read(tls_server, settings):
    settings.POPSERVER_LOGIN_TIMEOUT = 1
    trickle = socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10)
    started = time.monotonic()
    trickle.sendall(b"\x16")  # the first byte of a ClientHello, then nothing
    assert trickle.recv(100) == b""  # closed by the server
    assert time.monotonic() - started < 5
