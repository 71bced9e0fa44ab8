"""A clean login and a plain QUIT in one statement on PostgreSQL (``storage.compiled.at_once``:
``MailboxLock.take_at_once``, ``free_at_once``; the throttle's look-up and reservation,
``DatabaseThrottle.check_and_reserve``) beside the long way: the same rows, the same refusals, and the
long way whenever the statement cannot be used or fails.

The login- and QUIT-level tests run on every database (elsewhere everything takes the long way); those that
look at the statement itself need PostgreSQL. All need autocommit (the statement is its own transaction),
hence ``transactional_db``."""

import logging
from datetime import timedelta

import pytest
from django.db import DatabaseError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from popserver import overload
from popserver.exceptions import CommitFailed, MailboxInUse
from popserver.logins import audit
from popserver.logins.authenticator import DjangoAuthenticator
from popserver.logins.throttle import DatabaseThrottle, Reservation
from popserver.mailin.delivery import deliver
from popserver.models import LoginEvent, LoginThrottle, Mailbox, Message, SessionRecord
from popserver.storage.compiled import Statement, at_once
from popserver.storage.lock import LockWrites, _FREE_OURS, _TAKE_FREE, lock_is_stale
from popserver.storage.maildrop import _SNAPSHOT, _SNAPSHOT_ORDER
from tests.waiting import wait_for

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the one-statement login is PostgreSQL's"
)
PEER_IP = "198.51.100.7"


@pytest.fixture
def alice(transactional_db, make_mailbox):
    mailbox = make_mailbox("alice")
    for n in (5, 9, 1, 4):
        deliver("alice", f"Subject: {n}\r\n\r\n{'x' * n}\r\n".encode())
    ids = list(Message.objects.filter(mailbox=mailbox).order_by("id").values_list("id", flat=True))
    # A message deleted under a keep-deleted policy is not in the listing.
    Message.objects.filter(pk=ids[0]).update(deleted_at=timezone.now())
    # Rewritten: its row now lies after the others (PostgreSQL's heap), so only an ORDER BY numbers it second.
    Message.objects.filter(pk=ids[1]).update(first_retrieved_at=None)
    return mailbox


@pytest.fixture
def fresh_summary(monkeypatch):
    """The summary log as a new process has it: a line of a kind logged earlier in the run is not held back."""
    monkeypatch.setattr(overload, "summary", overload.SummaryLog())


def login(username="alice", password="secret"):
    return DjangoAuthenticator(PEER_IP, 4000)(username, password)


class SessionRecordAtQuit(LockWrites):
    """What the server's ``RecordAtQuit`` does, without a server."""

    def __init__(self, mailbox):
        self.values = {
            "mailbox": mailbox,
            "username": "alice",
            "peer_ip": PEER_IP,
            "started_at": mailbox.last_login,
            "duration": 0.5,
            "end_reason": "Logged out",
            "stats": type(
                "Stats", (), dict.fromkeys(("retr_count", "retr_bytes", "deleted_count", "deleted_bytes"), 0)
            ),
        }
        self.ways = []

    def __call__(self):
        self.ways.append("long")
        audit.record_session(audit.session_record(**self.values))

    def statements(self):
        return [audit.session_record_statement(audit.session_record(**self.values))]

    def written_at_once(self):
        self.ways.append("at once")


def visible_listing(mailbox) -> list[tuple[int, str]]:
    return list(Message.objects.visible().filter(mailbox=mailbox).order_by("id").values_list("size", "uid"))


def test_a_clean_login_writes_what_the_long_way_writes(alice):
    maildrop = login()
    assert [(m.size, m.uid) for m in maildrop.messages] == visible_listing(alice)
    assert len(maildrop.messages) == 3
    mailbox = Mailbox.objects.get(pk=alice.pk)
    assert mailbox.lock_token == maildrop.token and mailbox.last_login is not None
    assert not lock_is_stale(mailbox)  # this process's live lock
    event = LoginEvent.objects.get()
    assert (event.outcome, event.username, event.peer_ip, event.mechanism, event.mailbox_id) == (
        LoginEvent.SUCCESS,
        "alice",
        PEER_IP,
        "USER",
        alice.pk,
    )
    assert not LoginThrottle.objects.exists()  # the reservation given back
    maildrop.release()
    assert Mailbox.objects.get(pk=alice.pk).lock_token == ""
    if connection.vendor == "postgresql":  # prepared, as in service (a query log would turn that off)
        assert any("popserver_changed" in sql for sql in prepared_statements())


