"""LMTP's delivery in one statement on PostgreSQL (``popserver.mailin.onestatement``) beside the general path
(``store_prepared``): the same rows, the same quota rules, and every copy it leaves stored the usual way.

The handler-level tests run on every database (elsewhere every copy takes the general path); the ones that
call the statement itself need PostgreSQL. All need autocommit (the statement is its own transaction), hence
``transactional_db``."""

import pytest
from django.db import DatabaseError, connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from popserver import signals
from popserver.mailin import onestatement
from popserver.mailin.delivery import (
    count_delivery,
    format_uid,
    prepare_message,
    store_prepared,
)
from popserver.mailin.lmtp import MailboxDeliveryHandler
from popserver.models import Address, DeliveryCount, Mailbox, Message, MessageChunk
from popserver.protocol.lmtp import Envelope, Outcome, Recipient
from popserver.storage.bodies import read_message
from popserver.storage.compiled import prepared_cursor

MESSAGE = (
    b"From: =?utf-8?q?S=C3=A9nder?= <sender@example.net>\r\nSubject: hello\r\n"
    b"Date: Tue, 01 Dec 2026 10:00:00 +0100\r\nMessage-ID: <m1@example.net>\r\n\r\nbody\r\n"
)

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the one-statement delivery is PostgreSQL's"
)


@pytest.fixture
def delivered():
    """The ``message_delivered`` signals sent, as (mailbox id, message) pairs."""
    seen = []

    def receiver(sender, mailbox, message, **kwargs):
        seen.append((mailbox.pk, message))

    signals.message_delivered.connect(receiver)
    yield seen
    signals.message_delivered.disconnect(receiver)


def envelope(*mailboxes, data=MESSAGE, addresses=None):
    addresses = addresses or [f"{m.user.username}@example.org" for m in mailboxes]
    recipients = tuple(Recipient(a, m) for a, m in zip(addresses, mailboxes, strict=True))
    return Envelope("sender@example.net", recipients, data)


def row(message: Message) -> dict:
    """A message row without what differs between two deliveries (id, mailbox, uid, arrival time)."""
    values = Message.objects.filter(pk=message.pk).values().get()
    return {k: v for k, v in values.items() if k not in ("id", "mailbox_id", "uid", "arrived_at")}


def stored(mailbox: Mailbox) -> list[bytes]:
    return [b"".join(read_message(m)) for m in Message.objects.filter(mailbox=mailbox).order_by("pk")]


@postgresql_only
def test_the_statement_stores_the_rows_store_prepared_stores(transactional_db, make_mailbox, delivered):
    usual, at_once = make_mailbox("usual"), make_mailbox("atonce")
    Mailbox.objects.filter(pk=at_once.pk).update(next_uid=2**33)  # a counter past 8 hex digits
    at_once.refresh_from_db()
    prepared = prepare_message(MESSAGE)
    general = store_prepared(usual, prepared)
    assert onestatement.takes([at_once]) == [at_once]
    [(mailbox_id, message)] = onestatement.store_at_once([at_once], prepared).items()

    assert mailbox_id == at_once.pk and message.pk is not None and not message._state.adding
    assert row(message) == row(general)
    assert message.uid == Message.objects.get(pk=message.pk).uid == format_uid(2**33, at_once.uid_validity)
    assert Mailbox.objects.get(pk=at_once.pk).next_uid == at_once.next_uid == 2**33 + 1
    assert stored(at_once) == stored(usual) == [MESSAGE]
    assert [(m.pk, m.uid) for _, m in delivered] == [(general.pk, general.uid), (message.pk, message.uid)]
    # Counted in its own statement (the hour's row created after the commit if needed).
    assert sum(DeliveryCount.objects.values_list("messages", flat=True)) == 2


