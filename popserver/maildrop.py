"""The ORM maildrop: the exclusive mailbox lock, the snapshot, streaming reads and UPDATE at QUIT.

The lock (RFC 1939 s.4) is row state on ``Mailbox``, taken with a conditional UPDATE inside ``atomic()`` after
``select_for_update()`` (a row lock where the database has one; SQLite's IMMEDIATE transactions serialise the
same way), so no transaction stays open for the length of a session. A live server refreshes its locks'
heartbeats; a lock is free again when its holder process is known dead (same node: POPSERVER_NODE_NAME, by
default the host name) or its heartbeat is older than POPSERVER_LOCK_STALE_AFTER (any node).
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice

from django.db import transaction
from django.utils import timezone

from .bodystore import get_body_store
from .conf import get_setting, node_name
from .exceptions import CommitFailed, MailboxInUse
from .models import Mailbox, Message
from .protocol.maildrop import Maildrop, MessageInfo
from .signals import messages_deleted, send_safely
from .writelock import one_writer

logger = logging.getLogger(__name__)


def batched(items, size: int):
    """itertools.batched (Python 3.12+)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch

# Well under SQLite's 32,766 bound parameters, and small enough to keep each statement quick.
DELETE_BATCH = 500

FREE_LOCK = {
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


# Locks held by live sessions of this process: token -> maildrop (None while the lock is being taken).
_live_locks: dict[str, OrmMaildrop | None] = {}
_live_locks_guard = threading.Lock()


def _pid_is_alive(pid: int) -> bool:
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
        with _live_locks_guard:
            return mailbox.lock_token not in _live_locks
    if mailbox.lock_host == me.host and (mailbox.lock_pid == me.pid or not _pid_is_alive(mailbox.lock_pid or 0)):
        return True
    now = now or timezone.now()
    stale_after = timedelta(seconds=get_setting("LOCK_STALE_AFTER"))
    return mailbox.lock_heartbeat is None or mailbox.lock_heartbeat < now - stale_after


def open_maildrop(mailbox_id: int, peer: str = "") -> OrmMaildrop:
    """Take the mailbox's exclusive lock and its snapshot (RFC 1939 s.4), stamp last_login.

    Raises MailboxInUse if another live session holds the lock.
    """
    me = this_process()
    token = secrets.token_hex(16)
    now = timezone.now()
    # Registered before the row says so: another thread of this process must never see our fresh lock as
    # one of this instance's forgotten (stale) locks.
    with _live_locks_guard:
        _live_locks[token] = None
    try:
        maildrop = _take_lock(mailbox_id, peer, me, token, now)
    except BaseException:
        with _live_locks_guard:
            _live_locks.pop(token, None)
        raise
    with _live_locks_guard:
        _live_locks[token] = maildrop
    return maildrop


def _take_lock(mailbox_id: int, peer: str, me: ProcessIdentity, token: str, now) -> OrmMaildrop:
    with one_writer(), transaction.atomic():
        mailbox = Mailbox.objects.select_for_update().get(pk=mailbox_id)
        if mailbox.lock_token and not lock_is_stale(mailbox, now):
            raise MailboxInUse()
        taken = Mailbox.objects.filter(pk=mailbox_id, lock_token=mailbox.lock_token).update(
            lock_token=token,
            lock_host=me.host,
            lock_pid=me.pid,
            lock_instance=me.instance,
            lock_peer=peer[:64],
            locked_at=now,
            lock_heartbeat=now,
            last_login=now,
        )
        if taken != 1:
            raise MailboxInUse()
        if mailbox.lock_token:
            logger.warning("mailbox %s: took over the stale lock of %s pid %s", mailbox, mailbox.lock_host,
                           mailbox.lock_pid)
        rows = list(
            Message.objects.filter(mailbox_id=mailbox_id).order_by("id").values_list("id", "size", "uid")
        )
    return OrmMaildrop(mailbox_id, token, rows)


class OrmMaildrop(Maildrop):
    """A locked mailbox's snapshot; bodies streamed from the body store chunk by chunk."""

    def __init__(self, mailbox_id: int, token: str, rows: list[tuple[int, int, str]]):
        super().__init__([MessageInfo(size=size, uid=uid) for _, size, uid in rows])
        self.mailbox_id = mailbox_id
        self.token = token
        self.message_ids = [message_id for message_id, _, _ in rows]
        self.released = False

    def read(self, number: int) -> Iterator[bytes]:
        # Each chunk is its own short query: no transaction is open while the caller writes to a socket.
        return get_body_store().read_chunks(self.message_ids[number - 1])

    def commit(self) -> None:
        """RFC 1939 s.6 UPDATE: delete the marked messages and release the lock in ONE transaction, after
        checking the lock is still ours. On any failure nothing is deleted."""
        numbers = sorted(self.deleted)
        ids = [self.message_ids[n - 1] for n in numbers]
        octets = sum(self.info(n).size for n in numbers)
        store = get_body_store()
        with one_writer(), transaction.atomic():
            still_ours = (
                Mailbox.objects.select_for_update().filter(pk=self.mailbox_id, lock_token=self.token).exists()
            )
            if not still_ours:
                raise CommitFailed("the mailbox lock was lost")
            for batch in batched(ids, DELETE_BATCH):
                store.delete(batch)
                Message.objects.filter(mailbox_id=self.mailbox_id, id__in=batch).delete()
            Mailbox.objects.filter(pk=self.mailbox_id, lock_token=self.token).update(**FREE_LOCK)
        self._forget()
        if ids:
            mailbox_id = self.mailbox_id
            # Outside the write lock (a slow receiver must not hold up every writer); at once, or when an
            # outer transaction commits. robust: the deletions are committed, whatever a receiver does.
            transaction.on_commit(lambda: _announce_deleted(mailbox_id, len(ids), octets), robust=True)

    def release(self) -> None:
        if self.released:
            return
        try:
            with one_writer():
                Mailbox.objects.filter(pk=self.mailbox_id, lock_token=self.token).update(**FREE_LOCK)
        finally:
            # Even if the update failed, forget the token: the row's lock then counts as stale for this
            # process at once and for every other after LOCK_STALE_AFTER, instead of living forever.
            self._forget()

    def _forget(self) -> None:
        self.released = True
        with _live_locks_guard:
            _live_locks.pop(self.token, None)


def _announce_deleted(mailbox_id: int, count: int, octets: int) -> None:
    mailbox = Mailbox.objects.filter(pk=mailbox_id).first()
    send_safely(messages_deleted, mailbox=mailbox, count=count, octets=octets)


def refresh_heartbeats() -> int:
    """Stamp the heartbeat of every lock this process holds; returns how many rows were touched."""
    with _live_locks_guard:
        tokens = list(_live_locks)
    touched = 0
    now = timezone.now()
    for batch in batched(tokens, DELETE_BATCH):
        with one_writer():
            touched += Mailbox.objects.filter(lock_token__in=batch).update(lock_heartbeat=now)
    return touched


def release_dead_locks() -> int:
    """Free the locks of this host's dead server processes at once (after a kill -9 and a restart)."""
    me = this_process()
    freed = 0
    for mailbox in Mailbox.objects.filter(lock_host=me.host).exclude(lock_token=""):
        if lock_is_stale(mailbox):
            freed += Mailbox.objects.filter(pk=mailbox.pk, lock_token=mailbox.lock_token).update(**FREE_LOCK)
    if freed:
        logger.info("freed %d lock(s) left by dead server processes on %s", freed, me.host)
    return freed


def release_all_live_locks() -> int:
    """Release every lock this process still holds (shutdown); deletes nothing."""
    with _live_locks_guard:
        maildrops = [maildrop for maildrop in _live_locks.values() if maildrop is not None]
    for maildrop in maildrops:
        try:
            maildrop.release()
        except Exception:
            logger.exception("could not release the lock of mailbox %s", maildrop.mailbox_id)
    return len(maildrops)
