"""A storm of logins against three servers on one PostgreSQL: the database never runs out of connections,
mail delivery and the site go on, every client gets an answer or a clean close, and the logs stay quiet."""

import re
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
from django.db import connection, connections

from tests.conftest import manage_py_command, subprocess_env

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.live,
    pytest.mark.slow,
    pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's connection count"),
]

SERVERS, WORKERS, BUDGET, CLIENTS = 3, 2, 4, 300


def answer(port: int, user: str, password: str) -> bytes:
    """What the client got: the reply to its login, or b"" for a clean close (anything else raises)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        reply = b""
        sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
        while reply.count(b"\r\n") < 3:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
            if reply.startswith(b"-ERR"):  # refused at once: no room
                break
        if reply.count(b"\r\n") >= 3:
            sock.sendall(b"QUIT\r\n")
        return reply.split(b"\r\n")[-2] if reply.count(b"\r\n") else b""


def test_a_storm_of_logins_against_three_servers_stays_within_the_budget(runpop3, make_mailbox, client):
    for n in range(30):
        make_mailbox(f"user{n}", "secret")
    from django.contrib.auth import get_user_model

    admin = get_user_model().objects.create_superuser("admin", password="x")
    env = {
        "POPSERVER_DB_CONNECTIONS": str(BUDGET),
        "POPSERVER_AUTH_FAILURE_DELAY": "0.2",
        "POPSERVER_DB_CONNECTION_WAIT": "5",
    }
    servers: list = []
    starters = [  # three nodes, each with its own name (a node name is claimed by one server at a time)
        threading.Thread(
            target=lambda n=n: servers.append(
                runpop3("--workers", str(WORKERS), POPSERVER_NODE_NAME=f"storm{n}", **env)
            )
        )
        for n in range(SERVERS)
    ]
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join(90)
    assert len(servers) == SERVERS
    database = connection.settings_dict["NAME"]
    peak, polling = [0], threading.Event()

    def count_connections() -> None:
        try:
            with connections["default"].cursor() as cursor:
                while not polling.is_set():
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", [database])
                    peak[0] = max(peak[0], cursor.fetchone()[0])
                    polling.wait(0.01)
        finally:
            connections["default"].close()

    poller = threading.Thread(target=count_connections)
    poller.start()
    replies: list[bytes] = []
    failures: list[str] = []
    start = threading.Barrier(CLIENTS + 1)

    def client_thread(n: int) -> None:
        user, password = [
            ("nobody%d" % n, "secret"),
            (f"user{n % 30}", "wrong"),
            (f"user{n % 30}", "secret"),
        ][n % 3]
        try:
            start.wait(60)
            replies.append(answer(servers[n % SERVERS].port, user, password))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=client_thread, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    start.wait(60)
    delivered = subprocess.run(
        manage_py_command("deliver", "user0"),
        input=b"Subject: during the storm\r\n\r\nhello\r\n",
        env=subprocess_env(),
        capture_output=True,
        timeout=60,
    )
    client.force_login(admin)
    page = client.get("/admin/")
    for thread in threads:
        thread.join(100)

    polling.set()
    poller.join(10)
    duration = time.monotonic() - started

    assert delivered.returncode == 0, delivered.stderr
    assert page.status_code == 200
    assert failures == []
    kinds = Counter(replies)
    # a POP3 answer, or b"": dropped to make room for a newer connection, a clean close
    assert all(reply.startswith((b"+OK", b"-ERR")) or reply == b"" for reply in replies), kinds
    assert kinds[b"+OK Logged in."] > 0 and kinds[b"-ERR [AUTH] Authentication failed."] > 0
    # The servers' budgets, and this test's own: its thread, the poller and deliver.
    assert peak[0] <= SERVERS * BUDGET + 3, peak[0]
    for server in servers:
        assert server.terminate() == 0
    for server in servers:
        log = "".join(server.stderr_lines)
        assert "Traceback" not in log and " ERROR " not in log
        # at most one line per kind of refusal and worker per 10 s (the first at once, then counts)
        lines = Counter(re.findall(r"popserver\.overload: (worker=\d+) ([^(\n]*)", log))
        assert all(count <= 2 + duration / 10 for count in lines.values()), lines
