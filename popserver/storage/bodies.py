"""Where message bytes live: one small interface, so that bodies can live elsewhere than in the database.

``get_body_store()`` is the store new bodies are written to (``POPSERVER_BODY_STORE``). Reads go through
``read_body()`` / ``read_bodies()`` with the body's location as the snapshot read it from the message row, so a
body is read by the store that holds it, whatever the setting says now.

The read path is the hot path of RETR: one plain indexed query per chunk, its SQL built once per database
connection and run through the connection's cursor (no ORM query building per chunk).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from django.db import DEFAULT_DB_ALIAS, connections
from django.utils.module_loading import import_string

from popserver.conf import get_setting
from popserver.exceptions import MessageExpunged


class BodyRef(NamedTuple):
    """Where a message's body is, as read with the snapshot (``SNAPSHOT_FIELDS`` of the message row)."""

    message_id: int
    chunk_count: int  # MessageChunk rows holding the body; 0: not known (counted when read)

    @classmethod
    def of(cls, message) -> BodyRef:
        """The location of a ``Message`` instance's body, from its fields."""
        return cls(*(getattr(message, "pk" if name == "id" else name) for name in REF_FIELDS))


# The message row's fields a ``BodyRef`` is made of, in order.
REF_FIELDS = ("id", "chunk_count")


class BodyStore:
    """Interface: save a message's bytes, read them back in chunks, delete them.

    Every method that writes runs inside the caller's transaction and writes nothing to a socket; reads run
    each query on its own (autocommit), so no transaction stays open while the caller sends what it read.
    """

    def save(self, message, data: bytes) -> None:
        """Store ``data`` as the body of ``message`` inside the caller's transaction: set the message's
        location fields and save it (created if it has no primary key yet), then whatever refers to it."""
        raise NotImplementedError

    def read(self, ref: BodyRef) -> Iterator[bytes]:
        """Yield the bytes in order; raise ``MessageExpunged`` if the message is gone before the first chunk
        (later: it vanished in the middle)."""
        raise NotImplementedError

    def read_small(self, refs: Sequence[BodyRef]) -> dict[int, bytes]:
        """The whole bodies of some small messages in one go, by message id; a message that is gone is
        left out (its ``read()`` then says so). Stores without a cheaper way return nothing."""
        return {}

    def delete(self, message_ids: Iterable[int]) -> None:
        """Delete the bodies of these messages; runs inside the caller's transaction."""
        raise NotImplementedError

    def read_chunks(self, message) -> Iterator[bytes]:
        """The body of a message (a ``Message`` or its id: admin views, export, tests), from the store that
        holds it. For an id the location is looked up when the first chunk is asked for, so
        ``MessageExpunged`` comes from ``next()``, as from ``read()``."""
        ref = BodyRef.of(message) if hasattr(message, "pk") else body_ref(message)
        yield from read_body(ref)


# The database store ---------------------------------------------------------------------------------------
class _ChunkSql:
    """The chunk queries in a connection's dialect, built once per connection alias (table and column
    names quoted by the backend): ``%s`` placeholders for Django's cursors, and the driver's own
    (``native``) for its cursor."""

    __slots__ = ("_first", "_qmark", "by_seq", "count", "first_of", "native")

    def __init__(self, alias: str):
        from popserver.models import MessageChunk

        connection = connections[alias]
        quote = connection.ops.quote_name
        meta = MessageChunk._meta
        table = quote(meta.db_table)
        message, seq, data = (quote(meta.get_field(name).column) for name in ("message", "seq", "data"))
        self.by_seq = f"SELECT {data} FROM {table} WHERE {message} = %s AND {seq} = %s"
        self.count = f"SELECT COUNT(*) FROM {table} WHERE {message} = %s"
        # The same in the driver's style: sqlite3 takes "?"; psycopg and the MySQL drivers take "%s".
        self._qmark = connection.vendor == "sqlite"
        self.native: dict[str, str] = {}
        for query in (self.by_seq, self.count):
            self._add_native(query)
        # first_chunks(n): the first chunks of n messages, for read_small(); one string per n, kept.
        self.first_of: dict[int, str] = {}
        self._first = f"SELECT {message}, {data} FROM {table} WHERE {seq} = 0 AND {message} IN "

    def _add_native(self, query: str) -> None:
        self.native[query] = query.replace("%s", "?") if self._qmark else query

    def first_chunks(self, count: int) -> str:
        query = self.first_of.get(count)
        if query is None:
            query = self._first + "(" + ", ".join(["%s"] * count) + ")"
            self._add_native(query)
            self.first_of[count] = query
        return query


_chunk_sql: dict[str, _ChunkSql] = {}


def chunk_sql(alias: str = DEFAULT_DB_ALIAS) -> _ChunkSql:
    sql = _chunk_sql.get(alias)
    if sql is None:
        sql = _chunk_sql[alias] = _ChunkSql(alias)
    return sql


def _as_bytes(value) -> bytes:
    return value if type(value) is bytes else bytes(value)  # psycopg2 and some drivers give memoryview


_cursors = threading.local()  # alias -> (the driver's connection, a cursor of it, execute()'s options)


