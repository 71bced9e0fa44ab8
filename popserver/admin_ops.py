"""What the admin does to mailboxes, kept apart from its pages: release a stale lock, empty a mailbox, delete
messages with their bodies. Each is one transaction; none writes to a socket."""
from __future__ import annotations

import enum
from collections.abc import Iterable

from django.db import transaction
from django.db.models import Sum

from .bodystore import get_body_store
from .maildrop import DELETE_BATCH, FREE_LOCK, batched, lock_is_stale
from .models import Mailbox, Message


class LockRelease(enum.Enum):
    RELEASED = "released"
    NOT_LOCKED = "not locked"
    LIVE = "held by a live session"


def release_stale_lock(mailbox_id: int) -> tuple[LockRelease, Mailbox]:
    """Free the mailbox's lock if its holder is gone (``maildrop.lock_is_stale``); never a live session's.

    Returns the outcome and the mailbox as it was read (its lock fields name the holder).
    """
    with transaction.atomic():
        mailbox = Mailbox.objects.select_for_update().get(pk=mailbox_id)
        if not mailbox.lock_token:
            return LockRelease.NOT_LOCKED, mailbox
        if not lock_is_stale(mailbox):
            return LockRelease.LIVE, mailbox
        # Conditional on the token we judged: a session that took the lock meanwhile keeps it.
        freed = Mailbox.objects.filter(pk=mailbox_id, lock_token=mailbox.lock_token).update(**FREE_LOCK)
    return (LockRelease.RELEASED if freed else LockRelease.LIVE), mailbox


def delete_messages(message_ids: Iterable[int]) -> int:
    """Delete these messages and their bodies, in batches inside the caller's transaction (or one of its own).

    A live POP3 session that listed one of them answers ``-ERR Message N expunged.`` when asked for it.
    """
    store = get_body_store()
    deleted = 0
    with transaction.atomic():
        for batch in batched(message_ids, DELETE_BATCH):
            store.delete(batch)
            _, per_model = Message.objects.filter(pk__in=batch).delete()
            deleted += per_model.get(Message._meta.label, 0)
    return deleted


def empty_mailbox(mailbox_id: int) -> tuple[int, int]:
    """Delete every message of a mailbox and its body in one transaction; returns (messages, octets)."""
    with transaction.atomic():
        messages = Message.objects.filter(mailbox_id=mailbox_id)
        octets = messages.aggregate(total=Sum("size"))["total"] or 0
        count = delete_messages(list(messages.order_by("pk").values_list("pk", flat=True)))
    return count, octets
