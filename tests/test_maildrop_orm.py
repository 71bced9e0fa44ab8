"""The ORM maildrop: the lock, the snapshot, streaming reads and UPDATE, on the real database."""

import os
import re
import subprocess
import sys
from datetime import timedelta

import pytest
from django.db import DatabaseError, connection
from django.test import override_settings
from django.utils import timezone

from popserver.storage.bodies import get_body_store
from popserver.exceptions import CommitFailed, MailboxInUse, MessageExpunged
from popserver.storage.lock import (
    lock_is_stale,
    refresh_heartbeats,
    release_all_live_locks,
    release_dead_locks,
    TransactionLost,
    this_process,
)
from popserver.storage.maildrop import open_maildrop
from popserver.models import Mailbox, Message, MessageChunk
from tests.conftest import bodies_held, database_store_only, failing_insert_losing_its_savepoint

# The maildrop and delivery suites run against both body stores (issue 21).
pytestmark = pytest.mark.usefixtures("body_store")


def store(mailbox, data: bytes, uid: str) -> Message:
    message = Message.objects.create(mailbox=mailbox, uid=uid, size=len(data))
    get_body_store().save(message, data)
    return message


@pytest.fixture
def mailbox(make_mailbox):
    mailbox = make_mailbox("alice")
    for n in range(1, 4):
        store(mailbox, f"Subject: {n}\r\n\r\n{'x' * n}\r\n".encode(), f"UID{n}")
    return mailbox


def reload(mailbox) -> Mailbox:
    return Mailbox.objects.get(pk=mailbox.pk)


def test_open_takes_the_lock_and_the_snapshot(mailbox):
    maildrop = open_maildrop(mailbox.pk, "127.0.0.1:1234")
    try:
        locked = reload(mailbox)
        assert locked.lock_token == maildrop.token
        assert locked.lock_peer == "127.0.0.1:1234"
        assert locked.lock_pid == os.getpid() and locked.lock_host == this_process().host
        assert locked.last_login is not None and locked.lock_heartbeat is not None
        assert [m.uid for m in maildrop.messages] == ["UID1", "UID2", "UID3"]
        assert [m.size for m in maildrop.messages] == [
            Message.objects.get(uid=f"UID{n}").size for n in (1, 2, 3)
        ]
        with pytest.raises(MailboxInUse):
            open_maildrop(mailbox.pk)
    finally:
        maildrop.release()
    assert not reload(mailbox).lock_token


def test_snapshot_is_one_query_reading_no_bodies(mailbox, django_assert_max_num_queries):
    with django_assert_max_num_queries(5) as captured:  # lock row, conditional update, snapshot, savepoints
        maildrop = open_maildrop(mailbox.pk)
    sql = [q["sql"] for q in captured.captured_queries]
    assert sum(re.search(r"FROM [`\"]popserver_message[`\"]", q) is not None for q in sql) == 1
    assert not any("popserver_messagechunk" in q for q in sql)
    maildrop.release()


def test_read_streams_chunks_and_reports_expunged(mailbox, settings, body_store):
    settings.POPSERVER_BODY_CHUNK_SIZE = 7
    big = store(mailbox, b"0123456789" * 10, "BIG")
    maildrop = open_maildrop(mailbox.pk)
    chunks = list(maildrop.read(4))
    assert b"".join(chunks) == b"0123456789" * 10
    assert max(map(len, chunks)) == 7 if body_store == "database" else len(chunks) == 1  # a whole object
    big.delete()
    with pytest.raises(MessageExpunged):
        next(maildrop.read(4))
    maildrop.release()


@database_store_only
def test_small_message_costs_one_query(mailbox, django_assert_num_queries):
    maildrop = open_maildrop(mailbox.pk)
    with django_assert_num_queries(1):
        assert list(maildrop.read(1)) == [b"Subject: 1\r\n\r\nx\r\n"]
    maildrop.release()


def test_commit_deletes_marked_messages_and_releases(mailbox):
    maildrop = open_maildrop(mailbox.pk)
    maildrop.mark_deleted(1)
    maildrop.mark_deleted(3)
    maildrop.commit()
    assert list(Message.objects.filter(mailbox=mailbox).values_list("uid", flat=True)) == ["UID2"]
    assert bodies_held(mailbox) == 1
    assert not reload(mailbox).lock_token


