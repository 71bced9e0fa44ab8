"""The ORM maildrop: a locked mailbox's snapshot, streamed reads and UPDATE at QUIT (RFC 1939 s.4-6).

The lock itself is ``popserver.storage.lock.MailboxLock``; deletion is ``popserver.storage.deletion``; what a
QUIT does with deleted and retrieved messages follows the mailbox's policy (``popserver.storage.retention``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from django.db import DatabaseError, OperationalError, connections, router, transaction

from ..exceptions import AuthenticationFailed, CommitFailed, ServerBusy
from ..overload import database_unavailable, refused
from ..models import Mailbox, Message
from ..protocol.maildrop import Maildrop, MessageInfo
from ..signals import messages_deleted, send_safely
from .bodies import REF_FIELDS, BodyRef, read_body, read_small_bodies
from .compiled import CompiledQuery, Statement, can_do_at_once
from .deletion import delete_messages
from .gate import using_database
from .lock import LockWrites, MailboxLock, committable
from .retention import RetentionPolicy, hide_messages, policy_of_mailbox, record_first_retrievals
from .writelock import one_writer

logger = logging.getLogger("popserver.storage")

T = TypeVar("T")

# Read-ahead for pipelined RETR/TOP: bodies read in one query, per batch.
PREFETCH_MESSAGES = 64
PREFETCH_OCTETS = 1024 * 1024
SMALL_MESSAGE = 256 * 1024  # larger ones are never read ahead


# The snapshot's one query (RFC 1939 s.4: numbered in this order), compiled once: every login runs it.
_SNAPSHOT = CompiledQuery(
    lambda mailbox_id: Message.objects.visible()
    .filter(mailbox_id=mailbox_id)
    .order_by("id")
    .values_list("size", "uid", "has_header_end", *REF_FIELDS),
    model=Message,
    kinds=(int,),
    write=True,  # read inside the lock's transaction, on the connection that took the lock
)
_SNAPSHOT_ORDER = 4 + REF_FIELDS.index("id")  # the snapshot's column (from 1) its order follows


def open_maildrop(
    mailbox_id: int,
    peer: str = "",
    *,
    mailbox: Mailbox | None = None,
    in_lock_transaction: Callable[[], None] | LockWrites | None = None,
) -> OrmMaildrop:
    """Take the mailbox's exclusive lock and its snapshot (RFC 1939 s.4), stamp last_login.

    ``mailbox``: the row as the login just read it (``MailboxLock.take``); a mailbox switched off for POP3
    since then raises AuthenticationFailed. ``in_lock_transaction``: writes that belong to the login (the
    throttle's reservation given back, the audit row), run in the lock's transaction so that a login commits
    once. Raises MailboxInUse if another live session holds the lock (nothing of ``in_lock_transaction`` is
    then written).

    On PostgreSQL a login whose lock is free takes it, its snapshot and ``in_lock_transaction``'s writes (a
    ``LockWrites``) in one statement (``_open_at_once``); anything else takes the long way.
    """

    def snapshot(locked: Mailbox) -> tuple[RetentionPolicy, list[tuple]]:
        if mailbox is not None and not locked.pop3_enabled:  # switched off during the password check
            raise AuthenticationFailed()
        policy = policy_of_mailbox(locked)
        rows = _SNAPSHOT.rows(mailbox_id)
        if in_lock_transaction is not None:
            in_lock_transaction()
        return policy, rows

    with using_database():
        if mailbox is not None:
            maildrop = _open_at_once(mailbox, peer, in_lock_transaction)
            if maildrop is not None:
                return maildrop
        lock, (policy, rows) = MailboxLock.take(mailbox_id, peer, then=snapshot, mailbox=mailbox)
    return OrmMaildrop(lock, rows, policy)


def _writes_at_once(writes: Callable[[], None] | LockWrites | None, connection) -> list[Statement] | None:
    """``writes`` as statements for the lock's one statement on ``connection``, or None: the long way."""
    if not can_do_at_once(connection):
        return None
    if writes is None:
        return []
    statements = writes.statements() if isinstance(writes, LockWrites) else None
    if statements is None or any(statement.connection is not connection for statement in statements):
        return None
    return statements


def _tried_at_once(what: str, attempt: Callable[[], T]) -> T | None:
    """``attempt()``'s result, or None if its one statement failed: undone whole, the long way goes on. A
    cause that stays (a site's trigger or constraint) would make every login pay for both: logged, one summary
    line per interval. A database that refuses or is gone (or a deadlock) raises, as the long way's would."""
    try:
        return attempt()
    except OperationalError:
        raise
    except DatabaseError as exc:
        reason = " ".join(str(exc).split())[:200]  # one line, as database_unavailable writes it
        refused(
            "db-at-once",
            f"{what}: the one statement failed ({reason}); took the long way",
            level=logging.WARNING,
        )
        return None


