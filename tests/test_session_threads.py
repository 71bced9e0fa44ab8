"""Session threads kept for the next connection (``server/threads.py``)."""

import poplib
import threading

import pytest
from django.db import connection
from django.db.backends.signals import connection_created

from popserver.server.threads import SessionThreads
from tests.waiting import wait_for


def run_job(threads: SessionThreads, job=None) -> threading.Thread:
    """Start one job and return the thread that ran it, once it is done."""
    done = threading.Event()
    ran_in = []

    def target():
        ran_in.append(threading.current_thread())
        try:
            if job is not None:
                job()
        finally:
            done.set()

    threads.start(target, name="test session")
    assert done.wait(10)
    return ran_in[0]


def test_a_thread_whose_session_ended_serves_the_next_one():
    threads = SessionThreads(keep=4)
    first = run_job(threads)
    wait_for(lambda: threads.idle == 1)
    assert run_job(threads) == first
    threads.close()
    wait_for(lambda: threads.idle == 0)


def test_no_more_threads_wait_than_kept():
    threads = SessionThreads(keep=0)
    first = run_job(threads)
    wait_for(lambda: not first.is_alive())  # it ended with its job
    assert run_job(threads) is not first
    assert threads.idle == 0


def test_a_waiting_thread_ends_after_its_idle_time():
    threads = SessionThreads(keep=4, idle_seconds=0.05)
    thread = run_job(threads)
    wait_for(lambda: not thread.is_alive())
    assert threads.idle == 0


def test_closing_ends_waiting_threads_and_stops_reuse():
    threads = SessionThreads(keep=4)
    first = run_job(threads)
    wait_for(lambda: threads.idle == 1)
    threads.close()
    wait_for(lambda: not first.is_alive())
    second = run_job(threads)
    assert second is not first
    wait_for(lambda: not second.is_alive())  # it ends with its job
    assert threads.idle == 0


def test_a_job_that_raises_does_not_end_the_thread(caplog):
    threads = SessionThreads(keep=4)

    def broken():
        raise RuntimeError("a bug")

    first = run_job(threads, job=broken)
    wait_for(lambda: threads.idle == 1)
    assert run_job(threads) == first
    assert "unexpected error in a session thread" in caplog.text
    threads.close()


@pytest.mark.django_db(transaction=True)
def test_sessions_one_after_another_share_a_database_connection_on_sqlite(pop3_server, make_mailbox):
    """A kept thread keeps its SQLite connection (opening one costs about 1 ms of CPU); elsewhere every
    session gives its connection back to the budget (storage/gate.py)."""
    make_mailbox("alice", "pw")
    opened = []

    def count(sender, connection, **kwargs):
        if threading.current_thread().name.startswith("pop3 "):
            opened.append(connection.alias)

    connection_created.connect(count)
    try:
        for _ in range(3):
            client = poplib.POP3(pop3_server.host, pop3_server.port, timeout=10)
            client.user("alice")
            client.pass_("pw")
            client.stat()
            client.quit()
            client.close()
            wait_for(lambda: len(pop3_server.server.registry) == 0)
    finally:
        connection_created.disconnect(count)
    if connection.vendor == "sqlite":
        assert len(opened) == 1
    else:
        assert len(opened) == 3
