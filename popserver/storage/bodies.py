"""Where message bytes live: one small interface, two stores.

- ``DatabaseBodyStore`` (the default): ``MessageChunk`` rows, so one transaction holds everything.
- ``DjangoStorageBodyStore``: objects in a named Django storage (``STORAGES["popserver"]``: a directory, or
  S3 and the like through django-storages), named by the SHA-256 of their bytes, so identical bodies are
  stored once; ``StoredBody`` rows count the messages that reference each object.

``get_body_store()`` is the store new bodies are written to (``POPSERVER_BODY_STORE``). Reads go through
``read_body()`` with the body's location as the snapshot read it from the message row (``BodyRef``), so a body
is read by the store that holds it, whatever the setting says now. Deleting goes through ``release_bodies()``
(called by ``popserver.storage.deletion``), which does what each store needs.

The read path is the hot path of RETR: one plain indexed query per chunk, its SQL built once per database
connection and run through the driver's cursor (no ORM query building per chunk).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from functools import partial
from itertools import islice
from typing import NamedTuple

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import F, Value
from django.db.models.functions import Greatest
from django.utils.module_loading import import_string

from popserver.conf import get_setting
from popserver.exceptions import BodyUnavailable, MessageExpunged

from .writelock import one_writer

logger = logging.getLogger("popserver.storage")


class BodyRef(NamedTuple):
    """Where a message's body is, as read with the snapshot (``REF_FIELDS`` of the message row)."""

    message_id: int
    chunk_count: int  # MessageChunk rows holding the body; 0: not known (counted when read), or stored
    stored_body_id: int | None = None  # set: the body is an object of the body storage

    @classmethod
    def of(cls, message) -> BodyRef:
        """The location of a ``Message`` instance's body, from its fields."""
        return cls(*(getattr(message, "pk" if name == "id" else name) for name in REF_FIELDS))


# The message row's fields a ``BodyRef`` is made of, in order.
REF_FIELDS = ("id", "chunk_count", "stored_body_id")


class BodyStore:
    """Interface: save a message's bytes, read them back in chunks, delete them.

    Every method that writes runs inside the caller's transaction and writes nothing to a socket; reads run
    each query on its own (autocommit), so no transaction stays open while the caller sends what it read.
    """

    def stage(self, data: bytes) -> object:
        """Before the delivery's transaction: whatever can be done outside it (an object store writes the
        object here, before any row refers to it). The result is passed to ``save()`` as ``staged``."""
        return None

    def save(self, message, data: bytes, staged: object = None) -> None:
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
        """Let go of the bodies of these messages (whichever store holds them), inside the caller's
        transaction, before the message rows are deleted: see ``release_bodies``."""
        release_bodies(list(message_ids))

    def read_chunks(self, message) -> Iterator[bytes]:
        """The body of a message (a ``Message`` or its id: admin views, export, tests), from the store that
        holds it. For an id the location is looked up when the first chunk is asked for, so
        ``MessageExpunged`` comes from ``next()``, as from ``read()``."""
        return read_message(message)


