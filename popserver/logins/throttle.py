"""Failed-login throttling, per (login name, IP) and per IP, in storage every server process shares.

Names that do not exist are counted exactly like real ones, so the throttle reveals no accounts. A lock-out
refuses further attempts WITHOUT checking the password: a right guess during a lock-out proves nothing.

The per-(name, IP) count is exact under parallel guesses (workers, servers): each attempt is ``reserve``d,
counted as a failure before its password is checked, and a right password gives the count back
(``succeeded``, in the login's own transaction). So THROTTLE_ACCOUNT_FAILURES guesses are checked, however
many arrive at once. A clean login costs one insert before the check (``reserve``) and one delete after it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.core.cache import caches
from django.db import IntegrityError, connections, router, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.module_loading import import_string

from popserver.conf import get_setting
from popserver.exceptions import TemporaryLoginFailure
from popserver.storage.compiled import CompiledQuery, Delete, Statement, can_do_at_once, insert_select, run
from popserver.storage.writelock import one_writer

Clock = Callable[[], datetime]


def account_key(username: str, ip: str) -> str:
    return f"{username.strip().lower()[:200]}|{ip}"


class Throttle:
    """Interface. ``clock`` is injectable so tests never sleep."""

    def __init__(self, clock: Clock = timezone.now):
        self.clock = clock

    def locked_out(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        """The scope ("account" or "ip") that is locked out for this attempt, or None."""
        raise NotImplementedError

    def check_and_reserve(
        self, username: str, ip: str, *, trusted: bool
    ) -> tuple[str | None, Reservation | None]:
        """A login's first step: the scope locked out for it (then nothing is reserved), or its ``reserve``."""
        scope = self.locked_out(username, ip, trusted=trusted)
        return (scope, None) if scope else (None, self.reserve(username, ip))

    def reserve(self, username: str, ip: str) -> Reservation:
        """Admit one password check for (login name, IP), counted as a failure until ``succeeded``: atomic,
        so parallel attempts get exactly THROTTLE_ACCOUNT_FAILURES admissions. The admission that reaches
        the limit starts the lock-out at once (``Reservation.last``)."""
        raise NotImplementedError

    def failed(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        """Count a failure; returns the scope this failure locked out, if any. ``ip_only``: an attempt refused
        by an account lock-out still counts against its IP (the guessing goes on)."""
        raise NotImplementedError

    def succeeded(self, username: str, ip: str) -> None:
        """A right password resets its (login name, IP) counter (its reservation included). Called inside
        the login's transaction (the lock and the audit row): it commits with them."""
        raise NotImplementedError

    def succeeded_statement(self, username: str, ip: str) -> Statement | None:
        """``succeeded`` as a statement for the lock's one statement (``storage.lock.LockWrites``); None
        where counters are not rows of the login's database."""
        return None

    def clear(self, scope: str | None = None, key: str | None = None) -> int:
        """Lift lock-outs (all, or of one scope/key); returns how many."""
        raise NotImplementedError

    def scopes(
        self, username: str, ip: str, trusted: bool, ip_only: bool = False
    ) -> list[tuple[str, str, int]]:
        """(scope, key, limit) that apply: the whole-IP count exempts trusted networks."""
        from popserver.models import LoginThrottle

        scopes = []
        if not ip_only:
            scopes.append(
                (
                    LoginThrottle.ACCOUNT_IP,
                    account_key(username, ip),
                    get_setting("THROTTLE_ACCOUNT_FAILURES"),
                )
            )
        if not trusted:
            scopes.append((LoginThrottle.IP, ip, get_setting("THROTTLE_IP_FAILURES")))
        return scopes


@dataclass(frozen=True)
class Reservation:
    admitted: bool  # False: the account is locked out for this IP; check nothing
    last: bool = False  # this admission reached the limit: the lock-out began with it


@contextmanager
def _locked_row(scope: str, key: str, now: datetime) -> Iterator:
    """The counter row of (scope, key), row-locked in a transaction (SQLite: the writer lock). The row is
    created first, on its own: ``select_for_update().get_or_create()`` takes gap locks on MariaDB, and
    parallel first attempts then deadlock."""
    from popserver.models import LoginThrottle

    for _ in range(3):  # a right password may delete the row between the two steps
        try:
            with one_writer():
                LoginThrottle.objects.get_or_create(scope=scope, key=key, defaults={"window_started": now})
        except IntegrityError:  # made, then deleted, by others meanwhile: look again
            continue
        with one_writer(), transaction.atomic():
            row = LoginThrottle.objects.select_for_update().filter(scope=scope, key=key).first()
            if row is not None:
                yield row
                return
    raise TemporaryLoginFailure()


# The insert that does nothing when the row exists, per vendor: (statement, suffix).
_INSERT_IF_ABSENT = {
    "postgresql": ("INSERT INTO", " ON CONFLICT DO NOTHING"),
    "sqlite": ("INSERT OR IGNORE INTO", ""),
    "mysql": ("INSERT IGNORE INTO", ""),
}


def _insert_reservation(key: str, now: datetime) -> bool:
    """A fresh (account, IP) counter at one failure, in ONE autocommitted statement where the database has an
    insert-if-absent (PostgreSQL, SQLite, MariaDB/MySQL): True if this attempt made it. Elsewhere Django's
    ``get_or_create`` (a look-up, then the insert in a transaction)."""
    from popserver.models import LoginThrottle

    connection = connections[router.db_for_write(LoginThrottle)]
    forms = _INSERT_IF_ABSENT.get(connection.vendor)
    if forms is None:
        try:
            with one_writer():
                _, created = LoginThrottle.objects.get_or_create(
                    scope=LoginThrottle.ACCOUNT_IP, key=key, defaults={"window_started": now, "failures": 1}
                )
        except IntegrityError:  # made, then deleted, by parallel logins meanwhile
            return False
        return created
    quote = connection.ops.quote_name
    columns = ", ".join(quote(name) for name in ("scope", "key", "failures", "window_started"))
    sql = f"{forms[0]} {quote(LoginThrottle._meta.db_table)} ({columns}) VALUES (%s, %s, %s, %s){forms[1]}"
    params = [LoginThrottle.ACCOUNT_IP, key, 1, connection.ops.adapt_datetimefield_value(now)]
    with one_writer():  # prepared on PostgreSQL (storage/compiled.py), like the login's other statements
        return run(connection, sql, params, fetch=False) == 1


def _look_up_and_insert_reservation(scopes: list, key: str, now: datetime) -> tuple[set[str], bool]:
    """PostgreSQL: the look-up of ``DatabaseThrottle.locked_out`` and, if nothing is locked out,
    ``_insert_reservation``, in ONE statement (its own transaction): the scopes locked out, and whether this
    attempt made a fresh (account, IP) counter."""
    from popserver.models import LoginThrottle

    pairs = [value for scope, key_, _ in scopes for value in (scope, key_)]
    look_up = _locked_scopes(len(scopes), write=True).statement(now, *pairs)
    connection = look_up.connection
    sql = _look_up_and_insert_sql(connection.alias, look_up.sql)
    params = [
        *look_up.params,
        LoginThrottle.ACCOUNT_IP,
        key,
        1,
        connection.ops.adapt_datetimefield_value(now),
    ]
    rows = run(connection, sql, params, fetch=True)
    return {scope for scope, reserved in rows if not reserved}, any(reserved for _, reserved in rows)


@cache
def _look_up_and_insert_sql(alias: str, look_up: str) -> str:
    from popserver.models import LoginThrottle

    fields = [LoginThrottle._meta.get_field(name) for name in ("scope", "key", "failures", "window_started")]
    reserve = insert_select(
        LoginThrottle,
        fields,
        connections[alias],
        "WHERE NOT EXISTS (SELECT 1 FROM popserver_locked) ON CONFLICT DO NOTHING RETURNING 1",
    )
    return (
        f"WITH popserver_locked AS ({look_up}), popserver_reserved AS ({reserve})"
        " SELECT scope, false FROM popserver_locked UNION ALL SELECT NULL, true FROM popserver_reserved"
    )


# The queries of every login (compiled once, storage/compiled.py), made at first use: the models are not
# imported with this module. The look-up has one form per number of scopes that apply.
@cache
def _locked_scopes(count: int, write: bool = False) -> CompiledQuery:
    """The scopes locked out at a time, among ``count`` (scope, key) pairs: ``rows(now, scope, key, ...)``
    (``write``: on the database a reservation is written to, for ``_look_up_and_insert_reservation``)."""
    from popserver.models import LoginThrottle

    def build(now, *pairs):
        either = Q()
        for scope, key in zip(pairs[::2], pairs[1::2], strict=True):
            either |= Q(scope=scope, key=key)
        return LoginThrottle.objects.filter(either, locked_until__gt=now).values_list("scope", flat=True)

    return CompiledQuery(build, model=LoginThrottle, kinds=(datetime, *(str, str) * count), write=write)


@cache
def _give_back() -> CompiledQuery:
    """The DELETE of an (account, IP) counter: ``execute(key)``."""
    from popserver.models import LoginThrottle

    return CompiledQuery(
        lambda key: Delete(LoginThrottle.objects.filter(scope=LoginThrottle.ACCOUNT_IP, key=key)),
        model=LoginThrottle,
        write=True,
    )


class DatabaseThrottle(Throttle):
    """Counters in ``LoginThrottle`` rows, updated under a row lock (SQLite: the IMMEDIATE transaction)."""

    def locked_out(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        scopes = self.scopes(username, ip, trusted, ip_only)
        if not scopes:
            return None
        # One look-up for every scope that applies (a login's first query): the first locked one wins.
        pairs = [value for scope, key, _ in scopes for value in (scope, key)]
        locked = {row[0] for row in _locked_scopes(len(scopes)).rows(self.clock(), *pairs)}
        return next((scope for scope, _, _ in scopes if scope in locked), None)

    def check_and_reserve(
        self, username: str, ip: str, *, trusted: bool
    ) -> tuple[str | None, Reservation | None]:
        """On PostgreSQL the look-up and a fresh counter's insert go in one statement."""
        from popserver.models import LoginThrottle

        connection = connections[router.db_for_write(LoginThrottle)]
        if (
            get_setting("THROTTLE_ACCOUNT_FAILURES") <= 1
            or self._overridden("locked_out", "reserve")
            or not can_do_at_once(connection)
        ):
            return super().check_and_reserve(username, ip, trusted=trusted)
        scopes = self.scopes(username, ip, trusted)
        if not scopes:  # a site's scopes(): nothing to look up
            return super().check_and_reserve(username, ip, trusted=trusted)
        now = self.clock()
        key = account_key(username, ip)
        locked, reserved = _look_up_and_insert_reservation(scopes, key, now)
        scope = next((scope for scope, _, _ in scopes if scope in locked), None)
        if scope:
            return scope, None
        return None, Reservation(admitted=True) if reserved else self._reserve_counted(key, now)

    def reserve(self, username: str, ip: str) -> Reservation:
        now = self.clock()
        key = account_key(username, ip)
        # Most logins: no failure in the window, no row; the insert is the reservation (one statement).
        if get_setting("THROTTLE_ACCOUNT_FAILURES") > 1 and _insert_reservation(key, now):
            return Reservation(admitted=True)
        return self._reserve_counted(key, now)

    def _reserve_counted(self, key: str, now: datetime) -> Reservation:
        """``reserve`` where the (account, IP) counter exists (or the limit is 1): counted under its row lock."""
        from popserver.models import LoginThrottle

        window = timedelta(seconds=get_setting("THROTTLE_WINDOW"))
        limit = get_setting("THROTTLE_ACCOUNT_FAILURES")
        with _locked_row(LoginThrottle.ACCOUNT_IP, key, now) as row:
            if row.locked_until and row.locked_until > now:
                return Reservation(admitted=False)
            if row.window_started < now - window:
                row.failures, row.window_started = 0, now
            row.failures += 1
            last = row.failures >= limit
            if last:
                row.locked_until = now + timedelta(seconds=get_setting("THROTTLE_LOCKOUT"))
                row.failures, row.window_started = 0, now
            row.save()
            return Reservation(admitted=True, last=last)

    def failed(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        now = self.clock()
        window = timedelta(seconds=get_setting("THROTTLE_WINDOW"))
        locked = None
        for scope, key, limit in self.scopes(username, ip, trusted, ip_only):
            with _locked_row(scope, key, now) as row:
                if row.window_started < now - window and not (row.locked_until and row.locked_until > now):
                    row.failures, row.window_started = 0, now
                row.failures += 1
                if row.failures >= limit and not (row.locked_until and row.locked_until > now):
                    row.locked_until = now + timedelta(seconds=get_setting("THROTTLE_LOCKOUT"))
                    row.failures, row.window_started = 0, now
                    locked = locked or scope
                row.save()
        return locked

    def succeeded(self, username: str, ip: str) -> None:
        with one_writer():  # the attempt's reservation, and any lock-out it began
            _give_back().execute(account_key(username, ip))

    def succeeded_statement(self, username: str, ip: str) -> Statement | None:
        return None if self._overridden("succeeded") else _give_back().statement(account_key(username, ip))

    def _overridden(self, *names: str) -> bool:
        """A site's subclass changed one of these steps: its own methods are called, never bypassed."""
        return any(getattr(type(self), name) is not getattr(DatabaseThrottle, name) for name in names)

    def clear(self, scope: str | None = None, key: str | None = None) -> int:
        from popserver.models import LoginThrottle

        rows = LoginThrottle.objects.all()
        if scope:
            rows = rows.filter(scope=scope)
        if key:
            rows = rows.filter(key=key)
        return rows.delete()[0]


class CacheThrottle(Throttle):
    """Counters in a Django cache (POPSERVER_THROTTLE_CACHE), with atomic ``incr`` (Redis, Memcached).

    A check warns (popserver.W005) when that cache is not shared between processes."""

    @property
    def cache(self):
        return caches[get_setting("THROTTLE_CACHE")]

    @staticmethod
    def _name(kind: str, scope: str, key: str) -> str:
        return f"popserver:throttle:{kind}:{scope}:{hashlib.sha256(key.encode()).hexdigest()}"

    def locked_out(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        for scope, key, _ in self.scopes(username, ip, trusted, ip_only):
            until = self.cache.get(self._name("lock", scope, key))
            if until and until > self.clock().timestamp():
                return scope
        return None

    def reserve(self, username: str, ip: str) -> Reservation:
        from popserver.models import LoginThrottle

        key = account_key(username, ip)
        lock, name = (
            self._name("lock", LoginThrottle.ACCOUNT_IP, key),
            self._name("count", LoginThrottle.ACCOUNT_IP, key),
        )
        until = self.cache.get(lock)
        if until and until > self.clock().timestamp():
            return Reservation(admitted=False)
        limit, lockout = get_setting("THROTTLE_ACCOUNT_FAILURES"), get_setting("THROTTLE_LOCKOUT")
        self.cache.add(name, 0, timeout=get_setting("THROTTLE_WINDOW"))
        try:
            count = self.cache.incr(name)  # atomic: parallel attempts get distinct counts
        except ValueError:  # expired between add and incr
            self.cache.add(name, 1, timeout=get_setting("THROTTLE_WINDOW"))
            count = 1
        if count > limit:
            if not until:  # the admission that reached the limit is setting the lock-out now
                return Reservation(admitted=False)
            # The lock-out is over (by the throttle's clock) while its count lives on: a fresh window.
            self.cache.set(name, 1, timeout=get_setting("THROTTLE_WINDOW"))
            count = 1
        if count == limit:
            self.cache.set(lock, self.clock().timestamp() + lockout, timeout=lockout)
            self.cache.touch(name, lockout)  # the count ends with the lock-out, not before it
            return Reservation(admitted=True, last=True)
        return Reservation(admitted=True)

    def failed(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        locked = None
        window, lockout = get_setting("THROTTLE_WINDOW"), get_setting("THROTTLE_LOCKOUT")
        for scope, key, limit in self.scopes(username, ip, trusted, ip_only):
            name = self._name("count", scope, key)
            self.cache.add(name, 0, timeout=window)
            try:
                count = self.cache.incr(name)
            except ValueError:  # expired between add and incr
                self.cache.add(name, 1, timeout=window)
                count = 1
            if count >= limit:
                self.cache.set(
                    self._name("lock", scope, key), self.clock().timestamp() + lockout, timeout=lockout
                )
                self.cache.delete(name)
                locked = locked or scope
        return locked

    def succeeded(self, username: str, ip: str) -> None:
        from popserver.models import LoginThrottle

        key = account_key(username, ip)
        self.cache.delete_many(
            [
                self._name("count", LoginThrottle.ACCOUNT_IP, key),
                self._name("lock", LoginThrottle.ACCOUNT_IP, key),
            ]
        )

    def clear(self, scope: str | None = None, key: str | None = None) -> int:
        if scope and key:
            cleared = bool(self.cache.delete(self._name("lock", scope, key)))
            self.cache.delete(self._name("count", scope, key))  # it outlives the lock-out (``reserve``)
            return int(cleared)
        raise NotImplementedError("the cache throttle clears one scope and key at a time")


def get_throttle(clock: Clock | None = None) -> Throttle:
    throttle_class = import_string(get_setting("THROTTLE"))
    return throttle_class(clock) if clock else throttle_class()