def prepared_statements() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


@postgresql_only
def test_the_lock_the_snapshot_and_the_logins_writes_are_one_statement(alice):
    with CaptureQueriesContext(connection) as queries:
        login().release()
    sqls = [query["sql"] for query in queries.captured_queries]
    at_once_sql = [sql for sql in sqls if "popserver_changed" in sql]
    assert len(at_once_sql) == 1, sqls  # the login's (the release is a plain UPDATE)
    others = [sql for sql in sqls if "popserver_changed" not in sql]
    assert not any("SAVEPOINT" in sql or "popserver_loginevent" in sql for sql in others), others
    assert LoginEvent.objects.get().outcome == LoginEvent.SUCCESS


def test_a_held_lock_writes_nothing_at_once_and_is_in_use(alice):
    first = login()
    with pytest.raises(MailboxInUse):
        login()
    assert list(LoginEvent.objects.order_by("id").values_list("outcome", flat=True)) == [
        LoginEvent.SUCCESS,
        LoginEvent.IN_USE,
    ]
    assert not LoginThrottle.objects.exists()
    assert Mailbox.objects.get(pk=alice.pk).lock_token == first.token
    first.release()


def test_a_lock_left_by_a_dead_process_is_taken_the_long_way(alice, caplog):
    Mailbox.objects.filter(pk=alice.pk).update(lock_token="dead", lock_host="elsewhere", lock_heartbeat=None)
    with caplog.at_level(logging.WARNING, logger="popserver.storage"):
        maildrop = login()
    assert "took over the stale lock" in caplog.text
    assert len(maildrop.messages) == 3 and LoginEvent.objects.get().outcome == LoginEvent.SUCCESS
    maildrop.release()


@postgresql_only
def test_a_statement_that_fails_is_undone_whole_and_the_long_way_logs_in(alice, caplog, fresh_summary):
    """The audit row cannot be written (a site's constraint): the one statement fails and leaves nothing; the
    long way takes the lock and logs the audit row's failure, as it always did."""
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE popserver_loginevent ADD CONSTRAINT test_no_alice CHECK (username <> 'alice')"
        )
    try:
        with caplog.at_level(logging.WARNING):
            maildrop = login()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE popserver_loginevent DROP CONSTRAINT test_no_alice")
    assert "recording a login event failed" in caplog.text
    assert Mailbox.objects.get(pk=alice.pk).lock_token == maildrop.token
    assert not LoginEvent.objects.exists() and not LoginThrottle.objects.exists()
    assert len(maildrop.messages) == 3
    assert "login: the one statement failed" in caplog.text  # tried first, then the long way
    maildrop.release()


@postgresql_only
def test_inside_a_transaction_the_long_way(alice):
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries:
            maildrop = login()
    assert not any("popserver_changed" in query["sql"] for query in queries.captured_queries)
    assert Mailbox.objects.get(pk=alice.pk).lock_token == maildrop.token
    maildrop.release()


def test_a_plain_quit_frees_the_lock_and_writes_the_record(alice):
    maildrop = login()
    maildrop.at_commit = record = SessionRecordAtQuit(Mailbox.objects.get(pk=alice.pk))
    maildrop.commit()
    assert record.ways == (["at once"] if connection.vendor == "postgresql" else ["long"])
    assert Mailbox.objects.get(pk=alice.pk).lock_token == "" and maildrop.released
    saved = SessionRecord.objects.get()
    assert (saved.username, saved.end_reason, saved.peer_ip, saved.mailbox_id) == (
        "alice",
        "Logged out",
        PEER_IP,
        alice.pk,
    )
    assert Message.objects.visible().filter(mailbox=alice).count() == 3


@postgresql_only
def test_a_plain_quit_is_one_statement(alice):
    maildrop = login()
    maildrop.at_commit = SessionRecordAtQuit(Mailbox.objects.get(pk=alice.pk))
    with CaptureQueriesContext(connection) as queries:
        maildrop.commit()
    assert len(queries.captured_queries) == 1, queries.captured_queries
    assert SessionRecord.objects.count() == 1


