"""Prometheus metrics (issue 16): ``/metrics`` scraped over HTTP after scripted sessions, counted by value.

In this process the metrics live in one registry (``metrics.enable()``); ``runpop3 --metrics`` runs as a
subprocess; the multiprocess mode (workers adding up, a dead worker's gauges dropped) in a forked child.
"""

import base64
import contextlib
import json
import os
import socket
import signal
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

import pytest
from django.db import connection
from prometheus_client.parser import text_string_to_metric_families

from popserver.conf import node_name
from popserver.logins.app_passwords import create_app_password
from popserver.mailin.delivery import deliver
from popserver.models import Mailbox
from popserver.protocol.session import Pop3Session
from popserver.server import metrics
from popserver.testing import MemoryMaildrop
from tests import proxyheaders
from tests.waiting import wait_for
from tests.conftest import REPO, subprocess_env

pytestmark = pytest.mark.live

MESSAGE = b"From: a@example.com\r\nSubject: counted\r\n\r\nhello\r\n"


# Scraping ---------------------------------------------------------------------------------------------------
class Samples(dict):
    """(sample name, labels) -> value, from one scrape."""

    def __call__(self, name: str, **labels: str) -> float:
        """One series' value; a missing series is an error (every series exists from the start)."""
        return self[name, frozenset(labels.items())]

    def total(self, name: str, **labels: str) -> float:
        """The sum over every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(value for (n, found), value in self.items() if n == name and wanted <= found)

    def labels(self, name: str, label: str) -> set[str]:
        return {dict(found)[label] for (n, found) in self if n == name and label in dict(found)}


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def scrape_until(port: int, predicate, timeout: float = 10.0) -> Samples:
    """Scrape until ``predicate(samples)`` holds: a session's last counts land just after its last reply."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if predicate(samples) or time.monotonic() > deadline:
            return samples
        threading.Event().wait(0.02)  # sync-ok: polling the scrape, bounded by the deadline


# A raw client that counts what it receives ----------------------------------------------------------------
class Client:
    def __init__(self, port: int, *, sock: socket.socket | None = None, greeting: bool = True):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=10)
        self.received = 0
        self.greeting = self.read(b"\r\n") if greeting else b""

    def read(self, terminator: bytes) -> bytes:
        data = b""
        while not data.endswith(terminator):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {data[-200:]!r}")
            data += chunk
        self.received += len(data)
        return data

    def command(self, line: str, terminator: bytes = b"\r\n") -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.read(terminator)

    def closed_by_server(self) -> bool:
        return self.sock.recv(1) == b""

    def close(self) -> None:
        self.sock.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.fixture
def metered(pop3_server_factory):
    """start(**server_options) -> (server, metrics port): metrics on, a live server, /metrics on a free port."""
    metrics.enable()
    http = metrics.serve(("127.0.0.1", 0))

    def start(**kwargs):
        return pop3_server_factory(**kwargs), http.port

    yield start
    metrics.disable()


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    for _ in range(3):
        deliver("alice", MESSAGE)
    return mailbox


def script_two_sessions(port: int, connect=Client, logged_in=lambda: None) -> int:
    """Login, STAT, RETR, DELE, QUIT; then a failed login, an unknown verb and QUIT. Octets received.
    ``connect(port)``: a greeted client; ``logged_in()`` is called while the first session is logged in."""
    good = connect(port)
    assert good.command("USER alice") == b"+OK\r\n"
    assert good.command("PASS secret") == b"+OK Logged in.\r\n"
    logged_in()
    assert good.command("STAT").startswith(b"+OK 3 ")
    assert good.command("RETR 1", b"\r\n.\r\n").endswith(b"hello\r\n.\r\n")
    assert good.command("DELE 1").startswith(b"+OK")
    assert good.command("QUIT").startswith(b"+OK")
    assert good.closed_by_server()
    bad = connect(port)
    assert bad.command("USER alice") == b"+OK\r\n"
    assert bad.command("PASS wrong").startswith(b"-ERR [AUTH]")
    assert bad.command("XYZZY s3cret").startswith(b"-ERR")
    assert bad.command("QUIT").startswith(b"+OK")
    assert bad.closed_by_server()
    good.close(), bad.close()
    return good.received + bad.received


