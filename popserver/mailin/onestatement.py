"""Delivery in one statement on PostgreSQL: ``store_prepared``'s common case without its round trips.

Copies of one message (the same bytes), each with a new unique id, into the database body store (the
default), are stored by one data-modifying statement (``WITH ... UPDATE ... INSERT ...``): it takes each
mailbox's next unique id from its counter (the UPDATE locks the row; several rows are locked in primary-key
order first, the order of every delivery, so no deadlock), inserts the message rows and their body chunks,
and adds the copies to the hour's ``DeliveryCount``. The statement is prepared on the
server once per connection (PostgreSQL parses and plans it once) and the body goes once, in binary, for
every copy.

- No quota (the mailboxes' own limits 0, or empty with the site's 0): the statement runs on its own, so it
  is its own transaction: one round trip instead of seven (BEGIN, the row lock and counter, the message,
  its chunk, the count, COMMIT; with n copies also a savepoint and its release around each). The rows are
  checked for a quota when they are locked.
- A quota: the rows are locked by a statement of their own first, and the statement then counts the usage
  (its snapshot is taken after the lock, so it sees every message committed before, as ``quota.check``
  after ``store_prepared``'s lock does) and takes only a copy that fits and crosses no warning share
  (``quota.crossing`` in integers; fractional shares leave quotas to ``store_prepared``). BEGIN, both
  statements and COMMIT go in one round trip (psycopg's pipeline mode).

PostgreSQL commits before it answers (``synchronous_commit``), so a row returned is a stored message. A
failure the database reports leaves nothing behind; a connection lost after the commit but before the answer
may leave the copies stored, unknown to us: the caller then answers 451 for them (never stores them again in
that session; the MTA's retry may duplicate, as after a crash before the 250). What is not taken goes to
``store_prepared`` in the caller's transaction, as before: a refusal or a warning (with its exact reason and
its notice), a mailbox that is gone, and every copy when the statement fails. ``message_delivered`` is sent for each stored copy, as after ``store_prepared``'s
commit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext, suppress

from django.db import connections, router, transaction
from django.utils import timezone

from popserver import signals
from popserver.conf import get_setting
from popserver.models import DeliveryCount, Mailbox, Message, MessageChunk
from popserver.protocol.wire import has_header_end
from popserver.storage.bodies import DatabaseBodyStore, get_body_store
from popserver.storage.compiled import prepared_cursor

from .delivery import PreparedMessage, count_delivery
from . import quota

logger = logging.getLogger(__name__)

__all__ = ["store_at_once", "takes"]

# Message fields the statement computes itself; every other concrete field is a parameter, valued as the ORM
# would value it for a new row (``pre_save``, ``get_db_prep_save``), so both paths write identical rows.
_COMPUTED = ("id", "mailbox", "uid")

# (alias, several copies, several chunks, warning shares or None) -> (SQL with %s placeholders, the Message
# fields given as parameters, in order)
_statements: dict[tuple, tuple[str, list]] = {}


def _statement(alias: str, several: bool, chunked: bool, shares: tuple[int, ...] | None) -> tuple[str, list]:
    """The statement for no quota (``shares`` None), or the one that checks the quota and the warning shares
    (POPSERVER_QUOTA_WARNINGS, written into it: constants plan better than an array) and runs after the rows
    are locked (``_LOCK``)."""
    key = (alias, several, chunked, shares)
    found = _statements.get(key)
    if found is not None:
        return found
    connection = connections[alias]
    quote = connection.ops.quote_name

    def table(model) -> str:
        return quote(model._meta.db_table)

    def column(model, name: str) -> str:
        return quote(model._meta.get_field(name).column)

    box_id, next_uid, validity = (column(Mailbox, n) for n in ("id", "next_uid", "uid_validity"))
    quota_bytes, quota_messages = column(Mailbox, "quota_bytes"), column(Mailbox, "quota_messages")
    given = [f for f in Message._meta.concrete_fields if f.name not in _COMPUTED]
    columns = [column(Message, n) for n in ("mailbox", "uid")] + [quote(f.column) for f in given]
    values = ["box.id", f"{_hex8('box.number')} || {_hex8('box.uid_validity')}"] + [
        f"%s::{f.db_type(connection)}" for f in given
    ]
    # Each row locked in primary-key order first (SELECT ... ORDER BY ... FOR NO KEY UPDATE, the lock
    # store_prepared's UPDATE takes: rows that refer to the mailbox may still be inserted; it locks in its output's
    # order); one copy needs no such step. The UPDATE works on the newest version of a row another delivery
    # changed meanwhile (READ COMMITTED), so the counter never hands out an id twice.
    locked = (
        f"locked AS (SELECT {box_id} FROM {table(Mailbox)} WHERE {box_id} = ANY(%s::bigint[]) "
        f"ORDER BY {box_id} FOR NO KEY UPDATE), "
        if several
        else ""
    )
    source = (
        f"FROM locked WHERE m.{box_id} = locked.{box_id}" if several else f"WHERE m.{box_id} = %s::bigint"
    )
    chunk_message, chunk_seq, chunk_data = (column(MessageChunk, n) for n in ("message", "seq", "data"))
    count_messages, count_octets = column(DeliveryCount, "messages"), column(DeliveryCount, "octets")
    # unnest() of parameters is planned as 100 rows, so a generic plan would look dearer than one made for
    # the values and PostgreSQL would plan every run again: a body of one chunk (the common case) has no array.
    parts = (
        "SELECT msg.id, part.seq, part.data FROM msg CROSS JOIN unnest(%s::integer[], %b::bytea[]) "
        "AS part(seq, data)"
        if chunked
        else "SELECT msg.id, 0, %b::bytea FROM msg"
    )
    if shares is None:
        box = (
            f"WITH {locked}box AS ("
            f"UPDATE {table(Mailbox)} AS m SET {next_uid} = m.{next_uid} + 1 {source} "
            # No quota applies: the mailbox's own limits, or the site's (the parameters) where it has none.
            f"AND COALESCE(m.{quota_bytes}, %s::bigint) = 0 AND COALESCE(m.{quota_messages}, %s::bigint) = 0 "
        )
    else:
        # quota.check and quota.crossing in SQL, on the usage as this statement sees it: after the rows were
        # locked (READ COMMITTED: a statement's snapshot is taken when it starts), so it counts every message
        # committed before, as store_prepared's count after its lock does. Integers only: exact, as in Python.
        m_table, m_box = table(Message), column(Message, "mailbox")
        m_notice, m_deleted, m_size = (column(Message, n) for n in ("server_notice", "deleted_at", "size"))
        crossing = (
            "AND NOT EXISTS (SELECT 1 FROM (VALUES "
            + ", ".join(f"({int(share)})" for share in shares)
            + ") AS t(share) WHERE (q.lo > 0 AND q.o * 100 < t.share * q.lo AND t.share * q.lo <= "
            "(q.o + %s::bigint) * 100) OR (q.lm > 0 AND q.c * 100 < t.share * q.lm AND t.share * q.lm <= "
            "(q.c + 1) * 100)) "
            if shares
            else ""
        )
        box = (
            f"WITH box AS (UPDATE {table(Mailbox)} AS m SET {next_uid} = m.{next_uid} + 1 FROM ("
            f"SELECT b.{box_id} AS id, COALESCE(b.{quota_bytes}, %s::bigint) AS lo, "
            f"COALESCE(b.{quota_messages}, %s::bigint) AS lm, u.c, u.o FROM {table(Mailbox)} AS b "
            f"CROSS JOIN LATERAL (SELECT count(*) AS c, COALESCE(sum(x.{m_size}), 0) AS o FROM {m_table} AS x "
            f"WHERE x.{m_box} = b.{box_id} AND NOT x.{m_notice} AND x.{m_deleted} IS NULL) AS u "
            f"WHERE b.{box_id} = ANY(%s::bigint[])) AS q WHERE m.{box_id} = q.id "
            "AND (q.lm = 0 OR q.c + 1 <= q.lm) AND (q.lo = 0 OR q.o + %s::bigint <= q.lo) "
            f"{crossing}"
        )
    sql = (
        f"{box}RETURNING m.{box_id} AS id, m.{next_uid} - 1 AS number, m.{validity} AS uid_validity), "
        f"msg AS (INSERT INTO {table(Message)} ({', '.join(columns)}) SELECT {', '.join(values)} FROM box "
        f"RETURNING {column(Message, 'id')} AS id, {column(Message, 'mailbox')} AS mailbox_id, "
        f"{column(Message, 'uid')} AS uid), "
        f"chunk AS (INSERT INTO {table(MessageChunk)} ({chunk_message}, {chunk_seq}, {chunk_data}) {parts}), "
        f"counted AS (UPDATE {table(DeliveryCount)} SET {count_messages} = {count_messages} + "
        f"(SELECT count(*) FROM msg), {count_octets} = {count_octets} + (SELECT count(*) FROM msg) * %s::bigint "
        f"WHERE {column(DeliveryCount, 'hour')} = %s::timestamptz "
        "AND EXISTS (SELECT 1 FROM msg) RETURNING 1) "
        "SELECT msg.id, msg.mailbox_id, msg.uid, box.number, box.uid_validity, (SELECT count(*) FROM counted) "
        "FROM msg JOIN box ON box.id = msg.mailbox_id ORDER BY msg.mailbox_id"
    )
    found = _statements[key] = (sql, given)
    return found


def _lock_statement(alias: str) -> str:
    connection = connections[alias]
    quote = connection.ops.quote_name
    box_id = quote(Mailbox._meta.pk.column)
    return (
        f"SELECT {box_id} FROM {quote(Mailbox._meta.db_table)} WHERE {box_id} = ANY(%s::bigint[]) "
        f"ORDER BY {box_id} FOR NO KEY UPDATE"
    )


def _hex8(number: str) -> str:
    """``format_uid``'s ``{number:08X}`` in SQL: upper-case hex, at least 8 digits (more are kept)."""
    return f"upper(lpad(to_hex({number}), greatest(8, length(to_hex({number}))), '0'))"