def _open_at_once(
    mailbox: Mailbox, peer: str, in_lock_transaction: Callable[[], None] | LockWrites | None
) -> OrmMaildrop | None:
    """A login on PostgreSQL: the lock, the snapshot and the login's writes in ONE statement, its own
    transaction (``MailboxLock.take_at_once``): one round trip instead of six. None: the long way (a lock
    that is not free, writes that cannot go there, or a statement that failed: undone whole, and the long way
    writes what it can, an audit row that cannot be written logged there as always). A database that refuses or
    is gone raises, as the long way would."""
    connection = connections[router.db_for_write(Mailbox)]
    writes = _writes_at_once(in_lock_transaction, connection)
    if writes is None or not mailbox.pop3_enabled:
        return None
    snapshot = _SNAPSHOT.statement(mailbox.pk)
    if snapshot.connection is not connection:
        return None
    taken = _tried_at_once(
        "login", lambda: MailboxLock.take_at_once(mailbox, peer, writes, snapshot, _SNAPSHOT_ORDER)
    )
    if taken is None:
        return None
    if isinstance(in_lock_transaction, LockWrites):
        in_lock_transaction.written_at_once()
    lock, rows = taken
    return OrmMaildrop(lock, rows, policy_of_mailbox(mailbox))


def position_in_listing(message: Message) -> tuple[int, int]:
    """(number, of how many): how a POP3 client logging in now would number ``message`` (RFC 1939 s.4: from
    1, in the snapshot's order above). Two counts over the (mailbox, id) index; for people, not sessions."""
    in_mailbox = Message.objects.visible().filter(mailbox_id=message.mailbox_id)
    return in_mailbox.filter(id__lte=message.pk).count(), in_mailbox.count()


