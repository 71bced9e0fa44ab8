"""Querysets whose SQL is compiled once: the hot paths of delivery (LMTP's recipient look-up, the mailbox row
a delivery locks), where Django building and compiling the same queryset again for every message was most of
the CPU a delivery cost.

``CompiledQuery(build)`` calls ``build(*placeholders)`` once per (database, vendor, user model, USE_TZ),
compiles it, and then runs the SQL with the real values put where the placeholders were (``run``: prepared on
PostgreSQL, on a Django cursor elsewhere and whenever queries are logged or wrapped, with Django's error
wrapping either way). ``instances()`` makes rows into model instances as
Django's ``ModelIterable`` does (converters, ``select_related``, annotations); ``rows()`` gives them as they
come, converted; ``execute()`` runs an ``Update`` or a ``Delete``. ``CompiledInsert`` does the same for the
INSERT of one row.

The same hot paths serve every POP3 login and QUIT (the throttle's look-up, the lock, the snapshot, the
audit rows): built by the ORM each time, a statement cost about 0.4 ms of CPU against 0.03 ms run from its
compiled SQL on a Django cursor (SQLite, this project's 2-core machine).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connections, router, transaction
from django.db.models.query import get_related_populators
from django.db.models.signals import post_save, pre_save
from django.db.models import CharField
from django.db.models.sql import DeleteQuery, InsertQuery, UpdateQuery
from django.db.models.sql.compiler import SQLDeleteCompiler, SQLUpdateCompiler

from ..conf import get_setting

# Values no real query parameter takes (ids are positive, names have no NUL, no time is in the year 1001).
PLACES = 12
STRING_PLACEHOLDERS = tuple(f"\x00popserver-placeholder-{n}" for n in range(PLACES))
NUMBER_PLACEHOLDERS = tuple(-7_000_001 - n for n in range(PLACES))
DATETIME_PLACEHOLDERS = tuple(datetime(1001, 1, 1, 0, 0, n, 123457, tzinfo=UTC) for n in range(PLACES))
NAIVE_DATETIME_PLACEHOLDERS = tuple(p.replace(tzinfo=None) for p in DATETIME_PLACEHOLDERS)  # USE_TZ = False


def _placeholders(kind: type, n: int):
    # Times as the site keeps them: aware with USE_TZ, naive without (Django refuses the other).
    if kind is datetime:
        return (DATETIME_PLACEHOLDERS if settings.USE_TZ else NAIVE_DATETIME_PLACEHOLDERS)[n]
    return (STRING_PLACEHOLDERS if kind is str else NUMBER_PLACEHOLDERS)[n]


def _as_is(value, connection):
    return value


def _as_datetime(value, connection):
    """A time as the database's DateTimeField columns take it (SQLite and MySQL: text in UTC)."""
    return connection.ops.adapt_datetimefield_value(value)


class Update:
    """What ``build`` returns for an UPDATE: ``queryset.update(**values)``, not run."""

    def __init__(self, queryset, **values):
        self.query = queryset.query.chain(UpdateQuery)
        self.query.add_update_values(values)


class Delete:
    """What ``build`` returns for a DELETE of the rows themselves: no cascade, no signals (Django's
    ``QuerySet._raw_delete``); for tables nothing refers to."""

    def __init__(self, queryset):
        self.query = queryset.query.chain(DeleteQuery)