def _driver_cursor(connection, driver):
    """A cursor of the driver's connection. psycopg 3: one that binds on the server and asks for binary
    results, so a bytea comes as its bytes instead of as hex text twice their size (Django's own cursors bind
    on the client, which allows text results only)."""
    if connection.vendor == "postgresql":
        try:
            import psycopg
        except ImportError:  # psycopg2
            pass
        else:
            if isinstance(driver, psycopg.Connection):
                return psycopg.Cursor(driver), {"binary": True}
    return driver.cursor(), {}


def run_query(alias: str, query: str, params: Sequence, many: bool = False):
    """``fetchone()`` (or ``fetchall()``) of a query of ``chunk_sql(alias)``: the hot path of RETR.

    Through the driver's cursor, kept per connection, with Django's error wrapping; through a Django cursor
    when queries are being logged or wrapped (DEBUG, tests counting queries, instrumentation) or inside a
    transaction, so that everything Django offers around a query still sees this one."""
    connection = connections[alias]
    if connection.queries_logged or connection.execute_wrappers or connection.in_atomic_block:
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if many else cursor.fetchone()
    driver = connection.connection
    if driver is None:
        connection.ensure_connection()
        driver = connection.connection
    kept = getattr(_cursors, alias, None)
    if kept is None or kept[0] is not driver:
        kept = (driver, *_driver_cursor(connection, driver))
        setattr(_cursors, alias, kept)
    _, cursor, options = kept
    with connection.wrap_database_errors:
        cursor.execute(chunk_sql(alias).native[query], params, **options)
        return cursor.fetchall() if many else cursor.fetchone()


class DatabaseBodyStore(BodyStore):
    """Bytes in ``MessageChunk`` rows of at most BODY_CHUNK_SIZE octets, their number on the message row. A
    small message is one row, read in one query; a large one is read row by row, each in its own short
    query (no transaction held open while the caller writes to a socket)."""

    # read_small() takes messages of one chunk; these bound one query's rows and octets.
    SMALL_BATCH_MESSAGES = 64
    SMALL_BATCH_OCTETS = 1024 * 1024

    using = DEFAULT_DB_ALIAS

    def save(self, message, data: bytes) -> None:
        from popserver.models import MessageChunk

        size = get_setting("BODY_CHUNK_SIZE")
        parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        message.chunk_count = len(parts)
        if message.pk is None:
            message.save(force_insert=True)
        else:
            message.save(update_fields=["chunk_count"])
        MessageChunk.objects.bulk_create(
            [MessageChunk(message=message, seq=seq, data=part) for seq, part in enumerate(parts)],
            batch_size=1,  # one row per statement: MariaDB's packet limit
        )

    def read(self, ref: BodyRef) -> Iterator[bytes]:
        message_id, count = ref
        alias = self.using
        sql = chunk_sql(alias)
        if count <= 0:  # written without a count: count the rows once
            count = run_query(alias, sql.count, (message_id,))[0]
            if not count:
                raise MessageExpunged(message_id)
        by_seq = sql.by_seq
        for seq in range(count):
            row = run_query(alias, by_seq, (message_id, seq))
            if row is None:  # gone: before the first chunk, or (after +OK was sent) in the middle
                raise MessageExpunged(message_id)
            data = _as_bytes(row[0])
            del row
            yield data
            del data  # not kept while the next chunk is read

    def read_small(self, refs: Sequence[BodyRef]) -> dict[int, bytes]:
        ids = [ref.message_id for ref in refs if ref.chunk_count == 1]
        if not ids:
            return {}
        rows = run_query(self.using, chunk_sql(self.using).first_chunks(len(ids)), ids, many=True)
        return {message_id: _as_bytes(data) for message_id, data in rows}

    def delete(self, message_ids: Iterable[int]) -> None:
        from popserver.models import MessageChunk

        MessageChunk.objects.filter(message_id__in=list(message_ids)).delete()


# Choosing the store ---------------------------------------------------------------------------------------
_stores: dict[str, BodyStore] = {}


def get_body_store() -> BodyStore:
    """The store new bodies are written to (``POPSERVER_BODY_STORE``), one instance per dotted path."""
    path = get_setting("BODY_STORE")
    store = _stores.get(path)
    if store is None:
        store = _stores[path] = import_string(path)()
    return store


_database_store = DatabaseBodyStore()


def store_for(ref: BodyRef) -> BodyStore:
    """The store that holds this body."""
    return _database_store


def read_body(ref: BodyRef) -> Iterator[bytes]:
    """The body's bytes in chunks, from the store that holds it (see ``BodyStore.read``)."""
    return store_for(ref).read(ref)


def read_small_bodies(refs: Sequence[BodyRef]) -> dict[int, bytes]:
    """Whole bodies of small messages by message id, in as few queries as their stores allow."""
    return _database_store.read_small(refs) if refs else {}


def body_ref(message_id: int) -> BodyRef:
    """The location of one message's body, looked up by its id; ``MessageExpunged`` if there is none."""
    from popserver.models import Message

    row = Message.objects.filter(pk=message_id).values_list(*REF_FIELDS).first()
    if row is None:
        raise MessageExpunged(message_id)
    return BodyRef(*row)