def check_scripted_sessions(samples: Samples, received: int, *, holders: int = 0, full: int = 0) -> None:
    """What ``script_two_sessions`` leaves in the metrics, by value (sums over workers, if any), with
    ``holders`` more sessions of USER, PASS (right) and QUIT, and ``full`` connections refused for want of
    room."""
    s = samples.total
    assert s("popserver_sessions_open") == 0
    assert s("popserver_connections_accepted_total") == 2 + holders
    assert s("popserver_connections_refused_total", reason="full") == full
    assert s("popserver_connections_refused_total") == full
    assert s("popserver_sent_bytes_total") == received
    logins = {
        result: s("popserver_logins_total", method="user", result=result) for result in metrics.LOGIN_RESULTS
    }
    assert logins == {r: {"ok": 1 + holders, "wrong_password": 1}.get(r, 0) for r in metrics.LOGIN_RESULTS}
    assert s("popserver_logins_total") == 2 + holders
    assert s("popserver_login_duration_seconds_count") == 2 + holders
    expected = {"USER": 2, "PASS": 2, "STAT": 1, "RETR": 1, "DELE": 1, "QUIT": 2, "unknown": 1}
    for verb in ("USER", "PASS", "QUIT"):
        expected[verb] += holders
    for verb in metrics.VERBS:
        assert s("popserver_commands_total", verb=verb) == expected.get(verb, 0), verb
        assert s("popserver_command_duration_seconds_count", verb=verb) == expected.get(verb, 0), verb
    assert s("popserver_commands_total") == sum(expected.values())
    assert 0 < s("popserver_command_duration_seconds_sum", verb="RETR") < 10
    assert s("popserver_command_duration_seconds_bucket", verb="RETR", le="+Inf") == 1
    # The client's own word never becomes a label value.
    assert "XYZZY" not in samples.labels("popserver_commands_total", "verb")
    for name in ("popserver_lock_refusals_total", "popserver_database_errors_total"):
        assert s(name) == 0
    assert s("popserver_tls_handshakes_total") == s("popserver_proxy_headers_total") == 0


# In this process ------------------------------------------------------------------------------------------
def test_a_scripted_session_is_counted_by_value(metered, alice):
    server, port = metered()
    before = scrape(port)
    assert before("popserver_node_info", node=node_name()) == 1
    assert before("popserver_logins_total", method="app_password", result="throttled") == 0  # pre-made
    received = script_two_sessions(server.port)
    samples = scrape_until(
        port,
        lambda s: s.total("popserver_sent_bytes_total") >= received and s("popserver_sessions_open") == 0,
    )
    check_scripted_sessions(samples, received)
    assert samples("popserver_commands_created", verb="RETR") > 0  # one registry: _created too


def test_login_methods_and_results(metered, alice, make_mailbox, settings):
    server, port = metered()
    make_mailbox("bob", "secret", pop3_enabled=False)
    carol = make_mailbox("carol", "secret")
    _, app_secret = create_app_password(carol, "phone")
    make_mailbox("dave", "secret")

    bob = Client(server.port)  # the right password, POP3 switched off: refused like a wrong one
    bob.command("USER bob")
    assert bob.command("PASS secret").startswith(b"-ERR [AUTH]")
    holder = Client(server.port)
    holder.command("USER alice")
    assert holder.command("PASS secret").startswith(b"+OK")
    second = Client(server.port)
    assert second.command("AUTH PLAIN " + b64("\0alice\0secret")).startswith(b"-ERR [IN-USE]")
    assert holder.command("QUIT").startswith(b"+OK")
    settings.POPSERVER_LOGIN_DELAY = 3600
    soon = Client(server.port)
    assert soon.command("AUTH LOGIN").startswith(b"+ ")
    assert soon.command(b64("alice")).startswith(b"+ ")
    assert soon.command(b64("secret")).startswith(b"-ERR [LOGIN-DELAY]")
    settings.POPSERVER_LOGIN_DELAY = 0
    app = Client(server.port)
    app.command("USER carol")
    assert app.command("PASS " + app_secret).startswith(b"+OK")
    settings.POPSERVER_THROTTLE_ACCOUNT_FAILURES = 1
    guesser = Client(server.port)
    guesser.command("USER dave")
    assert guesser.command("PASS wrong").startswith(b"-ERR [AUTH]")
    guesser.command("USER dave")
    assert guesser.command("PASS secret").startswith(b"-ERR [SYS/TEMP]")
    for client in (bob, holder, second, soon, app, guesser):
        client.close()

    expected = {
        ("user", "disabled"): 1,
        ("user", "ok"): 1,
        ("plain", "in_use"): 1,
        ("login", "login_delay"): 1,
        ("app_password", "ok"): 1,
        ("user", "wrong_password"): 1,
        ("user", "throttled"): 1,
    }
    samples = scrape_until(port, lambda s: s("popserver_sessions_open") == 0)
    for method in metrics.LOGIN_METHODS:
        for result in metrics.LOGIN_RESULTS:
            value = samples("popserver_logins_total", method=method, result=result)
            assert value == expected.get((method, result), 0), (method, result)
    assert samples("popserver_login_duration_seconds_count") == len(expected)
    assert samples("popserver_lock_refusals_total", reason="in_use") == 1
    assert samples("popserver_lock_refusals_total", reason="lost") == 0
    # AUTH PLAIN and AUTH LOGIN are two AUTH commands; the lines answering challenges are not commands.
    assert samples("popserver_commands_total", verb="AUTH") == 2