class CompiledQuery:
    def __init__(self, build: Callable, *, model, kinds: tuple[type, ...] = (str,), write: bool = False):
        """``build(*values)`` returns the queryset (or ``Update``, ``Delete``) for ``values``; ``kinds`` says
        which are strings (str), numbers (int) and aware times (datetime), for their placeholders; ``model``
        routes the query (``db_for_write`` when ``write``: an UPDATE, a DELETE or a SELECT ... FOR UPDATE)."""
        self.build, self.model, self.kinds, self.write = build, model, kinds, write
        self._compiled: dict[tuple, tuple] = {}
        self._guard = threading.Lock()

    def _compile(self, alias: str):
        connection = connections[alias]
        # The look-up's SQL names the user table; times are compiled as the site keeps them.
        key = (alias, connection.vendor, settings.AUTH_USER_MODEL, settings.USE_TZ)
        compiled = self._compiled.get(key)
        if compiled is None:
            placeholders = [_placeholders(kind, n) for n, kind in enumerate(self.kinds)]
            compiler = self.build(*placeholders).query.get_compiler(using=alias)
            sql, params = compiler.as_sql()
            # Where each parameter comes from: (a value's index, how to convert it: e.g. psycopg's Int8 wraps
            # an int, SQLite stores a time as text), or None for a constant of the query.
            as_text = {
                connection.ops.adapt_datetimefield_value(p): n
                for n, p in enumerate(placeholders)
                if isinstance(p, datetime)
            }
            where = tuple(_origin(p, placeholders, as_text) for p in params)
            if sorted({n for n, _ in filter(None, where)}) != list(range(len(placeholders))):
                raise ValueError("a value of the query is not among its parameters")  # a bug: never silent
            compiled = (compiler, sql, params, where)
            with self._guard:
                self._compiled[key] = compiled
        return connection, compiled

    def _bind(self, values) -> tuple:
        alias = (router.db_for_write if self.write else router.db_for_read)(self.model)
        connection, (compiler, sql, params, where) = self._compile(alias)
        bound = [
            p if w is None else w[1](values[w[0]], connection) for p, w in zip(params, where, strict=True)
        ]
        return alias, connection, compiler, sql, bound

    def statement(self, *values) -> Statement:
        """The statement with ``values`` bound, not run: for ``at_once`` (an ``Update`` or a ``Delete`` with a
        WHERE clause can be a write there)."""
        _, connection, compiler, sql, bound = self._bind(values)
        guarded = None
        if isinstance(compiler, SQLUpdateCompiler | SQLDeleteCompiler) and " WHERE " in sql:
            guarded = (
                f"{sql} AND EXISTS (SELECT 1 FROM {_CHANGED})"  # Django's WHERE is one parenthesised term
            )
        return Statement(
            connection, sql, bound, guarded, lambda rows: self._convert(connection, compiler, rows)
        )

    def _execute(self, values, fetch: bool = True) -> tuple:
        alias, connection, compiler, sql, bound = self._bind(values)
        fetched = run(connection, sql, bound, fetch)
        if not fetch:
            return fetched
        if not fetched:
            return compiler, fetched, alias
        return self._converters(connection, compiler)[0], self._convert(connection, compiler, fetched), alias

    def _convert(self, connection, compiler, fetched: list) -> list:
        compiler, converters = self._converters(connection, compiler)
        if converters:  # as compiler.results_iter() does, without finding the converters again each time
            fetched = list(map(tuple, compiler.apply_converters(fetched, converters)))
        return fetched

    def _converters(self, connection, compiler) -> tuple:
        """The compiler bound to this thread's connection and the converters of its columns (the database's
        and the fields', e.g. a time from the database's text), found once per thread."""
        kept = getattr(_converters, "kept", None)
        if kept is None:
            kept = _converters.kept = {}
        key = (self, compiler, connection)  # the compiler itself: kept alive, its id never reused
        found = kept.get(key)
        if found is None:
            bound = copy.copy(compiler)
            bound.connection = connection
            found = kept[key] = (bound, bound.get_converters([c[0] for c in bound.select[: bound.col_count]]))
        return found

    def rows(self, *values) -> list:
        _, fetched, _ = self._execute(values)
        return fetched

    def execute(self, *values) -> int:
        """Run an ``Update`` or a ``Delete``: the number of rows it changed."""
        return self._execute(values, fetch=False)

    def instances(self, *values) -> list:
        compiler, fetched, alias = self._execute(values)
        return list(_instances(compiler, fetched, alias)) if fetched else []