def test_a_quit_whose_lock_was_lost_writes_nothing(alice):
    maildrop = login()
    maildrop.at_commit = record = SessionRecordAtQuit(Mailbox.objects.get(pk=alice.pk))
    Mailbox.objects.filter(pk=alice.pk).update(lock_token="someone-else")
    with pytest.raises(CommitFailed):
        maildrop.commit()
    assert not SessionRecord.objects.exists() and "at once" not in record.ways
    assert Mailbox.objects.get(pk=alice.pk).lock_token == "someone-else"


def test_a_quit_that_deletes_takes_the_long_way(alice):
    maildrop = login()
    maildrop.at_commit = record = SessionRecordAtQuit(Mailbox.objects.get(pk=alice.pk))
    maildrop.mark_deleted(1)
    maildrop.commit()
    assert record.ways == ["long"]
    assert Message.objects.visible().filter(mailbox=alice).count() == 2
    assert SessionRecord.objects.count() == 1 and Mailbox.objects.get(pk=alice.pk).lock_token == ""


@postgresql_only
def test_a_quit_statement_that_fails_leaves_it_to_the_long_way(alice, caplog, fresh_summary):
    maildrop = login()
    maildrop.at_commit = record = SessionRecordAtQuit(Mailbox.objects.get(pk=alice.pk))
    with connection.cursor() as cursor:
        cursor.execute(
            "ALTER TABLE popserver_sessionrecord ADD CONSTRAINT test_no_alice CHECK (username <> 'alice')"
        )
    try:
        with caplog.at_level(logging.WARNING):
            maildrop.commit()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE popserver_sessionrecord DROP CONSTRAINT test_no_alice")
    assert record.ways == ["long"] and "recording a session failed" in caplog.text
    assert "QUIT: the one statement failed" in caplog.text
    assert Mailbox.objects.get(pk=alice.pk).lock_token == "" and not SessionRecord.objects.exists()


@postgresql_only
def test_at_once_gives_the_selected_rows_in_order_or_none(alice):
    mailbox = Mailbox.objects.get(pk=alice.pk)
    snapshot = _SNAPSHOT.rows(alice.pk)
    now = mailbox.created_at
    take = _TAKE_FREE[True].statement("t", "node", 1, "i", "peer", now, now, now, alice.pk)
    event = audit.login_event_statement(
        audit.login_event(
            username="alice", peer_ip=PEER_IP, mechanism="USER", tls=False, outcome="success", mailbox=mailbox
        )
    )
    assert at_once(take, [event], _SNAPSHOT.statement(alice.pk), _SNAPSHOT_ORDER) == snapshot
    assert [row[3] for row in snapshot] == sorted(row[3] for row in snapshot)
    assert [row[0] for row in snapshot] != sorted(row[0] for row in snapshot)  # sizes: not the same order
    # Taken now: the same UPDATE changes nothing, and its write is not made.
    assert at_once(take, [event], _SNAPSHOT.statement(alice.pk), _SNAPSHOT_ORDER) is None
    assert LoginEvent.objects.count() == 1
    # Without a select: [] once the UPDATE changed a row.
    assert at_once(_FREE_OURS.statement(alice.pk, "t"), []) == []
    assert at_once(_FREE_OURS.statement(alice.pk, "t"), []) is None


@postgresql_only
def test_a_write_that_cannot_depend_on_the_update_is_refused(alice):
    take = _FREE_OURS.statement(alice.pk, "t")
    with pytest.raises(ValueError, match="not a write"):
        at_once(take, [Statement(take.connection, "SELECT 1", [])])


@postgresql_only
def test_a_failing_statement_undoes_its_update(alice):
    now = alice.created_at
    take = _TAKE_FREE[True].statement("t", "node", 1, "i", "peer", now, now, now, alice.pk)
    failing = Statement(
        take.connection,
        "",
        [],
        "INSERT INTO popserver_loginthrottle (scope) SELECT NULL FROM popserver_changed",
    )
    with pytest.raises(DatabaseError):
        at_once(take, [failing])
    assert Mailbox.objects.get(pk=alice.pk).lock_token == ""


