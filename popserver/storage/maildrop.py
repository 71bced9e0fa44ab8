"""The ORM maildrop: a locked mailbox's snapshot, streamed reads and UPDATE at QUIT (RFC 1939 s.4-6).

The lock itself is ``popserver.storage.lock.MailboxLock``; deletion is ``popserver.storage.deletion``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.db import transaction

from ..exceptions import CommitFailed
from ..models import Mailbox, Message
from ..protocol.maildrop import Maildrop, MessageInfo
from ..signals import messages_deleted, send_safely
from .bodies import get_body_store
from .deletion import delete_messages
from .lock import MailboxLock
from .writelock import one_writer

logger = logging.getLogger("popserver.storage")


def open_maildrop(mailbox_id: int, peer: str = "") -> OrmMaildrop:
    """Take the mailbox's exclusive lock and its snapshot (RFC 1939 s.4), stamp last_login.

    Raises MailboxInUse if another live session holds the lock.
    """

    def snapshot() -> list[tuple[int, int, str]]:
        return list(
            Message.objects.filter(mailbox_id=mailbox_id).order_by("id").values_list("id", "size", "uid")
        )

    lock, rows = MailboxLock.take(mailbox_id, peer, then=snapshot)
    return OrmMaildrop(lock, rows)


class OrmMaildrop(Maildrop):
    """A locked mailbox's snapshot; bodies streamed from the body store chunk by chunk."""

    def __init__(self, lock: MailboxLock, rows: list[tuple[int, int, str]]):
        super().__init__([MessageInfo(size=size, uid=uid) for _, size, uid in rows])
        self.lock = lock
        self.mailbox_id = lock.mailbox_id
        self.message_ids = [message_id for message_id, _, _ in rows]

    @property
    def token(self) -> str:
        return self.lock.token

    @property
    def released(self) -> bool:
        return self.lock.released

    def read(self, number: int) -> Iterator[bytes]:
        # Each chunk is its own short query: no transaction is open while the caller writes to a socket.
        return get_body_store().read_chunks(self.message_ids[number - 1])

    def commit(self) -> None:
        """RFC 1939 s.6 UPDATE: delete the marked messages and release the lock in ONE transaction, after
        checking the lock is still ours. On any failure nothing is deleted."""
        numbers = sorted(self.deleted)
        ids = [self.message_ids[n - 1] for n in numbers]
        octets = sum(self.info(n).size for n in numbers)
        with one_writer(), transaction.atomic():
            if not self.lock.is_held():
                raise CommitFailed("the mailbox lock was lost")
            delete_messages(ids, mailbox_id=self.mailbox_id)
            self.lock.free()
        self.lock.forget()
        if ids:
            mailbox_id = self.mailbox_id
            # Outside the write lock (a slow receiver must not hold up every writer); at once, or when an
            # outer transaction commits. robust: the deletions are committed, whatever a receiver does.
            transaction.on_commit(lambda: _announce_deleted(mailbox_id, len(ids), octets), robust=True)

    def release(self) -> None:
        self.lock.release()


def _announce_deleted(mailbox_id: int, count: int, octets: int) -> None:
    mailbox = Mailbox.objects.filter(pk=mailbox_id).first()
    send_safely(messages_deleted, mailbox=mailbox, count=count, octets=octets)