def _origin(param, placeholders: list, as_text: dict) -> tuple[int, Callable] | None:
    """Which value ``param`` stands for, and how that value is converted; None: a constant of the query."""
    if isinstance(param, bool):
        return None
    if isinstance(param, str | int | datetime) and param in placeholders:
        kind = type(param)
        return placeholders.index(param), (_as_is if kind is datetime else lambda value, _: kind(value))
    if isinstance(param, str) and param in as_text:
        return as_text[param], _as_datetime
    return None


class CompiledInsert:
    """The INSERT of one row of ``model`` with ``fields`` (attribute names, e.g. ``mailbox_id``), compiled once
    per database; ``insert(**values)`` runs it, each value prepared by its field as ``Model.save()`` would.

    Inside a transaction the row goes in behind a savepoint of its own, so that a row that cannot be written
    undoes itself alone (``savepoint=True``, as ``atomic()`` would). A model with ``pre_save`` or ``post_save``
    receivers is saved the ORM's way, so that a site's receivers (and the tests' injected failures) still run;
    no primary key is read back."""

    def __init__(self, model, fields: tuple[str, ...]):
        self.model = model
        self.fields = tuple(model._meta.get_field(name) for name in fields)
        self._compiled: dict[str, str] = {}
        self._guarded: dict[str, str] = {}

    def statement(self, **values) -> Statement | None:
        """The INSERT with ``values`` bound, not run, for ``at_once``; None for a model with save receivers
        (``insert`` saves those the ORM's way)."""
        model = self.model
        if pre_save.has_listeners(model) or post_save.has_listeners(model):
            return None
        alias = router.db_for_write(model)
        connection = connections[alias]
        guarded = self._guarded.get(alias)
        if guarded is None:
            # One row if the UPDATE changed one.
            guarded = self._guarded[alias] = insert_select(model, self.fields, connection, f"FROM {_CHANGED}")
        params = self._params(values, connection)
        return Statement(connection, self._sql(alias), params, guarded)

    def _sql(self, alias: str) -> str:
        sql = self._compiled.get(alias)
        if sql is None:
            query = InsertQuery(self.model)
            query.insert_values(self.fields, [self.model()])
            ((sql, _),) = query.get_compiler(using=alias).as_sql()
            self._compiled[alias] = sql
        return sql

    def _params(self, values: dict, connection) -> list:
        return [field.get_db_prep_save(values[field.attname], connection) for field in self.fields]

    def insert(self, *, savepoint: bool = True, **values) -> None:
        model = self.model
        alias = router.db_for_write(model)
        connection = connections[alias]
        guarded = savepoint and connection.in_atomic_block
        if pre_save.has_listeners(model) or post_save.has_listeners(model):
            with transaction.atomic(using=alias) if guarded else nullcontext():
                model._base_manager.db_manager(alias).create(**values)
            return
        sql, params = self._sql(alias), self._params(values, connection)
        if guarded:
            _behind_savepoint(connection, sql, params)
        else:
            run(connection, sql, params, fetch=False)


_SAVEPOINT = "popserver_row"


def _behind_savepoint(connection, sql: str, params: list) -> None:
    """``sql`` inside a savepoint of the caller's transaction: on PostgreSQL with client-side binding (Django's
    default) the savepoint, the insert and its release go in ONE round trip (Django's ``atomic()`` takes three,
    and its bookkeeping cost as much CPU as the insert). A failed insert is undone to the savepoint and
    raised; if even that fails the transaction is lost: marked for rollback (``atomic()`` then rolls it back)
    and raised."""
    ops = connection.ops
    begin, release = ops.savepoint_create_sql(_SAVEPOINT), ops.savepoint_commit_sql(_SAVEPOINT)
    one_round_trip = connection.vendor == "postgresql" and (
        connection.settings_dict["OPTIONS"].get("server_side_binding") is not True
    )
    try:
        with connection.cursor() as cursor:
            if one_round_trip:
                cursor.execute(f"{begin}; {sql}; {release}", params)
            else:
                cursor.execute(begin)
                cursor.execute(sql, params)
                cursor.execute(release)
    except DatabaseError:
        try:
            with connection.cursor() as cursor:
                cursor.execute(ops.savepoint_rollback_sql(_SAVEPOINT))
                cursor.execute(release)
        except DatabaseError:
            transaction.set_rollback(True, using=connection.alias)
        raise