@postgresql_only
@override_settings(POPSERVER_BODY_CHUNK_SIZE=100)
def test_a_body_of_several_chunks(transactional_db, make_mailbox):
    mailbox = make_mailbox("alice")
    data = MESSAGE + b"x" * 250 + b"\r\n"
    [message] = onestatement.store_at_once([mailbox], prepare_message(data)).values()
    chunks = -(-len(data) // 100)
    assert (
        chunks > 1 and message.chunk_count == chunks == MessageChunk.objects.filter(message=message).count()
    )
    assert stored(mailbox) == [data]


@postgresql_only
def test_a_mailbox_under_a_quota_is_left_untouched(transactional_db, make_mailbox):
    """The RCPT check saw no quota, but one was set since: the statement takes nothing (the row is checked
    under its lock), and the caller's general path checks the quota."""
    mailbox = make_mailbox("alice")
    stale = Mailbox.objects.get(pk=mailbox.pk)
    Mailbox.objects.filter(pk=mailbox.pk).update(quota_messages=5)
    assert onestatement.store_at_once([stale], prepare_message(MESSAGE)) == {}
    assert Mailbox.objects.get(pk=mailbox.pk).next_uid == stale.next_uid
    assert not Message.objects.exists() and not DeliveryCount.objects.exists()


@postgresql_only
def test_the_site_default_quota_applies_to_mailboxes_without_their_own(transactional_db, make_mailbox):
    own_zero, default = make_mailbox("own", quota_bytes=0), make_mailbox("default")
    prepared = prepare_message(MESSAGE)
    with override_settings(POPSERVER_QUOTA_BYTES=prepared.size - 1):
        assert onestatement.takes([own_zero]) == [own_zero] and onestatement.takes([default]) == [default]
        assert list(onestatement.store_at_once([own_zero, default], prepared)) == [own_zero.pk]
    assert not Message.objects.filter(mailbox=default).exists()


@postgresql_only
def test_a_quota_is_checked_in_the_statement_after_the_lock(transactional_db, make_mailbox):
    """Under a quota the rows are locked first and the statement counts the usage after: it takes a copy
    that fits and crosses no warning share, and writes the same row as store_prepared."""
    usual = make_mailbox("usual", quota_messages=100)
    limited = make_mailbox("limited", quota_messages=100)
    prepared = prepare_message(MESSAGE)
    for mailbox in (usual, limited):
        for _ in range(3):
            store_prepared(mailbox, prepared)
    general = store_prepared(usual, prepared)
    assert onestatement.takes([limited]) == [limited]
    [message] = onestatement.store_at_once([limited], prepared).values()
    assert row(message) == row(general)
    assert Mailbox.objects.get(pk=limited.pk).next_uid == 5 and message.uid == format_uid(
        4, limited.uid_validity
    )


@postgresql_only
@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"quota_messages": 2}, "full: 2 of 2 messages"),
        ({"quota_messages": 3}, "crosses 80 %: left to store_prepared, which writes the warning"),
        ({"quota_bytes": 10**6, "quota_messages": 10}, "crosses 95 % of the messages"),
    ],
)
def test_what_a_quota_refuses_or_warns_of_is_left_untouched(transactional_db, make_mailbox, fields, reason):
    mailbox = make_mailbox("alice", **fields)
    prepared = prepare_message(MESSAGE)
    existing = {2: 2, 3: 2, 10: 9}[fields["quota_messages"]]
    for _ in range(existing):
        store_prepared(mailbox, prepared, send_signal=False)
    before = Mailbox.objects.get(pk=mailbox.pk).next_uid
    assert onestatement.store_at_once([mailbox], prepared) == {}, reason
    assert Mailbox.objects.get(pk=mailbox.pk).next_uid == before
    assert Message.objects.filter(mailbox=mailbox).count() == existing and not DeliveryCount.objects.exists()


@postgresql_only
def test_fractional_warning_shares_take_the_general_path_under_a_quota(transactional_db, make_mailbox):
    unlimited, limited = make_mailbox("free"), make_mailbox("limited", quota_bytes=10**6)
    with override_settings(POPSERVER_QUOTA_WARNINGS=[80, 99.5]):
        assert onestatement.takes([unlimited]) == [unlimited] and onestatement.takes([limited]) == []


def test_a_crossing_at_data_writes_its_warning(transactional_db, make_mailbox, delivered):
    """A copy that crosses a warning share is stored the usual way, with its warning (every database)."""
    mailbox = make_mailbox("alice", quota_messages=5)
    for _ in range(3):
        store_prepared(mailbox, prepare_message(MESSAGE), send_signal=False)
    assert list(MailboxDeliveryHandler().deliver(envelope(mailbox))) == [Outcome.ACCEPTED]
    kinds = list(Message.objects.filter(mailbox=mailbox).values_list("server_notice", flat=True))
    assert kinds == [False, False, False, False, True]  # 4 of 5: across 80 %, and the warning