@pytest.mark.live
def test_a_session_through_the_server_records_its_login_and_its_quit(pop3_server, alice):
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == 3
    assert client.quit().startswith(b"+OK")
    record = wait_for(lambda: SessionRecord.objects.first())
    assert (record.end_reason, record.deleted_count) == ("Logged out", 0)
    assert SessionRecord.objects.count() == 1
    assert LoginEvent.objects.get().outcome == LoginEvent.SUCCESS
    assert not LoginThrottle.objects.exists() and Mailbox.objects.get(pk=alice.pk).lock_token == ""


# The throttle's first step: the look-up and the reservation (one statement on PostgreSQL) ------------------
def test_a_fresh_attempt_is_reserved_in_one_statement(transactional_db):
    throttle = DatabaseThrottle()
    with CaptureQueriesContext(connection) as queries:
        assert throttle.check_and_reserve("alice", PEER_IP, trusted=False) == (
            None,
            Reservation(admitted=True),
        )
    if connection.vendor == "postgresql":
        assert len(queries.captured_queries) == 1, queries.captured_queries
    row = LoginThrottle.objects.get()
    assert (row.scope, row.key, row.failures, row.locked_until) == ("account", f"alice|{PEER_IP}", 1, None)


@pytest.mark.parametrize("scope", ["account", "ip"])
def test_a_lock_out_is_found_and_nothing_is_reserved(transactional_db, scope):
    now = timezone.now()
    key = f"alice|{PEER_IP}" if scope == "account" else PEER_IP
    LoginThrottle.objects.create(
        scope=scope, key=key, failures=0, window_started=now, locked_until=now + timedelta(minutes=5)
    )
    assert DatabaseThrottle().check_and_reserve("alice", PEER_IP, trusted=False) == (scope, None)
    assert list(LoginThrottle.objects.values_list("scope", "failures")) == [(scope, 0)]


def test_a_trusted_peer_is_not_refused_for_its_ips_lock_out(transactional_db):
    now = timezone.now()
    LoginThrottle.objects.create(
        scope="ip", key=PEER_IP, window_started=now, locked_until=now + timedelta(minutes=5)
    )
    assert DatabaseThrottle().check_and_reserve("alice", PEER_IP, trusted=True) == (
        None,
        Reservation(admitted=True),
    )


def test_an_existing_counter_counts_the_attempt_up_to_the_lock_out(transactional_db, settings):
    settings.POPSERVER_THROTTLE_ACCOUNT_FAILURES = 3
    throttle = DatabaseThrottle()
    got = [throttle.check_and_reserve("alice", PEER_IP, trusted=False) for _ in range(4)]
    assert got == [
        (None, Reservation(admitted=True)),
        (None, Reservation(admitted=True)),
        (None, Reservation(admitted=True, last=True)),
        ("account", None),
    ]
    assert LoginThrottle.objects.get(scope="account").locked_until is not None


def test_a_sites_throttle_subclass_is_called_not_bypassed(transactional_db, make_mailbox, settings):
    """A site's ``DatabaseThrottle`` subclass that changes a step keeps it, also on PostgreSQL."""
    make_mailbox("bob")
    calls = []

    class Counting(DatabaseThrottle):
        def locked_out(self, *args, **kwargs):
            calls.append("locked_out")
            return super().locked_out(*args, **kwargs)

        def succeeded(self, *args, **kwargs):
            calls.append("succeeded")
            return super().succeeded(*args, **kwargs)

    DjangoAuthenticator(PEER_IP, 4000, throttle=Counting())("bob", "secret").release()
    assert calls[0] == "locked_out" and "succeeded" in calls
    assert not LoginThrottle.objects.exists()


@postgresql_only
def test_a_snapshot_that_cannot_be_read_gives_the_lock_back(alice):
    """The statement committed but its rows cannot be made into a snapshot: no session gets the lock, so it is
    freed at once (as the long way's rollback would), never held until the process ends."""
    from dataclasses import replace

    from popserver.storage.lock import MailboxLock, _live

    def broken(rows):
        raise RuntimeError("cannot convert")

    snapshot = replace(_SNAPSHOT.statement(alice.pk), convert=broken)
    live_before = set(_live)
    with pytest.raises(RuntimeError, match="cannot convert"):
        MailboxLock.take_at_once(Mailbox.objects.get(pk=alice.pk), "peer", [], snapshot, _SNAPSHOT_ORDER)
    assert Mailbox.objects.get(pk=alice.pk).lock_token == ""
    assert set(_live) == live_before