def swallowing_a_lost_transaction():
    """Catches the error of a write whose savepoint could not be rolled back (the transaction is lost, as
    after a deadlock), as careless code inside a transaction might."""
    from django.db import transaction

    try:
        with transaction.atomic():
            failing_insert_losing_its_savepoint(None)
    except DatabaseError:
        pass


def test_a_lock_whose_transaction_is_lost_inside_it_is_not_taken(mailbox):
    """Leaving atomic() would roll the lock back without raising: two sessions could hold one mailbox."""
    with pytest.raises(TransactionLost):
        open_maildrop(mailbox.pk, mailbox=reload(mailbox), in_lock_transaction=swallowing_a_lost_transaction)
    assert not reload(mailbox).lock_token
    open_maildrop(mailbox.pk).release()


def test_a_quit_whose_transaction_is_lost_inside_it_fails_and_deletes_nothing(mailbox):
    """``at_commit`` swallows an error whose savepoint could not be rolled back (the transaction is lost, as
    after a deadlock): leaving atomic() would roll QUIT back without raising, so commit() raises itself."""
    from popserver.signals import messages_deleted

    announced = []

    def on_deleted(sender=None, **kwargs):
        announced.append(kwargs["count"])

    maildrop = open_maildrop(mailbox.pk)
    maildrop.mark_deleted(1)
    maildrop.at_commit = swallowing_a_lost_transaction
    messages_deleted.connect(on_deleted)
    try:
        with pytest.raises(TransactionLost):
            maildrop.commit()
    finally:
        messages_deleted.disconnect(on_deleted)
    assert Message.objects.filter(mailbox=mailbox).count() == 3 and announced == []
    assert reload(mailbox).lock_token == maildrop.lock.token  # still ours: the session's end releases it
    maildrop.release()
    assert not reload(mailbox).lock_token


def test_release_deletes_nothing(mailbox):
    maildrop = open_maildrop(mailbox.pk)
    maildrop.mark_deleted(1)
    maildrop.release()
    maildrop.release()  # idempotent
    assert Message.objects.filter(mailbox=mailbox).count() == 3


def test_commit_after_losing_the_lock_deletes_nothing(mailbox):
    maildrop = open_maildrop(mailbox.pk)
    maildrop.mark_deleted(1)
    Mailbox.objects.filter(pk=mailbox.pk).update(lock_token="someone-else")
    with pytest.raises(CommitFailed):
        maildrop.commit()
    assert Message.objects.filter(mailbox=mailbox).count() == 3
    maildrop.release()  # what the session does next: touches nobody else's lock
    assert reload(mailbox).lock_token == "someone-else"


def test_commit_is_all_or_nothing(mailbox, monkeypatch):
    maildrop = open_maildrop(mailbox.pk)
    for n in (1, 2, 3):
        maildrop.mark_deleted(n)
    from popserver.storage import deletion as module

    monkeypatch.setattr(module, "BATCH_SIZE", 1)
    calls = []
    original = module.Message.objects.filter

    def failing_filter(*args, **kwargs):
        if "id__in" in kwargs:
            calls.append(kwargs)
            if len(calls) == 2:
                raise RuntimeError("storage failure in the middle of UPDATE")
        return original(*args, **kwargs)

    monkeypatch.setattr(module.Message.objects, "filter", failing_filter)
    with pytest.raises(RuntimeError):
        maildrop.commit()
    monkeypatch.undo()
    assert Message.objects.filter(mailbox=mailbox).count() == 3
    assert bodies_held(mailbox) == 3
    assert reload(mailbox).lock_token == maildrop.token  # still held: the session may retry or drop
    maildrop.release()


def test_many_deletions_in_batches(make_mailbox):
    mailbox = make_mailbox("bulk")
    Message.objects.bulk_create(Message(mailbox=mailbox, uid=f"U{n}", size=1) for n in range(2500))
    maildrop = open_maildrop(mailbox.pk)
    for n in range(1, 2501):
        maildrop.mark_deleted(n)
    maildrop.commit()
    assert not Message.objects.filter(mailbox=mailbox).exists()


