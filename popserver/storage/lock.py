"""The mailbox lock (RFC 1939 s.4): one ``MailboxLock`` owns taking it, keeping it alive and releasing it.

The lock is row state on ``Mailbox``, taken with a conditional UPDATE inside ``atomic()`` after
``select_for_update()`` (a row lock where the database has one; SQLite's IMMEDIATE transactions serialise the
same way), so no transaction stays open for the length of a session. A live server refreshes its locks'
heartbeats; a lock is free again when its holder process is known dead (same node: POPSERVER_NODE_NAME, by
default the host name) or its heartbeat is older than POPSERVER_LOCK_STALE_AFTER (any node).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

from django.db import DatabaseError, transaction
from django.utils import timezone

from ..conf import get_setting, node_name
from ..exceptions import MailboxInUse
from ..models import Mailbox
from .compiled import CompiledQuery, Statement, Update, at_once
from .deletion import BATCH_SIZE, batched
from .gate import using_database
from .writelock import one_writer

logger = logging.getLogger("popserver.storage")

T = TypeVar("T")

# The lock fields of a free mailbox.
FREE = {
    "lock_token": "",
    "lock_host": "",
    "lock_pid": None,
    "lock_instance": "",
    "lock_peer": "",
    "locked_at": None,
    "lock_heartbeat": None,
}


@dataclass(frozen=True)
class ProcessIdentity:
    host: str  # the node's name (POPSERVER_NODE_NAME, by default the host name): lock holders are named by it
    pid: int
    instance: str  # random per process: tells a restarted server that reuses a pid from the dead one


_instance: tuple[int, str] | None = None


def this_process() -> ProcessIdentity:
    global _instance
    if _instance is None or _instance[0] != os.getpid():  # a new instance after fork
        _instance = (os.getpid(), secrets.token_hex(16))
    return ProcessIdentity(node_name(), *_instance)


# Locks held by live sessions of this process: token -> lock (None while the lock is being taken).
_live: dict[str, MailboxLock | None] = {}
_live_guard = threading.Lock()


def pid_is_alive(pid: int) -> bool:
    """True if a process with this pid exists on this machine."""
    if pid <= 0:  # os.kill(0, ...) would signal our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_is_stale(mailbox: Mailbox, now=None) -> bool:
    """True if the lock's holder is gone: a dead process of this node, or a heartbeat too old anywhere."""
    if not mailbox.lock_token:
        return True
    me = this_process()
    if mailbox.lock_instance == me.instance:  # this process's own: live while a session has it
        with _live_guard:
            return mailbox.lock_token not in _live
    if mailbox.lock_host == me.host and (
        mailbox.lock_pid == me.pid or not pid_is_alive(mailbox.lock_pid or 0)
    ):
        return True
    now = now or timezone.now()
    stale_after = timedelta(seconds=get_setting("LOCK_STALE_AFTER"))
    return mailbox.lock_heartbeat is None or mailbox.lock_heartbeat < now - stale_after


class TransactionLost(DatabaseError):
    """The transaction was marked for rollback by an error that something inside it caught (a savepoint
    that could not be rolled back): leaving ``atomic()`` would roll it back without raising."""


def committable(result: T) -> T:
    """``result``, if the current transaction can still commit; else raise ``TransactionLost``."""
    if transaction.get_connection().needs_rollback:
        raise TransactionLost("the transaction was marked for rollback by an error caught inside it")
    return result


_HOLDER = ("lock_token", "lock_host", "lock_pid", "lock_instance", "lock_peer", "locked_at", "lock_heartbeat")
_HOLDER_KINDS = (str, str, int, str, str, datetime, datetime)


def _take_free(*values):
    """The conditional UPDATE that takes a free lock of a POP3-enabled mailbox: the holder's fields, then
    ``last_login`` when given, then the mailbox's id."""
    *holder, pk = values
    fields = dict(zip((*_HOLDER, "last_login"), holder))
    return Update(Mailbox.objects.filter(pk=pk, lock_token="", pop3_enabled=True), **fields)


# Every login runs these (compiled once, storage/compiled.py): with and without the last_login stamp.
_TAKE_FREE = {
    True: CompiledQuery(_take_free, model=Mailbox, kinds=(*_HOLDER_KINDS, datetime, int), write=True),
    False: CompiledQuery(_take_free, model=Mailbox, kinds=(*_HOLDER_KINDS, int), write=True),
}
# Frees a lock if it still carries the token (QUIT, a release, a dead holder's lock freed).
_FREE_OURS = CompiledQuery(
    lambda pk, token: Update(Mailbox.objects.filter(pk=pk, lock_token=token), **FREE),
    model=Mailbox,
    kinds=(int, str),
    write=True,
)


