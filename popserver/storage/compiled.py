"""Querysets whose SQL is compiled once: the hot paths of delivery (LMTP's recipient look-up, the mailbox row
a delivery locks), where Django building and compiling the same queryset again for every message was most of
the CPU a delivery cost.

``CompiledQuery(build)`` calls ``build(*placeholders)`` once per (database, vendor, user model), compiles it,
and then runs the SQL with the real values put where the placeholders were, on a Django cursor (so query
logging, counting and error wrapping still see it). ``instances()`` makes rows into model instances as
Django's ``ModelIterable`` does (converters, ``select_related``, annotations); ``rows()`` gives them as they
come, converted.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Iterator

from django.contrib.auth import get_user_model
from django.db import connections, router
from django.db.models.query import get_related_populators
from django.db.models.sql import UpdateQuery

# Values no real query parameter takes (ids are positive, names have no NUL).
STRING_PLACEHOLDERS = tuple(f"\x00popserver-placeholder-{n}" for n in range(4))
NUMBER_PLACEHOLDERS = tuple(-7_000_001 - n for n in range(4))


class Update:
    """What ``build`` returns for an UPDATE: ``queryset.update(**values)``, not run."""

    def __init__(self, queryset, **values):
        self.query = queryset.query.chain(UpdateQuery)
        self.query.add_update_values(values)


class CompiledQuery:
    def __init__(self, build: Callable, *, model, kinds: tuple[type, ...] = (str,), write: bool = False):
        """``build(*values)`` returns the queryset (or ``Update``) for ``values``; ``kinds`` says which are
        strings (str) and which numbers (int), for their placeholders; ``model`` routes the query
        (``db_for_write`` when ``write``: an UPDATE or a SELECT ... FOR UPDATE)."""
        self.build, self.model, self.kinds, self.write = build, model, kinds, write
        self._compiled: dict[tuple, tuple] = {}
        self._guard = threading.Lock()

    def _compile(self, alias: str):
        connection = connections[alias]
        key = (alias, connection.vendor, get_user_model()._meta.label)
        compiled = self._compiled.get(key)
        if compiled is None:
            placeholders = [
                (STRING_PLACEHOLDERS if kind is str else NUMBER_PLACEHOLDERS)[n]
                for n, kind in enumerate(self.kinds)
            ]
            compiler = self.build(*placeholders).query.get_compiler(using=alias)
            sql, params = compiler.as_sql()
            # Where each parameter comes from: (a value's index, its type: e.g. psycopg's Int8 wraps an int),
            # or None for a constant of the query.
            where = tuple(
                (placeholders.index(p), type(p))
                if isinstance(p, str | int) and not isinstance(p, bool) and p in placeholders
                else None
                for p in params
            )
            if sorted({n for n, _ in filter(None, where)}) != list(range(len(placeholders))):
                raise ValueError("a value of the query is not among its parameters")  # a bug: never silent
            compiled = (compiler, sql, params, where)
            with self._guard:
                self._compiled[key] = compiled
        return connection, compiled

    def _execute(self, values, fetch: bool = True) -> tuple:
        alias = (router.db_for_write if self.write else router.db_for_read)(self.model)
        connection, (compiler, sql, params, where) = self._compile(alias)
        bound = [p if w is None else w[1](values[w[0]]) for p, w in zip(params, where, strict=True)]
        with connection.cursor() as cursor:
            cursor.execute(sql, bound)
            if not fetch:
                return cursor.rowcount
            fetched = cursor.fetchall()
        if fetched:
            compiler = copy.copy(compiler)
            compiler.connection = connection  # this thread's, for the converters
        return compiler, fetched, alias

    def rows(self, *values) -> list:
        compiler, fetched, _ = self._execute(values)
        return list(compiler.results_iter(results=[fetched])) if fetched else []

    def execute(self, *values) -> int:
        """Run an ``Update``: the number of rows it changed."""
        return self._execute(values, fetch=False)

    def instances(self, *values) -> list:
        compiler, fetched, alias = self._execute(values)
        return list(_instances(compiler, fetched, alias)) if fetched else []


def _instances(compiler, rows: list, alias: str) -> Iterator:
    """Model instances from ``rows`` of ``compiler``'s query (``django.db.models.query.ModelIterable``)."""
    select, klass_info = compiler.select, compiler.klass_info
    fields = klass_info["select_fields"]
    start, end = fields[0], fields[-1] + 1
    init_list = [column[0].target.attname for column in select[start:end]]
    populators = get_related_populators(klass_info, select, alias)
    for row in compiler.results_iter(results=[rows]):
        instance = klass_info["model"].from_db(alias, init_list, row[start:end])
        for populator in populators:
            populator.populate(row, instance)
        for name, position in compiler.annotation_col_map.items():
            setattr(instance, name, row[position])
        yield instance