def takes(mailboxes: Sequence[Mailbox]) -> list[Mailbox]:
    """Those of ``mailboxes`` that ``store_at_once`` may take: on PostgreSQL (psycopg 3) outside any
    transaction, into the database body store; under a quota only with whole-number warning shares (the
    statement checks them in integers, exactly as ``quota.crossing`` does)."""
    alias = router.db_for_write(Mailbox)
    connection = connections[alias]
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return []
    if type(get_body_store()) is not DatabaseBodyStore:  # a site's own store saves its own way
        return []
    if _shares() is not None:
        return list(mailboxes)
    return [m for m in mailboxes if quota.mailbox_limits(m).unlimited]


def _shares() -> tuple[int, ...] | None:
    shares = get_setting("QUOTA_WARNINGS")
    if not all(isinstance(share, int) and not isinstance(share, bool) for share in shares):
        return None
    return tuple(shares)


def store_at_once(mailboxes: Sequence[Mailbox], prepared: PreparedMessage) -> dict[int, Message]:
    """Store ``prepared`` in each of ``mailboxes`` (distinct, each one ``takes`` takes), committed when this
    returns; the stored copies by mailbox id. A mailbox missing from the result was not touched (its counter
    neither): the caller stores it with ``store_prepared``. Database errors are raised (nothing stored)."""
    alias = router.db_for_write(Mailbox)
    connection = connections[alias]
    by_id = {mailbox.pk: mailbox for mailbox in mailboxes}
    data = prepared.data
    chunk_size = get_setting("BODY_CHUNK_SIZE")
    parts = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    several, chunked = len(mailboxes) > 1, len(parts) > 1
    # A quota at RCPT: the statement that checks it, after the rows are locked (two statements, one
    # transaction, one round trip where psycopg can pipeline them). None: the one statement on its own.
    site = quota.limits(None, None)
    shares = None if all(quota.mailbox_limits(m).unlimited for m in mailboxes) else _shares()
    ids = sorted(by_id)
    sql, given = _statement(alias, several, chunked, shares)
    headers = prepared.headers
    template = Message(
        size=prepared.size,
        subject=headers.subject,
        sender=headers.sender,
        date=headers.date,
        has_header_end=has_header_end(data),
        chunk_count=len(parts),
        stored_body_id=None,
    )
    fields = [field.get_db_prep_save(field.pre_save(template, True), connection) for field in given]
    now = timezone.now()
    hour = now.replace(minute=0, second=0, microsecond=0)
    quota_bytes, quota_messages = site.octets, site.messages
    if shares is None:
        head = [ids if several else ids[0], quota_bytes, quota_messages]
    else:
        head = [quota_bytes, quota_messages, ids, prepared.size] + ([prepared.size] if shares else [])
    params = [
        *head,
        *fields,
        *([list(range(len(parts))), parts] if chunked else parts),
        prepared.size,
        hour,
    ]
    if shares is None:
        rows = _run(connection, sql, params)
    else:
        rows = _run_locked(connection, _lock_statement(alias), ids, sql, params)
    stored: dict[int, Message] = {}
    for message_id, mailbox_id, uid, number, uid_validity, _counted in rows:
        mailbox = by_id[mailbox_id]
        mailbox.next_uid, mailbox.uid_validity = number + 1, uid_validity
        message = Message(
            mailbox=mailbox, uid=uid, **{f.attname: getattr(template, f.attname) for f in given}
        )
        message.pk = message_id
        message._state.adding, message._state.db = False, alias
        stored[mailbox_id] = message
    if not stored:
        return stored
    if not rows[0][5]:  # the hour's first delivery: its row is created after the commit
        count_delivery(prepared.size * len(stored), now=hour, messages=len(stored))
    for message in stored.values():
        logger.debug(
            "stored message %s (%d octets, uid %s) in mailbox %s in one statement",
            message.pk,
            message.size,
            message.uid,
            message.mailbox_id,
        )
        signals.send_safely(signals.message_delivered, mailbox=message.mailbox, message=message)
    return stored


