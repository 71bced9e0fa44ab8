"""Two runpop3 nodes behind a real HAProxy (Debian's), on one database: the deployment of the README, whose
haproxy.cfg block this test runs (``haproxy_config``).

HAProxy (TCP mode, ``send-proxy-v2-ssl``, health checks by the greeting with ``check-send-proxy``) listens on
sockets this test binds on free ports and hands over as ``fd@N``. Clients bind 127.0.0.2 or 127.0.0.3 before
connecting, so the nodes (which trust only 127.0.0.1, HAProxy's address, as a network and as a proxy) see
two distinct remote clients. Frontends: ``tls`` (HAProxy terminates TLS) and ``plain`` balance over both
nodes; ``a`` and ``b`` (TLS) reach one node each.
"""

from __future__ import annotations

import csv
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from popserver.delivery import deliver
from popserver.models import LoginEvent, LoginThrottle, Mailbox
from tests.certs import make_cert_files
from tests.proxyheaders import ssl_tlv, v2
from tests.test_server_live import wait_for
from tests.test_tls_live import PLAINTEXT_REFUSED

HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
pytestmark = [
    pytest.mark.live,
    pytest.mark.slow,
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (.ci/run installs Debian's)"),
]
FRONTENDS = ("tls", "plain", "a", "b")
# What every node is given: HAProxy at 127.0.0.1 is the only trusted network and proxy; locks of a dead
# node are free after 3 s (heartbeats every second).
NODE_ENV = {
    "POPSERVER_PROXY_TRUSTED_NETWORKS": '["127.0.0.1/32"]',
    "POPSERVER_TRUSTED_NETWORKS": '["127.0.0.1/32"]',
    "POPSERVER_LOCK_STALE_AFTER": "3",
    "POPSERVER_LOCK_HEARTBEAT": "1",
}

README = Path(__file__).resolve().parent.parent / "README.md"
# The README's haproxy.cfg, made local: (what the README says, what the test runs), each found exactly once.
LOCAL = [
    ("stats socket /run/haproxy/admin.sock", "stats socket {run}/admin.sock"),
    ("bind :995 ssl crt /etc/haproxy/mail.pem", "bind fd@{fd_tls} ssl crt {crt}"),
    ("bind :110\n", "bind fd@{fd_plain}\n"),
    ("check inter 2s fall 2", "check inter 300ms fall 2"),
    ("server pop1 10.0.0.11:8110", "server a 127.0.0.1:{port_a}"),
    ("server pop2 10.0.0.12:8110", "server b 127.0.0.1:{port_b}"),
]
# One node each, for the tests that must choose.
PER_NODE = """
frontend pop3s_a
    bind fd@{fd_a} ssl crt {crt}
    default_backend pop3_a

frontend pop3s_b
    bind fd@{fd_b} ssl crt {crt}
    default_backend pop3_b

backend pop3_a
    option tcp-check
    tcp-check expect string +OK
    default-server send-proxy-v2-ssl check-send-proxy check inter 300ms fall 2 rise 1
    server a 127.0.0.1:{port_a}

backend pop3_b
    option tcp-check
    tcp-check expect string +OK
    default-server send-proxy-v2-ssl check-send-proxy check inter 300ms fall 2 rise 1
    server b 127.0.0.1:{port_b}
"""


def haproxy_config(**values) -> str:
    """The README's deployment haproxy.cfg with this test's sockets, certificate and nodes, plus PER_NODE."""
    text = README.read_text()
    start = text.index("```\n", text.index("The `haproxy.cfg` that `tests/test_haproxy.py` runs")) + 4
    config = text[start : text.index("```", start)]
    for published, local in LOCAL:
        assert config.count(published) == 1, f"the README's haproxy.cfg no longer says {published!r}"
        config = config.replace(published, local.format(**values))
    return config + PER_NODE.format(**values)


class Client:
    """A POP3 client connecting from ``source`` (a loopback address), over TLS to HAProxy when ``context``."""

    def __init__(self, port: int, source: str, context=None, header: bytes = b""):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        raw.sendall(header)
        self.sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def login(self, user: str = "alice", password: str = "secret") -> bytes:
        reply = self.command(f"USER {user}")
        return reply if not reply.startswith(b"+OK") else self.command(f"PASS {password}")

    def close(self) -> None:
        try:
            self.command("QUIT")
        except OSError:
            pass
        self.sock.close()


class Cluster:
    def __init__(self, runpop3, folder: Path):
        self.folder = folder
        self.certs = make_cert_files(folder)
        self.nodes = {
            "a": runpop3("--proxy-protocol", POPSERVER_NODE_NAME="node-a", **NODE_ENV),
            "b": runpop3("--proxy-protocol", POPSERVER_NODE_NAME="node-b", **NODE_ENV),
        }
        self.listeners = {}
        for name in FRONTENDS:
            listener = socket.create_server(("127.0.0.1", 0), backlog=128)
            listener.set_inheritable(True)
            self.listeners[name] = listener
        config = folder / "haproxy.cfg"
        config.write_text(
            haproxy_config(
                run=folder,
                crt=self.certs.combined,
                port_a=self.nodes["a"].port,
                port_b=self.nodes["b"].port,
                **{f"fd_{name}": listener.fileno() for name, listener in self.listeners.items()},
            )
        )
        checked = subprocess.run(
            [HAPROXY, "-c", "-f", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
            pass_fds=[listener.fileno() for listener in self.listeners.values()],
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.haproxy = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            pass_fds=[lst.fileno() for lst in self.listeners.values()],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for backend, server in (("pop3_nodes", "a"), ("pop3_nodes", "b"), ("pop3_a", "a"), ("pop3_b", "b")):
            self.wait_status(backend, server, "UP", check="L7OK")  # a check has passed, not just the start

    def port(self, frontend: str) -> int:
        return self.listeners[frontend].getsockname()[1]

    def client(self, frontend: str, source: str) -> Client:
        context = self.certs.client_context if frontend != "plain" else None
        return Client(self.port(frontend), source, context)

    def stats(self) -> dict[tuple[str, str], tuple[str, str]]:
        """(backend, server) -> (status, the last check's status), from HAProxy's stats socket."""
        with socket.socket(socket.AF_UNIX) as admin:
            admin.settimeout(5)
            admin.connect(str(self.folder / "admin.sock"))
            admin.sendall(b"show stat\n")
            data = b""
            while chunk := admin.recv(65536):
                data += chunk
        rows = csv.DictReader(data.decode().lstrip("# ").splitlines())
        return {
            (row["pxname"], row["svname"]): (row["status"], row["check_status"].lstrip("* ")) for row in rows
        }

    def wait_status(
        self, backend: str, server: str, status: str, check: str = "", timeout: float = 15
    ) -> None:
        def reached():
            try:
                current, last_check = self.stats().get((backend, server), ("", ""))
            except OSError:  # the stats socket is not there yet
                return False
            return current.split(" ")[0] == status and last_check.startswith(check)

        assert wait_for(reached, timeout=timeout, interval=0.1), (backend, server, status, self.stats())

    def stop(self) -> None:
        self.haproxy.terminate()
        try:
            self.haproxy.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.haproxy.kill()
            self.haproxy.wait(timeout=10)
        self.haproxy.stdout.close()
        for listener in self.listeners.values():
            listener.close()


@pytest.fixture
def cluster(runpop3, tmp_path):
    started = Cluster(runpop3, tmp_path)
    yield started
    started.stop()


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    deliver("alice", b"Subject: behind haproxy\r\n\r\nhello\r\n")
    return mailbox


def test_health_checks_send_a_header_and_pass(cluster):
    servers = {key: value for key, value in cluster.stats().items() if key[1] in ("a", "b")}
    assert len(servers) == 4 and all(value == ("UP", "L7OK") for value in servers.values()), servers
    for node in cluster.nodes.values():
        assert not any("bad PROXY header" in line for line in node.stderr_lines), node.stderr_lines


def test_nodes_see_the_clients_addresses_in_audit_rows_and_throttle_keys(cluster, alice):
    for source in ("127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"):
        client = cluster.client("tls", source)
        assert client.login() == b"+OK Logged in."
        client.close()
    wrong = cluster.client("tls", "127.0.0.3")
    assert wrong.login(password="wrong").startswith(b"-ERR [AUTH]")
    wrong.close()
    rows = list(LoginEvent.objects.order_by("id").values_list("peer_ip", "node", "outcome", "tls_at_proxy"))
    assert [row[0] for row in rows] == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3", "127.0.0.3"]
    assert {row[1] for row in rows} == {"node-a", "node-b"}  # round robin over both nodes
    assert all(row[3] for row in rows)  # TLS at HAProxy, said by the SSL TLV
    assert set(LoginThrottle.objects.values_list("key", flat=True)) >= {"alice|127.0.0.3", "127.0.0.3"}
    assert not LoginThrottle.objects.filter(key__contains="127.0.0.1").exists()


def test_ten_wrong_passwords_lock_the_account_for_one_address_only(cluster, alice):
    for _ in range(10):
        client = cluster.client("tls", "127.0.0.2")
        assert client.login(password="wrong").startswith(b"-ERR [AUTH]")
        client.close()
    locked = cluster.client("tls", "127.0.0.2")
    assert locked.login().startswith(b"-ERR [SYS/TEMP]")  # the right password, refused from 127.0.0.2
    locked.close()
    other = cluster.client("tls", "127.0.0.3")
    assert other.login() == b"+OK Logged in."
    other.close()
    assert LoginThrottle.objects.get(key="alice|127.0.0.2").locked_until is not None


def test_a_mailbox_locked_through_node_a_is_in_use_through_node_b(cluster, alice):
    holder = cluster.client("a", "127.0.0.2")
    assert holder.login() == b"+OK Logged in."
    mailbox = Mailbox.objects.get(pk=alice.pk)
    assert mailbox.lock_host == "node-a" and mailbox.lock_peer.startswith("127.0.0.2:")
    other = cluster.client("b", "127.0.0.3")
    assert other.login().startswith(b"-ERR [IN-USE]")
    holder.close()
    wait_for(lambda: not Mailbox.objects.get(pk=alice.pk).lock_token)
    again = cluster.client("b", "127.0.0.3")
    assert again.login() == b"+OK Logged in."
    again.close()


def test_a_stopped_node_is_marked_down_and_clients_go_to_the_other(cluster, alice):
    assert cluster.nodes["b"].terminate() == 0
    cluster.wait_status("pop3_nodes", "b", "DOWN", check="L4CON")  # connection refused
    for _ in range(4):
        client = cluster.client("tls", "127.0.0.2")
        assert client.login() == b"+OK Logged in."
        client.close()
        wait_for(lambda: not Mailbox.objects.get(pk=alice.pk).lock_token)
    assert set(LoginEvent.objects.values_list("node", flat=True)) == {"node-a"}


def test_a_killed_nodes_locks_are_free_for_the_other_after_the_stale_time(cluster, alice):
    holder = cluster.client("a", "127.0.0.2")
    assert holder.login() == b"+OK Logged in."
    assert holder.command("DELE 1") == b"+OK Marked to be deleted."
    cluster.nodes["a"].kill()  # kill -9: no release, no UPDATE
    killed_at = time.monotonic()
    first = cluster.client("b", "127.0.0.3")
    assert first.login().startswith(b"-ERR [IN-USE]")  # node-a's heartbeat is fresh: not node-b's to judge
    first.sock.close()

    def logged_in():
        client = cluster.client("b", "127.0.0.3")
        if client.login() == b"+OK Logged in.":
            return client
        client.sock.close()
        return None

    client = wait_for(logged_in, timeout=20, interval=0.3)
    assert time.monotonic() - killed_at >= 2  # not before the heartbeat went stale (3 s after the last one)
    assert client.command("STAT").startswith(b"+OK 1 ")  # the killed session's DELE was never committed
    client.close()


def test_plaintext_passwords_through_the_plain_frontend_are_refused(cluster, alice):
    client = cluster.client("plain", "127.0.0.2")
    assert client.command("USER alice") == PLAINTEXT_REFUSED
    client.close()


def test_a_raw_v2_header_with_the_ssl_tlv_lets_user_pass_through(cluster, alice):
    node = cluster.nodes["a"]
    for tlvs, expected in ((b"", PLAINTEXT_REFUSED), (ssl_tlv(), b"+OK Logged in.")):
        # Straight to the node, from 127.0.0.1 as HAProxy would, for a client at 198.51.100.7.
        client = Client(
            node.port, "127.0.0.1", header=v2(("198.51.100.7", 40000), ("127.0.0.1", node.port), tlvs=tlvs)
        )
        assert client.login() == expected
        client.close()
    event = LoginEvent.objects.get()  # the refused USER never got as far as a password
    assert (event.peer_ip, event.node, event.outcome, event.tls_at_proxy) == (
        "198.51.100.7",
        "node-a",
        "success",
        True,
    )