def insert_select(model, fields, connection, rest: str) -> str:
    """``INSERT INTO`` ``model``'s table (``fields``) ``SELECT %s, ...`` followed by ``rest`` (a FROM, a WHERE):
    one row of the given values where ``rest`` lets one through. Each value is cast to its column's type (a
    parameter in a SELECT list has none of its own: an address, a time), text without its length, so that a
    value too long fails as the INSERT of it would, never cut short."""
    quote = connection.ops.quote_name
    columns = ", ".join(quote(field.column) for field in fields)
    values = ", ".join(f"%s::{_cast_type(field, connection)}" for field in fields)
    return f"INSERT INTO {quote(model._meta.db_table)} ({columns}) SELECT {values} {rest}"


def _cast_type(field, connection) -> str:
    if isinstance(field, CharField):
        return connection.ops.cast_char_field_without_max_length
    return field.cast_db_type(connection)


# The name ``at_once`` gives the rows its UPDATE changed, for the writes that depend on it.
_CHANGED = "popserver_changed"


@dataclass(frozen=True)
class Statement:
    """A compiled statement with its values bound, not run (``CompiledQuery.statement``,
    ``CompiledInsert.statement``). ``guarded``: the same write made only if ``at_once``'s UPDATE changed a
    row (None: it cannot be a write there)."""

    connection: Any
    sql: str
    params: list
    guarded: str | None = None
    convert: Callable[[list], list] | None = None  # a select's rows as ``CompiledQuery.rows`` gives them


def at_once(
    update: Statement, writes: Sequence[Statement], select: Statement | None = None, order_by: int = 0
):
    """PostgreSQL: a conditional ``update``, the ``writes`` that go with it and a ``select`` in ONE statement
    (``WITH ... UPDATE ... RETURNING``), which outside a transaction is its own transaction: one round trip
    instead of BEGIN, each statement (with a savepoint around each audit row) and COMMIT.

    None if the UPDATE changed no row: then nothing was written. Else the rows of ``select`` ([] without
    one) as the database gives them (``select.convert`` them), ordered by its column ``order_by`` (from 1; 0:
    unordered). The writes are made only with the UPDATE's change; every part sees the database as the
    statement began (the writes touch other tables). A failure undoes the whole statement."""
    connection = update.connection
    if any(statement.connection is not connection for statement in (*writes, *filter(None, [select]))):
        raise ValueError("at_once needs every statement on one database")  # a bug: callers check first
    parts = [f"{_CHANGED} AS ({update.sql} RETURNING 1)"]
    params = list(update.params)
    for n, write in enumerate(writes):
        if write.guarded is None:
            raise ValueError(f"not a write at_once can make: {write.sql}")  # a bug: never silent
        parts.append(f"popserver_write{n} AS ({write.guarded})")
        params += write.params
    sql = "WITH " + ", ".join(parts)
    if select is None:
        sql += f" SELECT count(*) FROM {_CHANGED}"
    else:
        # One row at least (the count), with the select's rows (each marked) when the UPDATE changed one; the
        # condition inside the subquery lets PostgreSQL skip the select when it did not.
        sql += (
            f" SELECT changed.n, selected.* FROM (SELECT count(*) AS n FROM {_CHANGED}) changed"
            f" LEFT JOIN LATERAL (SELECT 1 AS popserver_row, s.* FROM ({select.sql}) s WHERE changed.n > 0)"
            " selected ON true"
        )
        if order_by:
            sql += f" ORDER BY {order_by + 2}"
        params += select.params
    rows = run(connection, sql, params, fetch=True)
    if not rows[0][0]:
        return None
    return [] if select is None else [row[2:] for row in rows if row[1] is not None]


def can_do_at_once(connection) -> bool:
    """``at_once`` is for PostgreSQL (data-modifying WITH), in autocommit outside a transaction (the statement
    is one)."""
    return (
        connection.vendor == "postgresql" and not connection.in_atomic_block and connection.get_autocommit()
    )


