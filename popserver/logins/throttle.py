"""Failed-login throttling, per (login name, IP) and per IP, in storage every server process shares.

Names that do not exist are counted exactly like real ones, so the throttle reveals no accounts. A lock-out
refuses further attempts WITHOUT checking the password: a right guess during a lock-out proves nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime, timedelta

from django.core.cache import caches
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from popserver.conf import get_setting
from popserver.storage.writelock import one_writer

Clock = Callable[[], datetime]


def account_key(username: str, ip: str) -> str:
    return f"{username.strip().lower()[:200]}|{ip}"


class Throttle:
    """Interface. ``clock`` is injectable so tests never sleep."""

    def __init__(self, clock: Clock = timezone.now):
        self.clock = clock

    def locked_out(self, username: str, ip: str, *, trusted: bool) -> str | None:
        """The scope ("account" or "ip") that is locked out for this attempt, or None."""
        raise NotImplementedError

    def failed(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        """Count a failure; returns the scope this failure locked out, if any. ``ip_only``: an attempt refused
        by an account lock-out still counts against its IP (the guessing goes on)."""
        raise NotImplementedError

    def succeeded(self, username: str, ip: str) -> None:
        """A right password resets its (login name, IP) counter."""
        raise NotImplementedError

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


class DatabaseThrottle(Throttle):
    """Counters in ``LoginThrottle`` rows, updated under a row lock (SQLite: the IMMEDIATE transaction)."""

    def locked_out(self, username: str, ip: str, *, trusted: bool) -> str | None:
        from popserver.models import LoginThrottle

        now = self.clock()
        for scope, key, _ in self.scopes(username, ip, trusted):
            if LoginThrottle.objects.filter(scope=scope, key=key, locked_until__gt=now).exists():
                return scope
        return None

    def failed(self, username: str, ip: str, *, trusted: bool, ip_only: bool = False) -> str | None:
        from popserver.models import LoginThrottle

        now = self.clock()
        window = timedelta(seconds=get_setting("THROTTLE_WINDOW"))
        locked = None
        for scope, key, limit in self.scopes(username, ip, trusted, ip_only):
            for attempt in range(2):  # a concurrent first failure may create the row between get and create
                try:
                    with one_writer(), transaction.atomic():
                        row, _ = LoginThrottle.objects.select_for_update().get_or_create(
                            scope=scope, key=key, defaults={"window_started": now}
                        )
                        if row.window_started < now - window and not (
                            row.locked_until and row.locked_until > now
                        ):
                            row.failures, row.window_started = 0, now
                        row.failures += 1
                        if row.failures >= limit and not (row.locked_until and row.locked_until > now):
                            row.locked_until = now + timedelta(seconds=get_setting("THROTTLE_LOCKOUT"))
                            row.failures, row.window_started = 0, now
                            locked = locked or scope
                        row.save()
                    break
                except IntegrityError:
                    if attempt:
                        raise
        return locked

    def succeeded(self, username: str, ip: str) -> None:
        from popserver.models import LoginThrottle

        rows = LoginThrottle.objects.filter(scope=LoginThrottle.ACCOUNT_IP, key=account_key(username, ip))
        if rows.exists():  # a read first: most logins have no failures to forget, and a write locks SQLite
            with one_writer():
                rows.delete()

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

    def locked_out(self, username: str, ip: str, *, trusted: bool) -> str | None:
        for scope, key, _ in self.scopes(username, ip, trusted):
            until = self.cache.get(self._name("lock", scope, key))
            if until and until > self.clock().timestamp():
                return scope
        return None

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

        self.cache.delete(self._name("count", LoginThrottle.ACCOUNT_IP, account_key(username, ip)))

    def clear(self, scope: str | None = None, key: str | None = None) -> int:
        if scope and key:
            return int(bool(self.cache.delete(self._name("lock", scope, key))))
        raise NotImplementedError("the cache throttle clears one scope and key at a time")


def get_throttle(clock: Clock | None = None) -> Throttle:
    throttle_class = import_string(get_setting("THROTTLE"))
    return throttle_class(clock) if clock else throttle_class()