# The database store ---------------------------------------------------------------------------------------
class _ChunkSql:
    """The chunk queries in a connection's dialect, built once per connection alias (table and column
    names quoted by the backend): ``%s`` placeholders for Django's cursors, and the driver's own
    (``native``) for its cursor."""

    __slots__ = ("_first", "_qmark", "_stored_of", "by_seq", "count", "first_of", "native", "stored")

    def __init__(self, alias: str):
        from popserver.models import MessageChunk

        connection = connections[alias]
        quote = connection.ops.quote_name
        meta = MessageChunk._meta
        table = quote(meta.db_table)
        message, seq, data = (quote(meta.get_field(name).column) for name in ("message", "seq", "data"))
        self.by_seq = f"SELECT {data} FROM {table} WHERE {message} = %s AND {seq} = %s"
        self.count = f"SELECT COUNT(*) FROM {table} WHERE {message} = %s"
        # The object of a stored body, through its message (so a deleted message is seen as gone).
        from popserver.models import Message, StoredBody

        m_table, b_table = quote(Message._meta.db_table), quote(StoredBody._meta.db_table)
        m_id, m_ref = (quote(Message._meta.get_field(n).column) for n in ("id", "stored_body"))
        b_id, b_sha, b_size = (quote(StoredBody._meta.get_field(n).column) for n in ("id", "sha256", "size"))
        self.stored = (
            f"SELECT b.{b_sha}, b.{b_size} FROM {m_table} m JOIN {b_table} b ON b.{b_id} = m.{m_ref} "
            f"WHERE m.{m_id} = %s"
        )
        self._stored_of = (
            f"SELECT m.{m_id}, b.{b_sha}, b.{b_size} FROM {m_table} m JOIN {b_table} b ON b.{b_id} = m.{m_ref} "
            f"WHERE m.{m_id} IN "
        )
        # The same in the driver's style: sqlite3 takes "?"; psycopg and the MySQL drivers take "%s".
        self._qmark = connection.vendor == "sqlite"
        self.native: dict[str, str] = {}
        for query in (self.by_seq, self.count, self.stored):
            self._add_native(query)
        # first_chunks(n): the first chunks of n messages, for read_small(); one string per n, kept.
        self.first_of: dict[int, str] = {}
        self._first = f"SELECT {message}, {data} FROM {table} WHERE {seq} = 0 AND {message} IN "

    def _add_native(self, query: str) -> None:
        self.native[query] = query.replace("%s", "?") if self._qmark else query

    def stored_of(self, count: int) -> str:
        """(message id, sha256, size) of the stored bodies of ``count`` messages."""
        query = self.first_of.get(-count)
        if query is None:
            query = self._stored_of + "(" + ", ".join(["%s"] * count) + ")"
            self._add_native(query)
            self.first_of[-count] = query
        return query

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

    def save(self, message, data: bytes, staged: object = None) -> None:
        from popserver.models import MessageChunk

        size = get_setting("BODY_CHUNK_SIZE")
        parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
        message.chunk_count = len(parts)
        message.stored_body_id = None
        _save_message(message, ["chunk_count", "stored_body"])
        MessageChunk.objects.bulk_create(
            [MessageChunk(message=message, seq=seq, data=part) for seq, part in enumerate(parts)],
            batch_size=1,  # one row per statement: MariaDB's packet limit
        )

    def read(self, ref: BodyRef) -> Iterator[bytes]:
        message_id, count = ref.message_id, ref.chunk_count
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


def _save_message(message, fields: list[str]) -> None:
    if message.pk is None:
        message.save(force_insert=True)
    else:
        message.save(update_fields=fields)


# The storage store ----------------------------------------------------------------------------------------
class Staged(NamedTuple):
    sha256: str
    size: int


