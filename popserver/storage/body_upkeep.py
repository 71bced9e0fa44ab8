"""Upkeep of message bodies: ``popgc`` (what a crash or other code left behind) and ``popmovebodies``.

Both are safe while servers and deliveries run:

- ``collect_garbage`` recounts references, removes objects nothing refers to under their row's lock (a row
  made for the purpose, a "tombstone", when an object has none), and leaves objects younger than the grace
  period alone: a delivery writes its object before the row that refers to it.
- ``move_bodies`` takes each mailbox's lock as a POP3 session does, one batch of messages at a time, so no
  session holds a snapshot of a body being moved (a session that logs in meanwhile gets ``[IN-USE]`` for at
  most a batch; a mailbox in use is skipped and picked up again later or by the next run). Deliveries need no
  lock: their new messages are simply moved by a later batch or run. A batch commits as a whole, so an
  interrupted move leaves every message readable where its row says, and running it again resumes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta

from django.db import transaction
from django.db.models import Count, F
from django.utils import timezone

from ..exceptions import BodyUnavailable, MailboxInUse, MessageExpunged
from ..models import Message, MessageChunk, StoredBody
from .bodies import (
    BodyRef,
    DatabaseBodyStore,
    DjangoStorageBodyStore,
    body_storage,
    count_down,
    local_path,
    object_name,
    read_body,
    remove_unreferenced,
    upsert_body,
)
from .lock import MailboxLock
from .writelock import one_writer

logger = logging.getLogger("popserver.storage")

SHARDS = [f"{n:02x}" for n in range(256)]
LOOKUP_BATCH = 500
INCOMING_PREFIX = ".incoming-"  # write_object's temporary files


# popgc ----------------------------------------------------------------------------------------------------
@dataclass
class GarbageReport:
    recounted: int = 0  # stored bodies whose reference count was wrong (other code deleted messages)
    unreferenced_rows: int = 0  # stored bodies without references, removed with their objects
    orphans: int = 0  # objects without a row, older than the grace period, removed
    young: int = 0  # objects without a row, left alone (a delivery may be about to refer to them)
    leftovers: int = 0  # temporary files of interrupted writes, removed
    problems: list[str] = field(default_factory=list)


def collect_garbage(
    *, grace: float, dry_run: bool = False, progress: Callable[[int, int], None] | None = None
) -> GarbageReport:
    """Make the stored bodies consistent: recount, remove what nothing refers to. Idempotent."""
    report = GarbageReport()
    # 1. References: messages deleted by other code than popserver's delete path leave counts too high.
    wrong = StoredBody.objects.annotate(actual=Count("messages")).exclude(refs=F("actual"))
    for pk in list(wrong.values_list("pk", flat=True)):
        report.recounted += 1
        if not dry_run:
            with one_writer(), transaction.atomic():
                # Counted after the row lock: a delivery referring to it meanwhile has committed or waits.
                if StoredBody.objects.select_for_update().filter(pk=pk).exists():
                    actual = Message.objects.filter(stored_body_id=pk).count()
                    StoredBody.objects.filter(pk=pk).update(refs=actual)
    # 2. Rows without references (a crash between a deletion's commit and the object's removal).
    unreferenced = list(StoredBody.objects.filter(refs=0).values_list("pk", flat=True))
    report.unreferenced_rows = len(unreferenced)
    if unreferenced and not dry_run:
        report.unreferenced_rows = remove_unreferenced(unreferenced)
    # 3. Objects without rows (a crash between writing an object and committing its row).
    storage = body_storage()
    cutoff = timezone.now() - timedelta(seconds=grace)
    for done, shard in enumerate(SHARDS, start=1):
        for names in _batches(_objects_under(storage, shard, report)):
            by_sha = {name.rsplit("/", 1)[-1]: name for name in names}
            known = set(StoredBody.objects.filter(sha256__in=list(by_sha)).values_list("sha256", flat=True))
            for sha, name in by_sha.items():
                if sha in known:
                    continue
                if _modified(storage, name) > cutoff:
                    report.young += 1
                    continue
                report.orphans += 1
                if not dry_run and not _remove_orphan(storage, sha, name):
                    report.orphans -= 1
        if progress is not None:
            progress(done, len(SHARDS))
    _remove_leftovers(storage, cutoff, dry_run, report)
    return report


def _objects_under(storage, shard: str, report: GarbageReport) -> Iterator[str]:
    try:
        subdirs, _ = storage.listdir(shard)
    except FileNotFoundError:
        return
    for subdir in subdirs:
        _, files = storage.listdir(f"{shard}/{subdir}")
        for name in files:
            if len(name) == 64 and name.startswith(shard + subdir):
                yield f"{shard}/{subdir}/{name}"
            elif not name.startswith(INCOMING_PREFIX):
                report.problems.append(f"{shard}/{subdir}/{name}: not a body object, left alone")


def _batches(names: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for name in names:
        batch.append(name)
        if len(batch) >= LOOKUP_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _modified(storage, name: str):
    try:
        return storage.get_modified_time(name)
    except (NotImplementedError, OSError):
        return timezone.now()  # cannot tell its age: treat it as young


def _remove_orphan(storage, sha256: str, name: str) -> bool:
    """Remove an object that has no row, under a row made for the purpose (refs 0): a delivery of the same
    content waits for that row, then finds none and writes the object again; a delivery that came first has
    counted its reference, and the object stays."""
    with one_writer(), transaction.atomic():
        pk, refs = upsert_body(sha256, 0, add=0)  # the row, made or found, locked
        if refs:
            return False  # a delivery referred to it meanwhile
        storage.delete(name)
        StoredBody.objects.filter(pk=pk, refs=0).delete()
    return True


def _remove_leftovers(storage, cutoff, dry_run: bool, report: GarbageReport) -> None:
    """Temporary files of object writes that a crash interrupted (local file systems only)."""
    root = local_path(storage, "")
    if root is None or not os.path.isdir(root):
        return
    for directory, _, files in os.walk(root):
        for name in files:
            if name.startswith(INCOMING_PREFIX):
                path = os.path.join(directory, name)
                try:
                    if os.path.getmtime(path) < cutoff.timestamp():
                        report.leftovers += 1
                        if not dry_run:
                            os.unlink(path)
                except OSError:
                    pass


# popmovebodies --------------------------------------------------------------------------------------------
STORES = {
    "database": DatabaseBodyStore,
    "storage": DjangoStorageBodyStore,
}


@dataclass
class MoveReport:
    moved: int = 0
    octets: int = 0
    busy_mailboxes: set[int] = field(default_factory=set)  # in use by a session: left for a later run
    gone: int = 0  # deleted while being moved
    unreadable: set[int] = field(
        default_factory=set
    )  # messages whose body could not be read: left as they are
    problems: list[str] = field(default_factory=list)


def messages_to_move(target: str):
    """The messages whose bodies are not in ``target`` ("database" or "storage")."""
    if target == "storage":
        return Message.objects.filter(stored_body__isnull=True)
    return Message.objects.filter(stored_body__isnull=False)


def move_bodies(
    target: str,
    *,
    batch_messages: int = 100,
    batch_octets: int = 16 * 1024 * 1024,
    mailbox_ids: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MoveReport:
    """Move bodies into ``target`` ("database" or "storage"), one locked batch per mailbox at a time."""
    if target not in STORES:
        raise ValueError(f"unknown body store {target!r}: use one of {', '.join(STORES)}")
    pending = messages_to_move(target)
    if mailbox_ids is not None:
        pending = pending.filter(mailbox_id__in=mailbox_ids)
    total = pending.count()
    report = MoveReport()
    for mailbox_id in list(pending.order_by().values_list("mailbox_id", flat=True).distinct()):
        while True:
            try:
                moved = _move_batch(target, mailbox_id, batch_messages, batch_octets, report)
            except MailboxInUse:
                report.busy_mailboxes.add(mailbox_id)
                break
            if progress is not None:
                progress(report.moved, total)
            if not moved:
                break
    return report


def _move_batch(target: str, mailbox_id: int, batch_messages: int, batch_octets: int, report) -> int:
    """Move one batch of a mailbox's messages under the mailbox's lock; returns how many were moved."""

    def pick(mailbox) -> list[tuple[int, int, int, int | None]]:
        rows = messages_to_move(target).filter(mailbox_id=mailbox_id).exclude(pk__in=report.unreadable)
        rows = rows.order_by("pk")
        chosen, octets = [], 0
        for row in rows.values_list("pk", "size", "chunk_count", "stored_body_id")[
            :batch_messages
        ].iterator():
            if chosen and octets + row[1] > batch_octets:
                break
            chosen.append(row)
            octets += row[1]
        return chosen

    lock, rows = MailboxLock.take(mailbox_id, "popmovebodies", then=pick, stamp_login=False)
    try:
        if not rows:
            return 0
        if target == "storage":
            _to_storage(rows, report)
        else:
            _to_database(rows, report)
    finally:
        lock.release()
    return len(rows)


def _read_whole(ref: BodyRef, report: MoveReport) -> bytes | None:
    try:
        return b"".join(read_body(ref))
    except MessageExpunged:
        report.gone += 1
    except BodyUnavailable as exc:
        report.unreadable.add(ref.message_id)
        report.problems.append(str(exc))
        logger.error("popmovebodies: message %s left where it is: %s", ref.message_id, exc)
    return None


def _to_storage(rows, report: MoveReport) -> None:
    store = DjangoStorageBodyStore()
    bodies = []
    for pk, size, chunk_count, stored_body_id in rows:
        data = _read_whole(BodyRef(pk, chunk_count, stored_body_id), report)
        if data is None:
            continue
        bodies.append((pk, data, store.stage(data)))  # objects written before any row refers to them
    with one_writer(), transaction.atomic():
        for pk, data, staged in bodies:
            message = Message.objects.filter(pk=pk, stored_body__isnull=True).only("pk").first()
            if message is None:
                report.gone += 1
                continue
            store.save(message, data, staged)
            MessageChunk.objects.filter(message_id=pk).delete()
            report.moved += 1
            report.octets += len(data)


def _to_database(rows, report: MoveReport) -> None:
    store = DatabaseBodyStore()
    bodies = []
    for pk, size, chunk_count, stored_body_id in rows:
        data = _read_whole(BodyRef(pk, chunk_count, stored_body_id), report)
        if data is None:
            continue
        bodies.append((pk, stored_body_id, data))
    with one_writer(), transaction.atomic():
        released: Counter[int] = Counter()
        for pk, stored_body_id, data in bodies:
            message = Message.objects.filter(pk=pk, stored_body_id=stored_body_id).only("pk").first()
            if message is None:
                report.gone += 1
                continue
            store.save(message, data)
            released[stored_body_id] += 1
            report.moved += 1
            report.octets += len(data)
        count_down(released)  # objects left without references go after the commit


__all__ = ["STORES", "GarbageReport", "MoveReport", "collect_garbage", "move_bodies", "object_name"]