def test_several_recipients_one_full_one_twice(transactional_db, make_mailbox, delivered):
    """Ten-recipient LMTP in small: copies one statement takes, a full mailbox refused by the general path,
    and a second copy for a mailbox reached by two addresses; every database."""
    alice, bob = make_mailbox("alice"), make_mailbox("bob", quota_bytes=10**6)  # bob: a quota with room
    full = make_mailbox("full", quota_messages=1)
    store_prepared(full, prepare_message(b"Subject: old\r\n\r\nold\r\n"), send_signal=False)  # no warning
    Address.objects.create(mailbox=bob, address="robert@example.org")
    delivered.clear()
    handler = MailboxDeliveryHandler()
    outcomes = list(
        handler.deliver(
            envelope(
                bob,
                full,
                alice,
                bob,
                addresses=["bob@example.org", "full@example.org", "alice@example.org", "robert@example.org"],
            )
        )
    )
    assert outcomes == [Outcome.ACCEPTED, Outcome.OVER_QUOTA, Outcome.ACCEPTED, Outcome.ACCEPTED]
    copy = b"Return-Path: <sender@example.net>\r\n" + MESSAGE  # several recipients: no Delivered-To
    assert stored(alice) == [copy] and stored(bob) == [copy, copy] and len(stored(full)) == 1
    uids = list(Message.objects.filter(mailbox=bob).values_list("uid", flat=True))
    assert len(set(uids)) == 2
    assert sorted(pk for pk, _ in delivered) == sorted([alice.pk, bob.pk, bob.pk])
    assert sum(DeliveryCount.objects.values_list("messages", flat=True)) == 3


def test_one_recipient_gets_its_delivered_to(transactional_db, make_mailbox):
    alice = make_mailbox("alice")
    assert list(MailboxDeliveryHandler().deliver(envelope(alice))) == [Outcome.ACCEPTED]
    assert stored(alice) == [
        b"Return-Path: <sender@example.net>\r\nDelivered-To: alice@example.org\r\n" + MESSAGE
    ]


def test_a_quota_refusal_at_data_stores_nothing(transactional_db, make_mailbox):
    tight = make_mailbox("tight", quota_bytes=len(MESSAGE))  # room at RCPT; the trace fields break it
    assert list(MailboxDeliveryHandler().deliver(envelope(tight))) == [Outcome.OVER_QUOTA]
    assert stored(tight) == [] and not DeliveryCount.objects.exists()
    assert Mailbox.objects.get(pk=tight.pk).next_uid == tight.next_uid


def test_a_mailbox_deleted_since_rcpt_is_unknown(transactional_db, make_mailbox):
    alice, gone = make_mailbox("alice"), make_mailbox("gone")
    Mailbox.objects.filter(pk=gone.pk).delete()
    outcomes = list(MailboxDeliveryHandler().deliver(envelope(alice, gone)))
    assert outcomes == [Outcome.ACCEPTED, Outcome.UNKNOWN]
    assert len(stored(alice)) == 1


@postgresql_only
def test_a_failing_statement_leaves_every_copy_to_the_general_path(
    transactional_db, make_mailbox, monkeypatch, caplog
):
    alice, bob = make_mailbox("alice"), make_mailbox("bob")

    def broken(*args, **kwargs):
        raise DatabaseError("statement failed")

    monkeypatch.setattr(onestatement, "_run", broken)
    outcomes = list(MailboxDeliveryHandler().deliver(envelope(alice, bob)))
    assert outcomes == [Outcome.ACCEPTED, Outcome.ACCEPTED]
    assert len(stored(alice)) == len(stored(bob)) == 1
    assert "storing in one statement failed" in caplog.text
    assert sum(DeliveryCount.objects.values_list("messages", flat=True)) == 2