class LockWrites:
    """Writes that belong in the transaction that takes or frees a lock (a login's: the throttle's
    reservation given back, its audit row; a QUIT's: the session's record): called there. On PostgreSQL
    ``statements()`` gives the same writes for the lock's one statement (``MailboxLock.take_at_once``,
    ``free_at_once``); None: they cannot go there, the lock takes the long way."""

    def __call__(self) -> None:
        raise NotImplementedError

    def statements(self) -> list[Statement] | None:
        return None

    def written_at_once(self) -> None:
        """The lock's one statement committed them (no call of ``self`` came)."""


class MailboxLock:
    """One session's exclusive lock on one mailbox: ``take`` it, ``free`` it inside a commit, or ``release``."""

    def __init__(self, mailbox_id: int, token: str):
        self.mailbox_id = mailbox_id
        self.token = token
        self.released = False

    @classmethod
    def take(
        cls,
        mailbox_id: int,
        peer: str,
        then: Callable[[Mailbox], T],
        *,
        stamp_login: bool = True,
        mailbox: Mailbox | None = None,
    ) -> tuple[MailboxLock, T]:
        """Take the lock and run ``then(mailbox)`` in the same transaction; the transaction commits only if
        both succeed (``then`` may not swallow a failure that dooms it: ``TransactionLost``).

        Without ``mailbox``, ``then`` gets the row as the lock read it (``select_for_update()``). With it (a
        login: the row as the caller read it before the password check), a free lock of a mailbox that is
        still POP3-enabled is taken by the conditional UPDATE alone (which tests both under the row lock), and
        ``then`` gets the caller's row: its other fields (the retention policy) are as the login read them. A
        held or stale lock, or a mailbox switched off meanwhile, is read afresh as without ``mailbox``.
        Stamps ``last_login`` (unless ``stamp_login`` is false: maintenance, not a login). Raises
        ``MailboxInUse`` if a live session holds the lock.
        """
        me = this_process()
        lock = cls(mailbox_id, secrets.token_hex(16))
        with lock._being_taken():
            result = lock._take(peer, me, then, stamp_login, mailbox)
        lock._taken(True)
        return lock, result

    @classmethod
    def take_at_once(
        cls, mailbox: Mailbox, peer: str, writes: list[Statement], select: Statement, order_by: int
    ) -> tuple[MailboxLock, list] | None:
        """PostgreSQL, a login (``take`` with ``mailbox``): the free lock of a mailbox that is still
        POP3-enabled taken, ``last_login`` stamped, ``writes`` made and ``select`` read in ONE statement, its
        own transaction (``compiled.at_once``). The lock and the selected rows (converted); None if the lock was not free
        or the mailbox is switched off (then nothing was written: ``take`` the long way, which tells a stale
        lock from a live one). The snapshot is the database as the statement began: a delivery that held the
        mailbox's row meanwhile is in the next session, not this one (mail that arrives during a session
        does not show in it either)."""
        me = this_process()
        lock = cls(mailbox.pk, secrets.token_hex(16))
        now = timezone.now()
        holder = (lock.token, me.host, me.pid, me.instance, peer[:64], now, now)
        with lock._being_taken():
            rows = at_once(_TAKE_FREE[True].statement(*holder, now, mailbox.pk), writes, select, order_by)
        lock._taken(rows is not None)  # committed: ours until released
        if rows is None:
            return None
        if select.convert is None or not rows:
            return lock, rows
        try:
            return lock, select.convert(rows)
        except BaseException:  # no session gets this lock: give it back as the long way's rollback would
            with contextlib.suppress(Exception):
                lock.release()
            raise

    @contextlib.contextmanager
    def _being_taken(self) -> Iterator[None]:
        """Registered before the row says so: another thread of this process must never see our fresh lock
        as one of this instance's forgotten (stale) locks. Forgotten if taking it fails."""
        with _live_guard:
            _live[self.token] = None
        try:
            yield
        except BaseException:
            self._taken(False)
            raise

    def _taken(self, taken: bool) -> None:
        with _live_guard:
            if taken:
                _live[self.token] = self
            else:
                _live.pop(self.token, None)

    def _take(
        self,
        peer: str,
        me: ProcessIdentity,
        then: Callable[[Mailbox], T],
        stamp_login: bool,
        known: Mailbox | None,
    ) -> T:
        now = timezone.now()
        fields = {
            "lock_token": self.token,
            "lock_host": me.host,
            "lock_pid": me.pid,
            "lock_instance": me.instance,
            "lock_peer": peer[:64],
            "locked_at": now,
            "lock_heartbeat": now,
            **({"last_login": now} if stamp_login else {}),
        }
        with one_writer(), transaction.atomic():
            # A free lock (most logins): the conditional UPDATE is the whole test, and it row-locks the mailbox
            # until the commit as select_for_update() would.
            if known is not None and _TAKE_FREE[stamp_login].execute(*fields.values(), self.mailbox_id):
                return committable(then(known))
            mailbox = Mailbox.objects.select_for_update().get(pk=self.mailbox_id)
            if mailbox.lock_token and not lock_is_stale(mailbox, now):
                raise MailboxInUse()
            taken = Mailbox.objects.filter(pk=self.mailbox_id, lock_token=mailbox.lock_token).update(**fields)
            if taken != 1:
                raise MailboxInUse()
            if mailbox.lock_token:
                logger.warning(
                    "mailbox %s: took over the stale lock of %s pid %s",
                    mailbox,
                    mailbox.lock_host,
                    mailbox.lock_pid,
                )
            return committable(then(mailbox))

    def is_held(self) -> bool:
        """Inside a transaction: True if the row still carries our token (and, where possible, row-locked)."""
        return Mailbox.objects.select_for_update().filter(pk=self.mailbox_id, lock_token=self.token).exists()

    def free(self) -> bool:
        """Clear the row's lock fields if they are still ours (True), row-locking them until the transaction
        ends; call ``forget()`` once it is done. False: the lock was lost."""
        return _FREE_OURS.execute(self.mailbox_id, self.token) == 1

    def free_at_once(self, writes: list[Statement]) -> bool:
        """PostgreSQL, outside a transaction: ``free`` and ``writes`` in ONE statement, its own transaction
        (``compiled.at_once``); False if the lock was lost (nothing was written). Call ``forget()`` after."""
        return at_once(_FREE_OURS.statement(self.mailbox_id, self.token), writes) is not None

    def release(self) -> None:
        """Free the lock on its own (no UPDATE of messages); idempotent."""
        if self.released:
            return
        try:
            with one_writer():
                self.free()
        finally:
            # Even if the update failed, forget the token: the row's lock then counts as stale for this
            # process at once and for every other after LOCK_STALE_AFTER, instead of living forever.
            self.forget()

    def forget(self) -> None:
        self.released = True
        with _live_guard:
            _live.pop(self.token, None)