def test_stale_heartbeat_frees_a_lock_held_elsewhere(mailbox):
    Mailbox.objects.filter(pk=mailbox.pk).update(
        lock_token="abc", lock_host="other-host", lock_pid=1, lock_instance="x", lock_heartbeat=timezone.now()
    )
    with pytest.raises(MailboxInUse):
        open_maildrop(mailbox.pk)
    with override_settings(POPSERVER_LOCK_STALE_AFTER=60):
        Mailbox.objects.filter(pk=mailbox.pk).update(lock_heartbeat=timezone.now() - timedelta(seconds=61))
        maildrop = open_maildrop(mailbox.pk)
    maildrop.release()


def test_lock_of_a_dead_process_on_this_host_is_free_at_once(mailbox):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    Mailbox.objects.filter(pk=mailbox.pk).update(
        lock_token="abc",
        lock_host=this_process().host,
        lock_pid=dead_pid,
        lock_instance="dead",
        lock_heartbeat=timezone.now(),
    )
    assert lock_is_stale(reload(mailbox))
    assert release_dead_locks() == 1
    assert not reload(mailbox).lock_token


def test_lock_of_a_live_process_on_this_host_is_kept(mailbox):
    Mailbox.objects.filter(pk=mailbox.pk).update(
        lock_token="abc",
        lock_host=this_process().host,
        lock_pid=os.getppid(),
        lock_instance="parent",
        lock_heartbeat=timezone.now(),
    )
    assert not lock_is_stale(reload(mailbox))
    assert release_dead_locks() == 0


def test_heartbeat_and_release_all(mailbox):
    maildrop = open_maildrop(mailbox.pk)
    old = timezone.now() - timedelta(minutes=5)
    Mailbox.objects.filter(pk=mailbox.pk).update(lock_heartbeat=old)
    assert refresh_heartbeats() == 1
    assert reload(mailbox).lock_heartbeat > old
    assert release_all_live_locks() == 1
    assert not reload(mailbox).lock_token
    assert maildrop.released


@pytest.mark.skipif(connection.vendor == "sqlite", reason="row locks: PostgreSQL and MariaDB only")
def test_select_for_update_needs_no_outer_transaction(mailbox):
    # PostgreSQL raises if select_for_update runs outside atomic(); open_maildrop must bring its own.
    maildrop = open_maildrop(mailbox.pk)
    assert reload(mailbox).lock_token == maildrop.token
    maildrop.mark_deleted(2)
    maildrop.commit()
    assert not reload(mailbox).lock_token
    assert sorted(Message.objects.filter(mailbox=mailbox).values_list("uid", flat=True)) == ["UID1", "UID3"]


def test_unique_ids_compare_as_bytes_on_every_database(make_mailbox):
    mailbox = make_mailbox("case")
    Message.objects.create(mailbox=mailbox, uid="abc", size=1)
    Message.objects.create(mailbox=mailbox, uid="ABC", size=1)  # a different id, not a duplicate
    assert Message.objects.filter(mailbox=mailbox, uid="abc").count() == 1


def test_a_lock_being_taken_is_never_taken_over_by_the_same_process(mailbox, monkeypatch):
    from popserver.storage import lock as module

    seen = []
    original_take = module.MailboxLock._take

    def take_and_race(self, *args, **kwargs):
        result = original_take(self, *args, **kwargs)
        # Another session of this process tries the same mailbox after the row says locked, before the
        # lock is registered as live.
        if not seen:
            seen.append(True)
            with pytest.raises(MailboxInUse):
                open_maildrop(mailbox.pk)
        return result

    monkeypatch.setattr(module.MailboxLock, "_take", take_and_race)
    first = open_maildrop(mailbox.pk)
    assert seen and reload(mailbox).lock_token == first.token
    first.release()


def test_a_failed_release_still_frees_the_lock_for_this_process(mailbox, monkeypatch):
    from popserver.storage import lock as module

    maildrop = open_maildrop(mailbox.pk)

    def broken(*values):
        raise DatabaseError("database is locked")

    monkeypatch.setattr(module._FREE_OURS, "execute", broken)  # the UPDATE that frees the lock
    with pytest.raises(DatabaseError):
        maildrop.release()
    monkeypatch.undo()
    assert reload(mailbox).lock_token == maildrop.token  # the row still says locked...
    assert lock_is_stale(reload(mailbox))  # ...but this process knows it is gone
    open_maildrop(mailbox.pk).release()