def _run(connection, sql: str, params: list) -> list[tuple]:
    """Run the statement on its own (autocommit) and fetch its rows: prepared on the server, the body a binary
    parameter (``prepared_cursor``)."""
    connection.ensure_connection()
    if not connection.get_autocommit():
        raise RuntimeError("store_at_once runs its statement as its own transaction, never inside another")
    prepared = prepared_cursor(connection)
    if prepared is None:  # queries logged or wrapped: through Django's cursor, so that they see this one
        with connection.cursor() as cursor:
            cursor.execute(sql.replace("%b", "%s"), params)  # client-side binding: text parameters only
            return cursor.fetchall()
    with connection.wrap_database_errors, prepared as cursor:
        cursor.execute(sql, params, prepare=True)
        return cursor.fetchall()


def _run_locked(connection, lock: str, ids: list[int], sql: str, params: list) -> list[tuple]:
    """``lock`` (the rows, in key order), then the statement, in one transaction of their own; in one round
    trip (BEGIN, both, COMMIT) through psycopg's pipeline mode where libpq has it."""
    connection.ensure_connection()
    if not connection.get_autocommit():
        raise RuntimeError("store_at_once runs its statements as their own transaction, never inside another")
    prepared = prepared_cursor(connection)
    if prepared is None:
        with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
            cursor.execute(lock, [ids])
            cursor.execute(sql.replace("%b", "%s"), params)
            return cursor.fetchall()
    import psycopg

    driver = connection.connection
    pipeline = driver.pipeline() if psycopg.Pipeline.is_supported() else nullcontext()
    try:
        with connection.wrap_database_errors, prepared as cursor, psycopg.Cursor(driver) as result:
            with pipeline:
                cursor.execute("BEGIN")
                cursor.execute(lock, [ids], prepare=True)
                result.execute(sql, params, prepare=True)
                cursor.execute("COMMIT")
            return result.fetchall()
    except BaseException:
        # A failure before COMMIT leaves the transaction open (and aborted): end it, so the connection is as
        # Django left it (autocommit, no transaction).
        if driver.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            with suppress(Exception):
                driver.rollback()
        raise