_prepared = threading.local()  # alias -> (psycopg's connection, a server-binding cursor of it)
_converters = threading.local()  # kept: (query, compiler, connection) -> (compiler bound to it, converters)


def run(connection, sql: str, params: list, fetch: bool):
    """Run a compiled statement: its rows (``fetch``) or the number of rows it changed.

    On PostgreSQL with psycopg 3 the statement is bound on the server and prepared on its first run on each
    connection (the pool keeps them): PostgreSQL then neither parses nor plans it again, which was a third of
    its CPU per POP3 session. Django's own cursors bind on the client, so every statement is planned anew.
    Through a Django cursor where ``prepared_cursor`` gives none; Django's error wrapping either way."""
    try:
        cursor = _kept_prepared_cursor(connection)
        if cursor is not None:
            connection.validate_no_broken_transaction()  # as Django's cursors do
            with connection.wrap_database_errors:
                cursor.execute(sql, params, prepare=True)
                return list(cursor.fetchall()) if fetch else cursor.rowcount
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if fetch else cursor.rowcount
    except DatabaseError:
        # As the ORM's writes do (mark_for_rollback_on_error): a caller that goes on after catching this can
        # never commit a transaction PostgreSQL has aborted (it would answer COMMIT with a silent ROLLBACK).
        if connection.in_atomic_block:
            transaction.set_rollback(True, using=connection.alias)
        raise


def prepared_cursor(connection):
    """A new psycopg 3 cursor of ``connection`` (connected) that binds on the server, for ``execute(...,
    prepare=True)``; None where that is not to be had (another database or driver) or not wanted: Django's
    queries are being logged or wrapped (DEBUG, tests counting queries, instrumentation must see every
    query), or POPSERVER_DB_PREPARED_STATEMENTS is off (a pooler that cannot keep prepared statements)."""
    driver = _prepared_driver(connection)
    if driver is None:
        return None
    import psycopg

    return psycopg.Cursor(driver)


def _prepared_driver(connection):
    """``connection``'s psycopg 3 connection, if statements may be prepared on it (``prepared_cursor``)."""
    if (
        connection.vendor != "postgresql"
        or connection.queries_logged
        or connection.execute_wrappers
        or not get_setting("DB_PREPARED_STATEMENTS")
    ):
        return None
    driver = connection.connection
    if driver is None:
        connection.ensure_connection()
        driver = connection.connection
    try:
        import psycopg
    except ImportError:  # psycopg2: Django's cursors
        return None
    if not isinstance(driver, psycopg.Connection):
        return None
    if driver.prepare_threshold is None:
        # Django leaves psycopg's preparing off (for PgBouncer in transaction mode); a threshold no query
        # reaches keeps it off for every statement but those prepared here on purpose.
        driver.prepare_threshold = 2**31
    return driver


def _kept_prepared_cursor(connection):
    """``prepared_cursor``, kept per thread while its connection lives (``run`` makes none per statement)."""
    driver = _prepared_driver(connection)
    if driver is None:
        return None
    kept = getattr(_prepared, connection.alias, None)
    if kept is None or kept[0] is not driver:
        kept = (driver, prepared_cursor(connection))
        setattr(_prepared, connection.alias, kept)
    return kept[1]


def _instances(compiler, rows: list, alias: str) -> Iterator:
    """Model instances from ``rows`` of ``compiler``'s query (``django.db.models.query.ModelIterable``)."""
    select, klass_info = compiler.select, compiler.klass_info
    fields = klass_info["select_fields"]
    start, end = fields[0], fields[-1] + 1
    init_list = [column[0].target.attname for column in select[start:end]]
    populators = get_related_populators(klass_info, select, alias)
    for row in rows:  # converted (CompiledQuery._execute)
        instance = klass_info["model"].from_db(alias, init_list, row[start:end])
        for populator in populators:
            populator.populate(row, instance)
        for name, position in compiler.annotation_col_map.items():
            setattr(instance, name, row[position])
        yield instance