@postgresql_only
def test_a_connection_lost_during_the_statement_gets_451_never_a_second_store(
    transactional_db, make_mailbox, monkeypatch
):
    """The statement may have committed before the connection went: its copies get 451 (the MTA retries),
    never a second store in the same session, which would then answer 250 for a copy stored twice."""
    from django.db import OperationalError

    alice, bob = make_mailbox("alice"), make_mailbox("bob")
    real_run = onestatement._run

    def commits_then_loses_the_connection(connection, sql, params):
        real_run(connection, sql, params)  # committed: its own transaction
        connection.close()  # gone; the next query would open a new one
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(onestatement, "_run", commits_then_loses_the_connection)
    outcomes = list(MailboxDeliveryHandler().deliver(envelope(alice, bob)))
    assert outcomes == [Outcome.TEMPORARY_ERROR, Outcome.TEMPORARY_ERROR]
    connection.close()
    assert len(stored(alice)) == len(stored(bob)) == 1  # stored once, by the statement


@postgresql_only
def test_not_inside_a_transaction(transactional_db, make_mailbox):
    from django.db import transaction

    alice = make_mailbox("alice")
    with transaction.atomic():
        assert onestatement.takes([alice]) == []
        # The handler inside a caller's transaction: the general path, committed with it.
        assert list(MailboxDeliveryHandler().deliver(envelope(alice))) == [Outcome.ACCEPTED]
    assert len(stored(alice)) == 1


@postgresql_only
def test_one_copy_is_one_statement(transactional_db, make_mailbox):
    """With the hour's count row there, a one-recipient delivery is one statement (here through Django's
    cursor, which the query log needs; in service a server-side prepared statement)."""
    alice = make_mailbox("alice")
    count_delivery(0, messages=0)  # the hour's row
    with CaptureQueriesContext(connection) as queries:
        assert list(MailboxDeliveryHandler().deliver(envelope(alice))) == [Outcome.ACCEPTED]
    assert len(queries.captured_queries) == 1, queries.captured_queries
    assert DeliveryCount.objects.get().messages == 1


@postgresql_only
def test_the_hot_statements_are_prepared_on_the_server(transactional_db, make_mailbox):
    """Django opens psycopg connections with automatic preparing off, which also ignores prepare=True:
    the statement and the look-up must still be prepared (PostgreSQL plans them once per connection)."""
    alice = make_mailbox("alice", email="alice@example.org")
    handler = MailboxDeliveryHandler()
    check = handler.check_recipient("alice@example.org", size=None)
    assert list(handler.deliver(envelope(check.token))) == [Outcome.ACCEPTED]
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    assert any("popserver_messagechunk" in sql for sql in prepared), prepared
    assert any("popserver_address" in sql for sql in prepared), prepared
    assert len(stored(alice)) == 1


@postgresql_only
@override_settings(POPSERVER_DB_PREPARED_STATEMENTS=False)
def test_without_prepared_statements(transactional_db, make_mailbox):
    """Behind a pooler that cannot keep them: the same statement, bound on the client."""
    alice = make_mailbox("alice", email="alice@example.org")
    connection.close()  # a new session: none prepared by an earlier test
    handler = MailboxDeliveryHandler()
    check = handler.check_recipient("alice@example.org", size=None)
    assert prepared_cursor(connection) is None
    assert list(handler.deliver(envelope(check.token))) == [Outcome.ACCEPTED]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements")
        assert cursor.fetchone()[0] == 0
    assert len(stored(alice)) == 1 and Message.objects.get().chunk_count == 1


@postgresql_only
def test_a_failure_under_a_quota_ends_its_transaction(transactional_db, make_mailbox, monkeypatch):
    """Lock and statement run in a transaction of their own (pipelined): a failure rolls it back and leaves
    the connection as Django knows it (autocommit, no transaction), nothing stored."""
    mailbox = make_mailbox("alice", quota_messages=100)
    broken = (
        "SELECT no_such_column FROM popserver_mailbox WHERE id = ANY(%s::bigint[])"  # fails in PostgreSQL
    )
    monkeypatch.setattr(onestatement, "_lock_statement", lambda alias: broken)
    with pytest.raises(DatabaseError):
        onestatement.store_at_once([mailbox], prepare_message(MESSAGE))
    from psycopg.pq import TransactionStatus

    assert connection.connection.info.transaction_status == TransactionStatus.IDLE
    assert connection.get_autocommit() and not Message.objects.exists()
    monkeypatch.undo()
    assert len(onestatement.store_at_once([mailbox], prepare_message(MESSAGE))) == 1