def test_refusals_and_drops(metered, alice, settings):
    settings.POPSERVER_MAX_SESSIONS = 1
    server, port = metered()
    idle = Client(server.port)
    newcomer = Client(server.port)  # the server is full: the idle one is dropped to make room
    assert idle.closed_by_server()
    newcomer.command("USER alice")
    assert newcomer.command("PASS secret").startswith(b"+OK")
    refused = Client(server.port)  # full of logged-in sessions: no room
    assert refused.greeting.startswith(b"-ERR [SYS/TEMP] Too many connections")
    samples = scrape(port)
    assert samples("popserver_connections_accepted_total") == 2
    assert samples("popserver_connections_dropped_total") == 1
    assert samples("popserver_connections_refused_total", reason="full") == 1
    assert samples.total("popserver_connections_refused_total") == 1
    assert samples("popserver_sessions_open") == 1
    newcomer.command("QUIT")
    for client in (idle, newcomer, refused):
        client.close()


@pytest.fixture
def cert_files(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    cert.private_key_pem.write_to_path(str(keyfile))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return str(certfile), str(keyfile), context


def test_tls_handshakes_by_mode_and_result(metered, alice, cert_files):
    from popserver.server.tls import TlsContextHolder

    certfile, keyfile, client_context = cert_files
    server, port = metered(tls=TlsContextHolder(certfile, keyfile), implicit_tls=True)
    stls = Client(server.port)
    assert stls.command("STLS").startswith(b"+OK")
    wrapped = client_context.wrap_socket(stls.sock, server_hostname="localhost")
    wrapped.sendall(b"QUIT\r\n")
    assert wrapped.recv(100).startswith(b"+OK")
    wrapped.close()
    implicit = socket.create_connection(("127.0.0.1", server.tls_port), timeout=10)
    implicit.sendall(b"USER alice\r\n")  # plaintext on the implicit-TLS port: not a ClientHello
    with pytest.raises(ConnectionError):  # a TLS alert perhaps, then the end (or a reset)
        while implicit.recv(100):
            pass
        raise ConnectionError("closed")
    implicit.close()
    ok = client_context.wrap_socket(
        socket.create_connection(("127.0.0.1", server.tls_port), timeout=10), server_hostname="localhost"
    )
    assert ok.recv(100).startswith(b"+OK")
    ok.close()
    samples = scrape_until(port, lambda s: s.total("popserver_tls_handshakes_total") >= 3)
    expected = {("stls", "ok"): 1, ("implicit", "failed"): 1, ("implicit", "ok"): 1}
    for mode in metrics.TLS_MODES:
        for result in metrics.TLS_RESULTS:
            assert samples("popserver_tls_handshakes_total", mode=mode, result=result) == expected.get(
                (mode, result), 0
            ), (mode, result)


def test_proxy_headers_by_result(metered, alice, settings):
    settings.POPSERVER_PROXY_TRUSTED_NETWORKS = ["127.0.0.0/8"]
    settings.POPSERVER_PROXY_HEADER_TIMEOUT = 0.5
    server, port = metered(proxy_protocol=True)

    def connect(header: bytes, *, greeting: bool = True) -> Client:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(header)
        return Client(server.port, sock=sock, greeting=greeting)

    client = connect(proxyheaders.v1())
    assert client.greeting.startswith(b"+OK")
    client.command("QUIT")
    check = connect(proxyheaders.v2(None, None, command=proxyheaders.pp.CMD_LOCAL))
    assert check.greeting.startswith(b"+OK")
    check.command("QUIT")
    for client in (connect(b"GET / HTTP/1.0\r\n\r\n", greeting=False), connect(b"", greeting=False)):
        assert client.closed_by_server()  # not a header; no header within the time
    settings.POPSERVER_PROXY_TRUSTED_NETWORKS = ["192.0.2.0/24"]
    untrusted = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    assert untrusted.recv(100) == b""
    untrusted.close()
    samples = scrape_until(port, lambda s: s("popserver_sessions_open") == 0)
    expected = {"ok": 1, "health_check": 1, "invalid": 1, "timeout": 1}
    for result in metrics.PROXY_RESULTS:
        assert samples("popserver_proxy_headers_total", result=result) == expected.get(result, 0), result
    assert samples("popserver_connections_refused_total", reason="untrusted_proxy") == 1


@contextlib.contextmanager
def chunk_table_renamed():
    """The message bodies' table under another name for a moment: a real database error for a reader."""
    from popserver.models import MessageChunk

    table = MessageChunk._meta.db_table
    with connection.schema_editor() as editor:
        editor.alter_db_table(MessageChunk, table, table + "_away")
    try:
        yield
    finally:
        with connection.schema_editor() as editor:
            editor.alter_db_table(MessageChunk, table + "_away", table)


def test_database_errors_and_lost_locks(metered, alice):
    server, port = metered()
    client = Client(server.port)
    client.command("USER alice")
    assert client.command("PASS secret").startswith(b"+OK")
    with chunk_table_renamed():
        # SQLite's OperationalError is "the database is unavailable" (one log line per interval, without a
        # traceback); PostgreSQL's and MariaDB's ProgrammingError an internal error (logged with one).
        assert client.command("RETR 1").startswith(b"-ERR [SYS/TEMP]")
    Mailbox.objects.filter(pk=alice.pk).update(lock_token="")  # an operator freed the lock meanwhile
    assert client.command("QUIT").startswith(b"-ERR [SYS/TEMP]")
    client.close()
    samples = scrape_until(port, lambda s: s("popserver_sessions_open") == 0)
    errors = {
        error: samples("popserver_database_errors_total", error=error)
        for error in metrics.DATABASE_ERRORS
        if samples("popserver_database_errors_total", error=error)
    }
    assert sum(errors.values()) == 1 and set(errors) <= {"OperationalError", "ProgrammingError"}, errors
    assert samples("popserver_lock_refusals_total", reason="lost") == 1
    assert samples("popserver_commands_total", verb="RETR") == 1
    assert samples("popserver_commands_total", verb="QUIT") == 1


def test_switched_off_the_hooks_do_nothing_and_the_engine_is_plain():
    metrics.disable()
    assert not metrics.enabled
    assert metrics.session_class is Pop3Session
    for name in metrics._HOOKS:
        assert getattr(metrics, name) is metrics._nothing, name
    metrics.enable()
    try:
        assert metrics.session_class is metrics.MeteredSession
        assert all(getattr(metrics, name) is not metrics._nothing for name in metrics._HOOKS)
    finally:
        metrics.disable()


def test_the_flusher_starts_with_the_first_session_and_hands_counts_over_while_it_runs():
    """A process that serves no session (the parent of workers) has no flusher thread; the first session
    starts it, and its counts reach the library's values each second, before the session ends."""
    metrics.enable()
    try:
        state = metrics._state
        assert state.flusher is None
        session = metrics.session_class(lambda user, password, mechanism: MemoryMaildrop([b"x\r\n"]))
        flusher = state.flusher
        assert flusher is not None and flusher.is_alive()
        replies = b"".join(session.receive(b"USER a\r\nPASS b\r\nSTAT\r\n"))
        session.tally.batch_sent(len(replies))
        metrics.session_class(lambda user, password, mechanism: MemoryMaildrop([]))
        assert state.flusher is flusher  # one per process

        def handed_over():  # the library's own values, not a scrape (a scrape flushes first)
            return (
                state.sent._value.get() == len(replies)
                and state._commands[metrics._VERB_INDEX["STAT"]]._value.get()
            )

        wait_for(handed_over, timeout=5)
        assert state._commands[metrics._VERB_INDEX["STAT"]]._value.get() == 1
        buckets, _ = state._command_values[metrics._VERB_INDEX["PASS"]]
        assert sum(bucket.get() for bucket in buckets) == 1  # the histogram's too
    finally:
        metrics.disable()
    flusher.join(timeout=5)
    assert not flusher.is_alive()


def test_only_metrics_path_is_served(metered):
    _, port = metered()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10)
    assert refused.value.code == 404