class OrmMaildrop(Maildrop):
    """A locked mailbox's snapshot; bodies streamed from the store that holds them, chunk by chunk."""

    def __init__(self, lock: MailboxLock, rows: list[tuple], policy: RetentionPolicy | None = None):
        """``rows``: (size, uid, has_header_end, *REF_FIELDS) of each message, in order."""
        super().__init__(list(map(MessageInfo._make, (row[:3] for row in rows))))
        self.lock = lock
        self.mailbox_id = lock.mailbox_id
        self._rows = rows  # BodyRefs are made when a body is read, not 100,000 of them at login
        self.message_ids = [row[3] for row in rows]
        self.policy = policy or RetentionPolicy(keep_deleted_days=0, expire_days=None)
        self.expire_days = self.policy.expire_days
        self._prefetched: dict[int, bytes] = {}  # number -> body, read ahead for pipelined commands
        # Set by the server: the session's own record, written in QUIT's transaction (one commit per QUIT).
        self.at_commit: Callable[[], None] | LockWrites | None = None

    def ref(self, number: int) -> BodyRef:
        """Where the body of message ``number`` is, as the snapshot saw it."""
        return BodyRef._make(self._rows[number - 1][3:])

    @property
    def token(self) -> str:
        return self.lock.token

    @property
    def released(self) -> bool:
        return self.lock.released

    def read(self, number: int) -> Iterator[bytes]:
        # Each chunk is its own short query: no transaction is open while the caller writes to a socket,
        # and between two chunks the connection may go back to the budget.
        body = self._prefetched.pop(number, None)
        if body is not None:
            return iter((body,))
        return _within_budget(read_body(self.ref(number)))

    def prefetch(self, numbers: Sequence[int]) -> int:
        """Read the next small bodies in one query: at most ``PREFETCH_MESSAGES`` of them and
        ``PREFETCH_OCTETS`` in all, so a session's read-ahead stays small whatever the client sends; large
        ones are passed over (streamed as usual). What was read ahead and not used is dropped here."""
        self._prefetched.clear()
        chosen: list[BodyRef] = []
        by_id: dict[int, int] = {}
        octets = taken = 0
        for number in numbers:
            size = self.messages[number - 1].size
            if size <= SMALL_MESSAGE:
                if octets + size > PREFETCH_OCTETS or len(chosen) >= PREFETCH_MESSAGES:
                    break
                ref = self.ref(number)
                if ref.message_id not in by_id:
                    by_id[ref.message_id] = number
                    chosen.append(ref)
                    octets += size
            taken += 1
        if len(chosen) > 1:
            try:
                with using_database():
                    bodies = read_small_bodies(chosen)
            except (ServerBusy, OperationalError):  # no read-ahead now: each RETR reads (or refuses) its own
                return 0
            self._prefetched = {by_id[message_id]: body for message_id, body in bodies.items()}
        return taken

    def commit(self) -> None:
        """RFC 1939 s.6 UPDATE: delete the marked messages and release the lock in ONE transaction, only if
        the lock is still ours; the first retrievals (and ``at_commit``'s writes) go in it too. On any failure
        nothing is deleted.

        Under a keep-deleted policy the marked messages are hidden instead (restorable); under EXPIRE 0 the
        retrieved messages go as if marked."""
        marked = self.numbers_to_remove()
        numbers = sorted(marked)
        ids = [self.message_ids[n - 1] for n in numbers]
        octets = sum(self.info(n).size for n in numbers)
        retrieved = [self.message_ids[n - 1] for n in sorted(self.retrieved - marked)]
        try:
            with using_database():
                if not ids and not retrieved and self._quit_at_once():
                    self.lock.forget()
                    return
                with one_writer(), transaction.atomic():
                    # Freed first: the UPDATE finds out whether the lock is still ours and row-locks the
                    # mailbox; nobody sees it free before the deletions are committed with it.
                    if not self.lock.free():
                        raise CommitFailed("the mailbox lock was lost")
                    if ids:
                        if self.policy.keep_deleted_days:
                            hide_messages(ids, self.mailbox_id)
                        else:
                            delete_messages(ids, mailbox_id=self.mailbox_id)
                    record_first_retrievals(retrieved)
                    if self.at_commit is not None:
                        self.at_commit()
                    committable(None)  # never "+OK" for a transaction that leaving atomic() rolls back
                self.retrieved.clear()
                self.lock.forget()
                if ids:
                    mailbox_id = self.mailbox_id
                    # Outside the write lock (a slow receiver must not hold up every writer); at once, or when
                    # an outer transaction commits. robust: the deletions are committed, whatever a receiver does.
                    transaction.on_commit(
                        lambda: _announce_deleted(mailbox_id, len(ids), octets), robust=True
                    )
        except OperationalError as exc:
            database_unavailable(exc, "QUIT")
            raise ServerBusy() from None

    def _quit_at_once(self) -> bool:
        """A QUIT with nothing to delete and nothing retrieved in the session, on PostgreSQL: the lock freed and
        ``at_commit``'s writes (a ``LockWrites``) in ONE statement, its own transaction. False: not done, the
        long way does it (as in ``_open_at_once``). Raises CommitFailed if the lock was lost."""
        writes = _writes_at_once(self.at_commit, connections[router.db_for_write(Mailbox)])
        if writes is None:
            return False
        freed = _tried_at_once("QUIT", lambda: self.lock.free_at_once(writes))
        if freed is None:
            return False
        if not freed:
            raise CommitFailed("the mailbox lock was lost")
        if isinstance(self.at_commit, LockWrites):
            self.at_commit.written_at_once()
        return True

    def release(self) -> None:
        """No UPDATE (RFC 1939 s.6), but what was retrieved was retrieved: its first retrieval is recorded.

        Under overload the release may not reach the database: the lock is then forgotten here (stale at once
        for this process, for the others after POPSERVER_LOCK_STALE_AFTER or when this process ends)."""
        try:
            with using_database():
                if self.retrieved and not self.lock.released:
                    ids = [self.message_ids[n - 1] for n in sorted(self.retrieved)]
                    self.retrieved.clear()
                    try:
                        with one_writer():
                            record_first_retrievals(ids)
                    except Exception:  # the lock must still go; the retrieval time is only lost
                        logger.exception(
                            "mailbox %s: could not record %d first retrievals", self.mailbox_id, len(ids)
                        )
                self.lock.release()
        except (ServerBusy, OperationalError) as exc:
            self.lock.forget()
            if isinstance(exc, OperationalError):
                database_unavailable(exc, "releasing a mailbox lock")


def _within_budget(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Each chunk read with a connection of the budget, given back (if wanted) while the caller sends it."""
    try:
        while True:
            try:
                with using_database():
                    chunk = next(chunks)
            except StopIteration:
                return
            except OperationalError as exc:
                database_unavailable(exc, "reading a message")
                raise ServerBusy() from None
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _announce_deleted(mailbox_id: int, count: int, octets: int) -> None:
    mailbox = Mailbox.objects.filter(pk=mailbox_id).first()
    send_safely(messages_deleted, mailbox=mailbox, count=count, octets=octets)