def test_a_failing_deleted_signal_does_not_undo_a_committed_quit(mailbox):
    from popserver.signals import messages_deleted

    def broken(**kwargs):
        raise RuntimeError("receiver bug")

    messages_deleted.connect(broken)
    try:
        maildrop = open_maildrop(mailbox.pk)
        maildrop.mark_deleted(1)
        maildrop.commit()
    finally:
        messages_deleted.disconnect(broken)
    assert Message.objects.filter(mailbox=mailbox).count() == 2


# The read path (issue 15): plain indexed queries, the count from the snapshot, read-ahead ----------------
def session_on(maildrop):
    from popserver.protocol.session import Pop3Session

    session = Pop3Session(lambda username, password, *, mechanism: maildrop)
    assert b"".join(session.receive(b"USER alice\r\nPASS x\r\n")).endswith(b"+OK Logged in.\r\n")
    return session


def multiline(body: bytes) -> bytes:
    from popserver.protocol.wire import stuff_message

    return f"+OK {len(body)} octets\r\n".encode() + stuff_message(body)


@database_store_only
def test_a_chunk_is_one_plain_indexed_query(mailbox, settings, django_assert_num_queries):
    settings.POPSERVER_BODY_CHUNK_SIZE = 7
    store(mailbox, b"0123456789" * 10, "BIG")
    maildrop = open_maildrop(mailbox.pk)
    with django_assert_num_queries(15) as captured:  # ceil(100 / 7): the count came with the snapshot
        assert b"".join(maildrop.read(4)) == b"0123456789" * 10
    for query in captured.captured_queries:
        sql = query["sql"].upper()
        assert "EXISTS" not in sql and "ORDER BY" not in sql and "JOIN" not in sql and "LIMIT" not in sql
    maildrop.release()


@database_store_only
def test_the_snapshot_knows_each_chunk_count(mailbox, settings):
    settings.POPSERVER_BODY_CHUNK_SIZE = 7
    store(mailbox, b"0123456789" * 10, "BIG")
    assert Message.objects.get(uid="BIG").chunk_count == 15
    maildrop = open_maildrop(mailbox.pk)
    assert [maildrop.ref(n).chunk_count for n in (1, 2, 3, 4)] == [1, 1, 1, 15]
    maildrop.release()


@database_store_only
def test_a_body_stored_without_a_count_is_still_read(mailbox):
    # Rows written by other code (a site's own import, an older version during an upgrade) have no count.
    message = Message.objects.create(mailbox=mailbox, uid="RAW", size=6)
    MessageChunk.objects.bulk_create(
        [MessageChunk(message=message, seq=0, data=b"abc"), MessageChunk(message=message, seq=1, data=b"def")]
    )
    maildrop = open_maildrop(mailbox.pk)
    assert list(maildrop.read(4)) == [b"abc", b"def"]
    message.delete()
    with pytest.raises(MessageExpunged):
        next(maildrop.read(4))
    maildrop.release()


@database_store_only
def test_the_migration_counts_the_chunks_of_existing_messages(mailbox, settings):
    import importlib

    from django.apps import apps

    settings.POPSERVER_BODY_CHUNK_SIZE = 7
    store(mailbox, b"0123456789" * 10, "BIG")
    Message.objects.create(mailbox=mailbox, uid="NONE", size=0)
    Message.objects.update(chunk_count=0)
    migration = importlib.import_module("popserver.migrations.0009_message_chunk_count")

    class Editor:
        connection = connection

    migration.count_chunks(apps, Editor())
    counts = dict(Message.objects.values_list("uid", "chunk_count"))
    assert counts == {"UID1": 1, "UID2": 1, "UID3": 1, "BIG": 15, "NONE": 0}