def object_name(sha256: str) -> str:
    """An object's name in the body storage: sharded by the first octets of its hash (``ab/cd/abcd...``)."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


def body_storage():
    """The Django storage that holds stored bodies: ``STORAGES[POPSERVER_BODY_STORAGE]``, never a fallback."""
    from django.core.files.storage import storages

    return storages[get_setting("BODY_STORAGE")]


class DjangoStorageBodyStore(BodyStore):
    """Bodies as objects of a Django storage, once per content (issue 21).

    Delivery (``stage`` then ``save``): hash the bytes, write the object unless it exists (before the
    transaction, so a crash leaves at most an object nothing refers to, never a row without its object);
    then, in the delivery's transaction, lock or create the ``StoredBody`` row, count the new reference and
    point the message at it. A row that had no references (its object may have been removed meanwhile) gets
    its object written again if it is missing. Objects are removed only under their row's lock, with no
    references left (``remove_unreferenced``, after the deleting transaction commits, or ``popgc``).

    Reads stream in ``READ_SIZE`` pieces: range requests where the storage has them (django-storages' S3),
    else ``open()`` and ``read(n)``, so memory stays flat whatever the size.
    """

    READ_SIZE = 1024 * 1024
    using = DEFAULT_DB_ALIAS

    # Writing ----------------------------------------------------------------------------------------------
    def stage(self, data: bytes) -> Staged:
        staged = Staged(hashlib.sha256(data).hexdigest(), len(data))
        name = object_name(staged.sha256)
        storage = body_storage()
        if not storage.exists(name):
            write_object(storage, name, data)
        return staged

    def save(self, message, data: bytes, staged: object = None) -> None:
        if not isinstance(staged, Staged):
            staged = self.stage(data)
        pk, refs = upsert_body(staged.sha256, staged.size, add=1)
        found = (pk, refs - 1)  # the references it had before this one
        if found[1] == 0:
            # No reference before this one: its object may have been removed (or its removal crashed).
            storage = body_storage()
            name = object_name(staged.sha256)
            if not storage.exists(name):
                write_object(storage, name, data)
        message.chunk_count = 0
        message.stored_body_id = found[0]
        _save_message(message, ["chunk_count", "stored_body"])

    # Reading ----------------------------------------------------------------------------------------------
    def read_small(self, refs: Sequence[BodyRef]) -> dict[int, bytes]:
        """Small stored bodies for pipelined commands: their names in one query, then each object whole. One
        that cannot be read is left out (its ``read()`` says why, when its command runs)."""
        ids = [ref.message_id for ref in refs if ref.stored_body_id is not None]
        if not ids:
            return {}
        rows = run_query(self.using, chunk_sql(self.using).stored_of(len(ids)), ids, many=True)
        storage = body_storage()
        bodies = {}
        for message_id, sha256, size in rows:
            try:
                data = b"".join(read_object(storage, object_name(sha256), size, max(size, 1)))
            except Exception:  # noqa: BLE001 - left to read(), which reports it
                continue
            if len(data) == size:
                bodies[message_id] = data
        return bodies

    def read(self, ref: BodyRef) -> Iterator[bytes]:
        row = run_query(self.using, chunk_sql(self.using).stored, (ref.message_id,))
        if row is None:
            raise MessageExpunged(ref.message_id)
        sha256, size = row
        name = object_name(sha256)
        sent = 0
        try:
            for piece in read_object(body_storage(), name, size, self.READ_SIZE):
                sent += len(piece)
                yield piece
                del piece
        except BodyUnavailable:
            raise
        except Exception as exc:  # OSError, the storage's client errors: the message stays
            raise BodyUnavailable(f"stored body {name} of message {ref.message_id}: {exc!r}") from exc
        if sent != size:
            raise BodyUnavailable(
                f"stored body {name} of message {ref.message_id}: {sent} octets, not {size}"
            )


def upsert_body(sha256: str, size: int, *, add: int, using: str = DEFAULT_DB_ALIAS) -> tuple[int, int]:
    """Create the ``StoredBody`` row of this content with ``add`` references, or add them to the existing
    one, in one statement that leaves the row locked until the transaction ends; returns (pk, refs now).

    One upsert (PostgreSQL and SQLite: ``ON CONFLICT ... DO UPDATE``; MariaDB: ``ON DUPLICATE KEY UPDATE``)
    rather than a look-up and an insert: two deliveries of the same new content then queue on the row's
    lock instead of deadlocking on gap locks or on shared locks taken by a duplicate-key check."""
    from django.utils import timezone

    from popserver.models import StoredBody

    connection = connections[using]
    quote = connection.ops.quote_name
    meta = StoredBody._meta
    table = quote(meta.db_table)
    sha, size_, refs, created = (
        quote(meta.get_field(n).column) for n in ("sha256", "size", "refs", "created_at")
    )
    insert = f"INSERT INTO {table} ({sha}, {size_}, {refs}, {created}) VALUES (%s, %s, %s, %s) "
    if connection.vendor == "mysql":
        insert += f"ON DUPLICATE KEY UPDATE {refs} = {refs} + %s"
    else:
        insert += f"ON CONFLICT ({sha}) DO UPDATE SET {refs} = {table}.{refs} + %s"
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    with connection.cursor() as cursor:
        cursor.execute(insert, [sha256, size, add, now, add])
    return StoredBody.objects.using(using).filter(sha256=sha256).values_list("pk", "refs").get()


def write_object(storage, name: str, data: bytes) -> None:
    """Write an object whole. On a local file system: a temporary file, fsync, then an atomic rename, so a
    reader never sees it half written (and two writers of the same content cannot clash)."""
    path = local_path(storage, name)
    if path is not None:
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        fd, temporary = tempfile.mkstemp(prefix=".incoming-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temporary, 0o640)
            os.replace(temporary, path)
        except BaseException:
            with suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_directory(directory)
        return
    from django.core.files.base import ContentFile

    saved = storage.save(name, ContentFile(data))
    if saved != name:  # a storage that does not overwrite gave it another name: the object was there
        storage.delete(saved)


def read_object(storage, name: str, size: int, piece: int) -> Iterator[bytes]:
    """The object's bytes in pieces of ``piece`` octets: range requests on django-storages' S3, else the
    storage's file object. ``BodyUnavailable`` if it is missing."""
    bucket = getattr(storage, "bucket", None)
    normalize = getattr(storage, "_normalize_name", None)
    if bucket is not None and normalize is not None:  # django-storages' S3Storage
        from storages.utils import clean_name

        s3_object = bucket.Object(normalize(clean_name(name)))
        for start in range(0, size, piece):
            end = min(start + piece, size) - 1
            yield s3_object.get(Range=f"bytes={start}-{end}")["Body"].read()
        return
    try:
        handle = storage.open(name, "rb")
    except FileNotFoundError as exc:
        raise BodyUnavailable(f"stored body {name} is missing") from exc
    with handle:
        while data := handle.read(piece):
            yield data
            del data


def local_path(storage, name: str) -> str | None:
    from django.core.files.storage import FileSystemStorage

    return storage.path(name) if isinstance(storage, FileSystemStorage) else None


def _fsync_directory(directory: str) -> None:
    with suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def probe_body_storage() -> str:
    """Write, read back and delete a probe object in the body storage; returns what failed ("" if nothing)."""
    import secrets

    name = f"probe/.popserver-probe-{secrets.token_hex(8)}"
    data = b"popserver probe\r\n"
    try:
        storage = body_storage()
        write_object(storage, name, data)
        try:
            if b"".join(read_object(storage, name, len(data), 1024)) != data:
                return f"{name} did not read back as written"
        finally:
            storage.delete(name)
    except Exception as exc:  # the storage's own errors: permissions, credentials, network
        return f"{exc.__class__.__name__}: {exc}"
    return ""


# Deleting ------------------------------------------------------------------------------------------------
def release_bodies(message_ids: list[int]) -> None:
    """Before these message rows are deleted, in the same transaction: drop their chunks and count their
    stored bodies' references down; objects left with none are removed once the transaction commits."""
    from popserver.models import Message, MessageChunk

    if not message_ids:
        return
    counts = Counter(
        Message.objects.filter(id__in=message_ids, stored_body__isnull=False).values_list(
            "stored_body_id", flat=True
        )
    )
    count_down(counts)
    MessageChunk.objects.filter(message_id__in=message_ids).delete()


def count_down(counts: Counter[int] | dict[int, int]) -> None:
    """Take ``counts[pk]`` references off each of these stored bodies, inside the caller's transaction;
    those left with none are removed once it commits (``remove_unreferenced``)."""
    from popserver.models import StoredBody

    if not counts:
        return
    # Row locks in one order, so two deletions sharing bodies cannot deadlock.
    list(StoredBody.objects.select_for_update().filter(pk__in=sorted(counts)).order_by("pk").values("pk"))
    by_count: dict[int, list[int]] = defaultdict(list)
    for pk, count in counts.items():
        by_count[count].append(pk)
    for count, pks in by_count.items():
        # Never below 0, whatever other code did; popgc recounts.
        StoredBody.objects.filter(pk__in=pks).update(refs=Greatest(F("refs") - count, Value(0)))
    unreferenced = list(StoredBody.objects.filter(pk__in=list(counts), refs=0).values_list("pk", flat=True))
    if unreferenced:
        transaction.on_commit(partial(remove_unreferenced, unreferenced), robust=True)


def release_mailbox_bodies(sender, instance, using, **kwargs) -> None:
    """``pre_delete`` of a Mailbox (its user deleted, the admin): its messages go by cascade, inside the
    same transaction; their stored bodies' references are counted down first."""
    from popserver.models import Message

    ids = iter(Message.objects.using(using).filter(mailbox_id=instance.pk).values_list("pk", flat=True))
    while batch := list(islice(ids, 500)):
        release_bodies(batch)


def remove_unreferenced(body_ids: Iterable[int]) -> int:
    """Remove the objects (and rows) of these stored bodies that have no reference; returns how many went.

    Each one under its row's lock, in a short transaction of its own: a delivery that wants the same
    content waits for it and then finds no row (it writes the object again), or comes first and the
    removal finds a reference and leaves it. A missing object is fine (a removal that crashed halfway)."""
    from popserver.models import StoredBody

    removed = 0
    storage = None
    for pk in body_ids:
        try:
            with one_writer(), transaction.atomic():
                row = (
                    StoredBody.objects.select_for_update().filter(pk=pk, refs=0).values_list("sha256").first()
                )
                if row is None:
                    continue
                if storage is None:
                    storage = body_storage()
                storage.delete(object_name(row[0]))
                StoredBody.objects.filter(pk=pk, refs=0).delete()
            removed += 1
        except Exception:
            logger.exception("could not remove stored body %s (popgc will)", pk)
    return removed


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


_storage_store = DjangoStorageBodyStore()


def store_for(ref: BodyRef) -> BodyStore:
    """The store that holds this body."""
    return _database_store if ref.stored_body_id is None else _storage_store


def read_body(ref: BodyRef) -> Iterator[bytes]:
    """The body's bytes in chunks, from the store that holds it (see ``BodyStore.read``)."""
    return store_for(ref).read(ref)


def read_small_bodies(refs: Sequence[BodyRef]) -> dict[int, bytes]:
    """Whole bodies of small messages by message id, in as few queries as their stores allow."""
    if not refs:
        return {}
    bodies = _database_store.read_small(refs)
    if any(ref.stored_body_id is not None for ref in refs):
        bodies.update(_storage_store.read_small(refs))
    return bodies


def read_message(message) -> Iterator[bytes]:
    """The body of a message (a ``Message`` or its id), from the store that holds it. A body moved to the
    other store (``popmovebodies``) between looking its location up and reading it is looked up again."""
    ref = BodyRef.of(message) if hasattr(message, "pk") else body_ref(message)
    started = False
    try:
        for chunk in read_body(ref):
            started = True
            yield chunk
    except MessageExpunged:
        if started:
            raise
        current = body_ref(ref.message_id)  # raises MessageExpunged if the message is gone
        if current == ref:
            raise
        yield from read_body(current)


def body_ref(message_id: int) -> BodyRef:
    """The location of one message's body, looked up by its id; ``MessageExpunged`` if there is none."""
    from popserver.models import Message

    row = Message.objects.filter(pk=message_id).values_list(*REF_FIELDS).first()
    if row is None:
        raise MessageExpunged(message_id)
    return BodyRef(*row)