# runpop3 and other processes ------------------------------------------------------------------------------
def test_runpop3_metrics(runpop3, alice):
    server = runpop3("--metrics", "127.0.0.1:0")
    assert server.metrics_port
    received = script_two_sessions(server.port)
    samples = scrape_until(
        server.metrics_port,
        lambda s: s.total("popserver_sent_bytes_total") >= received and s("popserver_sessions_open") == 0,
    )
    check_scripted_sessions(samples, received)
    assert server.terminate() == 0


BLOCK_PROMETHEUS = "import sys; sys.modules['prometheus_client'] = None\n"  # any import of it fails


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(**env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_popserver_runs_without_prometheus_client(transactional_db):
    """The package is optional: nothing imports it unless --metrics asks, and then the error says why."""
    code = BLOCK_PROMETHEUS + textwrap.dedent(
        """
        import django
        django.setup()
        import popserver.management.commands.runpop3, popserver.server.listener, popserver.server.metrics
        from django.core.management import call_command
        from django.core.management.base import CommandError
        try:
            call_command("runpop3", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
        except CommandError as exc:
            print(exc)
        """
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "--metrics needs the prometheus-client package: pip install 'popserver[metrics]'" in done.stdout


def test_multiprocess_mode_adds_up_and_forgets_a_dead_workers_sessions(tmp_path):
    """What the workers' supervisor relies on: a forked child's counts add to the parent's, and once the child
    is marked dead its open sessions stop counting (its counters stay)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    (folder / "counter_1.db").write_bytes(b"left over by a previous run")
    code = textwrap.dedent(
        f"""
        import json, os, sys
        assert "prometheus_client" not in sys.modules
        import django
        django.setup()
        from popserver.server import metrics
        metrics.enable(multiprocess=True, directory={str(folder)!r})
        assert not os.path.exists({str(folder / "counter_1.db")!r})  # emptied first
        http = metrics.serve(("127.0.0.1", 0))
        metrics.connection_accepted()
        metrics.session_opened()
        pid = os.fork()
        if pid == 0:
            metrics.worker_started()
            for _ in range(3):
                metrics.connection_accepted()
                metrics.session_opened()
            from popserver.testing import MemoryMaildrop
            session = metrics.session_class(lambda user, password, mechanism: MemoryMaildrop([b"x\\r\\n"]))
            replies = b"".join(session.receive(b"USER a\\r\\nPASS b\\r\\nSTAT\\r\\n"))
            session.tally.batch_sent(len(replies))
            metrics._state.flush()  # what the worker's flusher does every second
            metrics.login("user", "ok", 0.01)
            os._exit(0)  # killed: its sessions never closed
        os.waitpid(pid, 0)

        def values():
            from prometheus_client.parser import text_string_to_metric_families
            text = metrics.scrape().decode()
            found = {{}}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:  # summed over labels
                    found[sample.name] = found.get(sample.name, 0) + sample.value
            return found

        before = values()
        metrics.process_exited(pid)
        after = values()
        print(json.dumps({{"before": before, "after": after, "port": http.port}}))
        metrics.disable()
        """
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    before, after = result["before"], result["after"]
    assert before["popserver_connections_accepted_total"] == 4
    assert before["popserver_sessions_open"] == 4
    assert after["popserver_sessions_open"] == 1  # the dead child's three are gone
    assert after["popserver_connections_accepted_total"] == 4  # counts never go down
    assert after["popserver_sent_bytes_total"] == len(b"+OK\r\n+OK Logged in.\r\n+OK 1 3\r\n")
    assert after["popserver_login_duration_seconds_count"] == 1
    assert after["popserver_commands_total"] == after["popserver_command_duration_seconds_count"] == 3


def test_runpop3_metrics_address_errors(transactional_db):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="needs a port"):
        call_command("runpop3", "127.0.0.1:0", "--metrics", "127.0.0.1")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(CommandError, match="Metrics: That port is already in use"):
            call_command("runpop3", "127.0.0.1:0", "--metrics", str(busy.getsockname()[1]))
    assert not metrics.enabled
    from popserver.models import Node

    assert not Node.objects.exists()  # the node's name is given back too


def greeted(refusals: list[bytes]):
    """connect(port) for a server with one session slot per worker: a client some worker greeted (a full
    worker leaves a new connection to one with room; while none has, it is refused: counted in
    ``refusals``, and tried again)."""

    def connect(port: int) -> Client:
        deadline = time.monotonic() + 30
        while True:
            client = Client(port)
            if client.greeting.startswith(b"+OK"):
                return client
            assert client.greeting.startswith(b"-ERR [SYS/TEMP] Too many connections")
            refusals.append(client.greeting)
            client.close()
            assert time.monotonic() < deadline, "no worker had room"
            threading.Event().wait(0.02)  # sync-ok: a slot is free a moment after its session ends

    return connect


def lock_pid(mailbox) -> int:
    return Mailbox.objects.get(pk=mailbox.pk).lock_pid


def test_runpop3_metrics_add_up_over_two_workers(runpop3, alice, make_mailbox, tmp_path):
    """``--workers 2`` with one session slot each: bob's session holds one worker, so the scripted sessions
    are served by the other; the parent's /metrics gives the sums. Then a worker killed with a session open:
    its counts stay, its open session leaves the gauge."""
    bob = make_mailbox("bob", "secret")
    folder = tmp_path / "metrics"
    server = runpop3(
        "--workers",
        "2",
        "--metrics",
        "127.0.0.1:0",
        POPSERVER_MAX_SESSIONS="2",
        PROMETHEUS_MULTIPROC_DIR=str(folder),
    )
    assert server.metrics_port
    refusals: list[bytes] = []
    connect = greeted(refusals)
    holder = connect(server.port)
    holder.command("USER bob")
    assert holder.command("PASS secret").startswith(b"+OK")
    pids = [lock_pid(bob)]
    received = script_two_sessions(server.port, connect, logged_in=lambda: pids.append(lock_pid(alice)))
    assert pids[0] != pids[1] and server.proc.pid not in pids  # one session on each worker
    assert holder.command("QUIT").startswith(b"+OK")
    assert holder.closed_by_server()
    holder.close()
    received += holder.received
    samples = scrape_until(
        server.metrics_port,
        lambda s: s.total("popserver_commands_total") >= 12 and s("popserver_sessions_open") == 0,
    )
    check_scripted_sessions(samples, received, holders=1, full=len(refusals))
    # Each worker wrote its own file, and counted a session in it.
    from prometheus_client.multiprocess import MultiProcessCollector

    for pid in pids:
        merged = MultiProcessCollector.merge([str(folder / f"counter_{pid}.db")], accumulate=False)
        accepted = [
            s.value for m in merged for s in m.samples if s.name == "popserver_connections_accepted_total"
        ]
        assert sum(accepted) >= 1, pid

    # A worker killed with a session open, once its counts are flushed (the login, USER and PASS).
    before = scrape(server.metrics_port).total("popserver_commands_total")
    victim = connect(server.port)
    victim.command("USER bob")
    assert victim.command("PASS secret").startswith(b"+OK")
    worker = lock_pid(bob)
    counted = scrape_until(server.metrics_port, lambda s: s.total("popserver_commands_total") == before + 2)
    assert counted.total("popserver_commands_total") == before + 2
    assert counted("popserver_sessions_open") == 1
    os.kill(worker, signal.SIGKILL)  # a worker of the runpop3 this test started
    assert victim.closed_by_server()
    victim.close()
    after = scrape_until(server.metrics_port, lambda s: s("popserver_sessions_open") == 0)
    assert after("popserver_sessions_open") == 0
    for name in (
        "popserver_commands_total",
        "popserver_connections_accepted_total",
        "popserver_logins_total",
    ):
        assert after.total(name) == counted.total(name), name  # counts never go down
    assert after("popserver_logins_total", method="user", result="ok") == 3
    assert server.terminate() == 0
