"""Deleting messages with their bodies: the one path used by QUIT's UPDATE and by the admin.

Each call runs inside the caller's transaction (or one of its own) and writes nothing to a socket.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice
from typing import TypeVar

from django.db import transaction
from django.db.models import Sum

from ..models import Message
from .bodies import release_bodies

T = TypeVar("T")

# Ids per statement: well under SQLite's 32,766 bound parameters, and small enough to keep each one quick.
BATCH_SIZE = 500


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """itertools.batched (Python 3.12+)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def delete_messages(message_ids: Iterable[int], *, mailbox_id: int | None = None) -> int:
    """Delete these messages and their bodies in batches, in one transaction; returns how many went.

    ``mailbox_id`` restricts the deletion to that mailbox (QUIT deletes only from its own). A live POP3
    session that listed one of them answers ``-ERR Message N expunged.`` when asked for it.
    """
    deleted = 0
    with transaction.atomic():
        for batch in batched(message_ids, BATCH_SIZE):
            rows = Message.objects.filter(id__in=batch)
            if mailbox_id is not None:  # never another mailbox's messages, nor their bodies
                rows = rows.filter(mailbox_id=mailbox_id)
                batch = list(rows.values_list("id", flat=True))
            release_bodies(batch)  # chunks, and stored bodies' references (objects go after the commit)
            _, per_model = rows.delete()
            deleted += per_model.get(Message._meta.label, 0)
    return deleted


def empty_mailbox(mailbox_id: int) -> tuple[int, int]:
    """Delete every message of a mailbox and its body in one transaction; returns (messages, octets)."""
    with transaction.atomic():
        messages = Message.objects.filter(mailbox_id=mailbox_id)
        octets = messages.aggregate(total=Sum("size"))["total"] or 0
        count = delete_messages(list(messages.order_by("pk").values_list("pk", flat=True)))
    return count, octets