def refresh_heartbeats() -> int:
    """Stamp the heartbeat of every lock this process holds; returns how many rows were touched."""
    with _live_guard:
        tokens = list(_live)
    touched = 0
    now = timezone.now()
    for batch in batched(tokens, BATCH_SIZE):
        with using_database(), one_writer():
            touched += Mailbox.objects.filter(lock_token__in=batch).update(lock_heartbeat=now)
    return touched


def release_dead_locks() -> int:
    """Free the locks of this node's dead server processes at once (after a kill -9 and a restart)."""
    me = this_process()
    freed = 0
    with using_database():
        for mailbox in Mailbox.objects.filter(lock_host=me.host).exclude(lock_token=""):
            if lock_is_stale(mailbox):
                with one_writer():
                    freed += _FREE_OURS.execute(mailbox.pk, mailbox.lock_token)
    if freed:
        logger.info("freed %d lock(s) left by dead server processes on %s", freed, me.host)
    return freed


def release_all_live_locks() -> int:
    """Release every lock this process still holds (shutdown); deletes nothing."""
    with _live_guard:
        locks = [lock for lock in _live.values() if lock is not None]
    for lock in locks:
        try:
            with using_database():
                lock.release()
        except Exception:
            logger.exception("could not release the lock of mailbox %s", lock.mailbox_id)
    return len(locks)


class LockRelease(enum.Enum):
    RELEASED = "released"
    NOT_LOCKED = "not locked"
    LIVE = "held by a live session"


def release_stale_lock(mailbox_id: int) -> tuple[LockRelease, Mailbox]:
    """Free the mailbox's lock if its holder is gone (``lock_is_stale``); never a live session's (the admin).

    Returns the outcome and the mailbox as it was read (its lock fields name the holder).
    """
    with one_writer(), transaction.atomic():
        mailbox = Mailbox.objects.select_for_update().get(pk=mailbox_id)
        if not mailbox.lock_token:
            return LockRelease.NOT_LOCKED, mailbox
        if not lock_is_stale(mailbox):
            return LockRelease.LIVE, mailbox
        # Conditional on the token we judged: a session that took the lock meanwhile keeps it.
        freed = _FREE_OURS.execute(mailbox_id, mailbox.lock_token)
    return (LockRelease.RELEASED if freed else LockRelease.LIVE), mailbox