@database_store_only
def test_pipelined_small_bodies_are_read_in_one_query(mailbox, django_assert_num_queries):
    maildrop = open_maildrop(mailbox.pk)
    session = session_on(maildrop)
    with django_assert_num_queries(1):
        out = b"".join(session.receive(b"RETR 1\r\nRETR 3\r\nTOP 2 0\r\n"))
    bodies = [f"Subject: {n}\r\n\r\n{'x' * n}\r\n".encode() for n in (1, 2, 3)]
    assert out == multiline(bodies[0]) + multiline(bodies[2]) + b"+OK\r\nSubject: 2\r\n\r\n.\r\n"
    maildrop.release()


@database_store_only
def test_read_ahead_is_bounded_in_messages_and_octets(make_mailbox, monkeypatch, django_assert_num_queries):
    from popserver.storage import maildrop as module

    mailbox = make_mailbox("many")
    body = b"Subject: s\r\n\r\n" + b"y" * 986 + b"\r\n"  # 1,002 octets
    for n in range(1, 101):
        store(mailbox, body, f"U{n}")
    maildrop = open_maildrop(mailbox.pk)
    session = session_on(maildrop)
    commands = b"".join(b"RETR %d\r\n" % n for n in range(1, 101))
    with django_assert_num_queries(2):  # 64 + 36
        assert b"".join(session.receive(commands)) == multiline(body) * 100
    monkeypatch.setattr(module, "PREFETCH_OCTETS", 10 * 1002)
    with django_assert_num_queries(10):  # ten at a time
        assert b"".join(session.receive(commands)) == multiline(body) * 100
    assert not maildrop._prefetched  # nothing kept once read
    maildrop.release()


def test_a_message_expunged_before_the_read_ahead_gets_its_error(mailbox):
    maildrop = open_maildrop(mailbox.pk)
    session = session_on(maildrop)
    Message.objects.filter(uid="UID2").delete()
    out = b"".join(session.receive(b"RETR 1\r\nRETR 2\r\nRETR 3\r\n"))
    assert out == (
        multiline(b"Subject: 1\r\n\r\nx\r\n")
        + b"-ERR Message 2 expunged.\r\n"
        + multiline(b"Subject: 3\r\n\r\nxxx\r\n")
    )
    maildrop.release()


@database_store_only
def test_large_messages_are_streamed_not_read_ahead(mailbox, settings, django_assert_num_queries):
    from popserver.storage.maildrop import SMALL_MESSAGE

    settings.POPSERVER_BODY_CHUNK_SIZE = SMALL_MESSAGE
    big = b"Subject: big\r\n\r\n" + b"z" * SMALL_MESSAGE + b"\r\n"
    store(mailbox, big, "BIG")
    maildrop = open_maildrop(mailbox.pk)
    session = session_on(maildrop)
    with django_assert_num_queries(1 + 2):  # the read-ahead of 1 and 3, then the big one's two chunks
        out = b"".join(session.receive(b"RETR 1\r\nRETR 4\r\nRETR 3\r\n"))
    assert out == multiline(b"Subject: 1\r\n\r\nx\r\n") + multiline(big) + multiline(
        b"Subject: 3\r\n\r\nxxx\r\n"
    )
    maildrop.release()


@pytest.mark.django_db(transaction=True)
@database_store_only
def test_reads_outside_a_transaction_use_the_drivers_cursor_and_survive_a_reconnect(make_mailbox, settings):
    from django.db import connections

    from popserver.storage import bodies

    settings.POPSERVER_BODY_CHUNK_SIZE = 1000
    mailbox = make_mailbox("fast")
    data = bytes(range(256)) * 20  # every octet value, in six chunks
    message = store(mailbox, data, "FAST")
    maildrop = open_maildrop(mailbox.pk)
    assert not connection.in_atomic_block and not connection.queries_logged
    assert b"".join(maildrop.read(1)) == data
    kept = bodies._cursors.default
    assert kept[0] is connection.connection  # the driver's cursor, kept for the next read
    connections.close_all()  # what an idle session does
    assert b"".join(maildrop.read(1)) == data
    assert bodies._cursors.default[0] is connection.connection is not kept[0]
    assert maildrop.prefetch([1, 1]) == 2 and maildrop._prefetched == {}  # one message: nothing to batch
    message.delete()
    with pytest.raises(MessageExpunged):
        next(maildrop.read(1))
    maildrop.release()
