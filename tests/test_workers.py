"""``runpop3 --workers N``: worker processes share the listeners, the lock, the throttle and the caps; the
parent replaces a dead worker, forwards SIGHUP and stops them all; SQLite's writer lock holds across them."""

import fcntl
import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
from django.db import connection

from popserver.mailin.delivery import deliver
from popserver.models import LoginEvent, Mailbox
from popserver.server.workers import describe_status, parse_workers
from tests.conftest import manage_py_command, subprocess_env
from tests.waiting import wait_for as _wait_for

pytestmark = pytest.mark.live

TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"


def first_line(sock: socket.socket) -> bytes:
    """The next line, and nothing of the one after it (replies to pipelined commands can come in one
    segment): read a byte at a time."""
    data = b""
    while not data.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        data += byte
    return data


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    return _wait_for(predicate, timeout, interval)  # subprocess workers take longer to settle


def login(sock: socket.socket, user: str, password: str = "secret") -> bytes:
    sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
    assert first_line(sock) == b"+OK\r\n"
    return first_line(sock)


def greeted_connection(server, timeout: float = 30.0) -> socket.socket:
    """A connection some worker greeted (the other refused it as full): with one slot per worker, the
    worker that has room (a slot is free a moment after its session ends: try again until then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = server.socket()
        greeting = first_line(sock)
        if greeting.startswith(b"+OK"):
            return sock
        assert greeting == TOO_MANY
        sock.close()
        threading.Event().wait(0.02)
    raise AssertionError("no worker had room")


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    deliver("alice", b"Subject: one\r\n\r\nhello\r\n")
    return mailbox


def test_parse_workers():
    assert parse_workers("3") == 3
    assert parse_workers("auto") >= 1
    with pytest.raises(ValueError):
        parse_workers("0")
    assert describe_status(9) == "was killed by SIGKILL"
    assert describe_status(3 << 8) == "exited with status 3"


def test_two_workers_share_the_lock_and_split_the_caps(runpop3, alice, make_mailbox):
    """POPSERVER_MAX_SESSIONS=2 with two workers: one session each, and the lock holds across them."""
    make_mailbox("bob", "secret")
    server = runpop3("--workers", "2", POPSERVER_MAX_SESSIONS="2")
    holder = greeted_connection(server)
    assert login(holder, "alice") == b"+OK Logged in.\r\n"  # this worker is now full
    other = greeted_connection(server)  # so this one is the other worker's
    assert login(other, "alice") == b"-ERR [IN-USE] Mailbox is locked by another POP3 session.\r\n"
    other.close()
    third = greeted_connection(server)  # the other worker again: its slot is free once "other" ended
    assert login(third, "bob") == b"+OK Logged in.\r\n"
    for _ in range(10):  # both workers are full now: two sessions for the whole server
        refused = server.socket()
        assert first_line(refused) == TOO_MANY
        refused.close()
    holder.sendall(b"QUIT\r\n")
    assert first_line(holder) == b"+OK Logging out.\r\n"
    assert server.terminate() == 0
    served = "".join(server.stderr_lines)
    assert "worker=1 " in served and "worker=2 " in served


def test_parallel_guesses_across_workers_check_exactly_the_limit(runpop3, alice):
    """40 guesses at once through two workers: exactly THROTTLE_ACCOUNT_FAILURES passwords are checked."""
    server = runpop3("--workers", "2", POPSERVER_THROTTLE_ACCOUNT_FAILURES="5", POPSERVER_MAX_SESSIONS="200")
    replies: list[bytes] = []
    start = threading.Barrier(40)

    def guess() -> None:
        try:
            with server.socket(timeout=60) as sock:
                first_line(sock)
                start.wait(60)
                sock.sendall(b"USER alice\r\nPASS wrong\r\n")
                first_line(sock)
                replies.append(first_line(sock))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            replies.append(repr(exc).encode())

    threads = [threading.Thread(target=guess) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert sorted(set(replies)) == [
        b"-ERR [AUTH] Authentication failed.\r\n",
        b"-ERR [SYS/TEMP] Too many failed login attempts, try again later.\r\n",
    ]
    assert replies.count(b"-ERR [AUTH] Authentication failed.\r\n") == 5
    assert LoginEvent.objects.filter(outcome=LoginEvent.FAILED).count() == 5
    assert LoginEvent.objects.filter(outcome=LoginEvent.LOCKED_OUT).count() == 35


def test_a_killed_worker_is_replaced_and_its_locks_freed(runpop3, alice):
    server = runpop3("--workers", "2")
    holder = server.socket()
    first_line(holder)
    assert login(holder, "alice") == b"+OK Logged in.\r\n"
    holder.sendall(b"DELE 1\r\n")
    assert first_line(holder) == b"+OK Marked to be deleted.\r\n"
    worker_pid = Mailbox.objects.get(pk=alice.pk).lock_pid
    assert worker_pid not in (None, server.proc.pid)
    os.kill(worker_pid, signal.SIGKILL)  # a worker of the runpop3 this test started
    assert holder.recv(100) == b""  # its sessions end with it
    holder.close()
    wait_for(lambda: any(f"(pid {worker_pid}) was killed by SIGKILL" in line for line in server.stderr_lines))
    wait_for(lambda: not Mailbox.objects.get(pk=alice.pk).lock_token)  # the replacement freed it
    client = server.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == 1  # the killed session's DELE was never committed
    client.quit()
    wait_for(lambda: sum("started (pid" in line for line in server.stderr_lines) == 3)
    assert server.terminate() == 0


def test_sigterm_tells_sessions_and_stops_every_worker(runpop3, alice):
    server = runpop3("--workers", "2")
    idle = server.socket()
    first_line(idle)
    logged_in = server.socket()
    first_line(logged_in)
    assert login(logged_in, "alice") == b"+OK Logged in.\r\n"
    logged_in.sendall(b"DELE 1\r\n")
    assert first_line(logged_in) == b"+OK Marked to be deleted.\r\n"
    started = time.monotonic()
    assert server.terminate() == 0
    assert time.monotonic() - started < 10
    for sock in (idle, logged_in):
        assert first_line(sock) == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
        assert sock.recv(10) == b""
    alice.refresh_from_db()
    assert not alice.lock_token and alice.messages.count() == 1
    stopped = [line for line in server.stderr_lines if ") stopped" in line]
    assert len(stopped) == 2


def test_sighup_reloads_the_certificate_in_every_worker(runpop3, alice, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    certfile, keyfile, cafile = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"

    def issue() -> None:
        cert = ca.issue_cert("127.0.0.1")
        cert.cert_chain_pems[0].write_to_path(str(certfile))
        cert.private_key_pem.write_to_path(str(keyfile))

    issue()
    ca.cert_pem.write_to_path(str(cafile))
    server = runpop3(
        "--workers", "2", "--certfile", str(certfile), "--keyfile", str(keyfile), "--tls-port", "0"
    )
    context = ssl.create_default_context(cafile=str(cafile))

    def served_certificate() -> bytes:
        with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                return sock.getpeercert(binary_form=True)

    before = served_certificate()
    issue()
    server.proc.send_signal(signal.SIGHUP)
    for number in (1, 2):
        wait_for(
            lambda n=number: any(
                f"worker={n} TLS certificate reloaded" in line for line in server.stderr_lines
            )
        )
    assert all(served_certificate() != before for _ in range(10))
    assert server.terminate() == 0


@pytest.mark.skipif(connection.vendor != "sqlite", reason="SQLite's writer lock")
def test_the_sqlite_writer_lock_holds_across_processes(transactional_db):
    """While one process writes, another's writer waits: the lock file beside the database is locked."""
    from popserver.storage.writelock import one_writer

    writer = one_writer()
    holder = subprocess.Popen(
        manage_py_command(
            "shell",
            "--no-imports",
            "-c",
            "import sys; from popserver.storage.writelock import one_writer\n"
            "with one_writer():\n    print('holding', flush=True); sys.stdin.readline()",
        ),
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "holding" in holder.stdout.readline()
        fd = os.open(writer.path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(30) == 0
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once it let go
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


@pytest.mark.parametrize("command", ["runpop3", "runlmtp"])
def test_more_workers_than_connections_are_refused(transactional_db, command):
    result = subprocess.run(
        manage_py_command(command, "127.0.0.1:0", "--workers", "3"),
        env=subprocess_env(POPSERVER_DB_CONNECTIONS="2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "POPSERVER_DB_CONNECTIONS (2)" in result.stderr and "Traceback" not in result.stderr
