"""What becomes of deleted and retrieved mail: a mailbox's policy, EXPIRE's value, and ``popexpire``.

Two policies, each a site default (POPSERVER_KEEP_DELETED_DAYS, POPSERVER_EXPIRE_RETRIEVED_DAYS) that a
mailbox may override:

- keep deleted: 0 deletes at QUIT (RFC 1939 s.6); N hides the messages at QUIT (``deleted_at``), keeps them
  restorable for N days (the admin), and ``popexpire`` purges them afterwards. Like Dovecot's
  ``pop3_deleted_flag``, the client sees them gone either way.
- expire retrieved: never, or N days after a message's first RETR (TOP does not count). RFC 2449 s.6.7
  EXPIRE announces it; with 0 a QUIT also deletes what the session retrieved, and ``popexpire`` deletes what
  a session retrieved but did not end with QUIT (a dropped connection deletes nothing itself, s.6).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.db import DatabaseError, transaction
from django.db.models import Q, Sum
from django.utils import timezone

from ..conf import get_setting
from ..exceptions import MailboxInUse, ServerBusy
from ..models import Mailbox, Message
from ..overload import refused
from ..signals import messages_deleted, send_safely
from ..protocol.wire import expire_value
from .deletion import BATCH_SIZE, batched, delete_messages
from .gate import using_database
from .lock import MailboxLock
from .writelock import one_writer

logger = logging.getLogger("popserver.storage")

NEVER = None


@dataclass(frozen=True)
class RetentionPolicy:
    keep_deleted_days: int  # 0: deleted at QUIT
    expire_days: int | None  # None: retrieved messages never expire


def policy_from_fields(
    keep_deleted_days: int | None, expire_policy: str, expire_days: int | None
) -> RetentionPolicy:
    """A mailbox's policy from its own fields (empty: the site's defaults)."""
    keep = get_setting("KEEP_DELETED_DAYS") if keep_deleted_days is None else keep_deleted_days
    if expire_policy == "never":
        expire = NEVER
    elif expire_policy == "days":
        expire = expire_days  # None (no days given; the admin refuses that) counts as never
    else:
        expire = get_setting("EXPIRE_RETRIEVED_DAYS")
    return RetentionPolicy(int(keep), None if expire is None else int(expire))


POLICY_FIELDS = ("keep_deleted_days", "expire_policy", "expire_days")


def policy_of_mailbox(mailbox: Mailbox) -> RetentionPolicy:
    return policy_from_fields(*(getattr(mailbox, name) for name in POLICY_FIELDS))


def policy_of_mailbox_id(mailbox_id: int) -> RetentionPolicy:
    return policy_from_fields(*Mailbox.objects.filter(pk=mailbox_id).values_list(*POLICY_FIELDS).get())


# EXPIRE before login ------------------------------------------------------------------------------------
BEFORE_LOGIN_CACHE_SECONDS = 10.0
_before_login: tuple[float, object, str] | None = None
_before_login_guard = threading.Lock()


def expire_before_login() -> str | None:
    """RFC 2449 s.6.7 before login: the most restrictive value over the site default and every mailbox's
    own (0 < N < NEVER), followed by USER when mailboxes differ. Cached a few seconds per process. None (no
    EXPIRE line) when the database cannot say: CAPA must not fail for it."""
    try:
        return _expire_before_login()
    except (DatabaseError, ServerBusy):  # once per interval under load (popserver.overload)
        refused("capa-expire", "EXPIRE for CAPA before login: the database did not answer; not announced")
        return None


def _expire_before_login() -> str:
    global _before_login
    site = get_setting("EXPIRE_RETRIEVED_DAYS")
    now = time.monotonic()
    with _before_login_guard:
        if _before_login and _before_login[1] == site and now - _before_login[0] < BEFORE_LOGIN_CACHE_SECONDS:
            return _before_login[2]
    values: set[int | None] = {site}
    with using_database():  # only when the cache is stale: CAPA floods take no connection
        policies = list(
            Mailbox.objects.exclude(expire_policy="").values_list("expire_policy", "expire_days").distinct()
        )
    for policy, days in policies:
        values.add(days if policy == "days" else NEVER)
    strictest = min(values, key=lambda value: float("inf") if value is None else value)
    tag = expire_value(strictest) + (" USER" if len(values) > 1 else "")
    with _before_login_guard:
        _before_login = (now, site, tag)
    return tag


def forget_expire_before_login() -> None:
    global _before_login
    with _before_login_guard:
        _before_login = None


# Session end ---------------------------------------------------------------------------------------------
def record_first_retrievals(message_ids: Iterable[int], now: datetime | None = None) -> int:
    """Stamp ``first_retrieved_at`` of these messages where it is empty: one UPDATE per batch."""
    now = now or timezone.now()
    stamped = 0
    for batch in batched(message_ids, BATCH_SIZE):
        stamped += Message.objects.filter(id__in=batch, first_retrieved_at__isnull=True).update(
            first_retrieved_at=now
        )
    return stamped


def hide_messages(message_ids: Iterable[int], mailbox_id: int, now: datetime | None = None) -> int:
    """The keep-deleted form of deleting: hidden from POP3 now, restorable until purged."""
    now = now or timezone.now()
    hidden = 0
    for batch in batched(message_ids, BATCH_SIZE):
        hidden += Message.objects.filter(id__in=batch, mailbox_id=mailbox_id).update(deleted_at=now)
    return hidden


def restore_messages(message_ids: Iterable[int]) -> int:
    """Bring back messages hidden by a keep-deleted QUIT, with their unique ids (clients that kept a copy
    do not download them again)."""
    restored = 0
    for batch in batched(message_ids, BATCH_SIZE):
        with one_writer():
            restored += Message.objects.filter(id__in=batch, deleted_at__isnull=False).update(deleted_at=None)
    return restored


# popexpire -----------------------------------------------------------------------------------------------
@dataclass
class ExpiryReport:
    mailboxes: int = 0
    skipped_locked: list[str] = field(default_factory=list)
    purged: int = 0  # kept-deleted messages past their days
    expired: int = 0  # retrieved messages past their days
    failed: int = 0  # mailboxes that raised a database error (logged)

    def summary(self) -> str:
        skipped = len(self.skipped_locked)
        failed = f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.mailboxes} mailboxes checked, {self.purged} deleted messages purged, "
            f"{self.expired} retrieved messages expired, {skipped} locked mailboxes skipped{failed}"
        )


def mailboxes_with_work() -> list[int]:
    """Mailboxes that have kept-deleted or retrieved messages: the only ones a policy can act on."""
    rows = Message.objects.filter(Q(deleted_at__isnull=False) | Q(first_retrieved_at__isnull=False))
    return list(rows.order_by("mailbox_id").values_list("mailbox_id", flat=True).distinct())


# Under EXPIRE 0 a QUIT deletes what its session retrieved; what remains was retrieved by a session that ended
# without QUIT (maybe before the client had it all): it goes after this grace, not at once.
EXPIRE_ZERO_GRACE = timedelta(days=1)


def due_messages(mailbox_id: int, policy: RetentionPolicy, now: datetime) -> tuple[list[int], list[int]]:
    """(kept-deleted ids past their days, retrieved ids past their days) of one mailbox."""
    deleted = Message.objects.filter(mailbox_id=mailbox_id, deleted_at__isnull=False)
    if policy.keep_deleted_days:
        deleted = deleted.filter(deleted_at__lte=now - timedelta(days=policy.keep_deleted_days))
    expired: list[int] = []
    if policy.expire_days is not None:
        cutoff = now - max(timedelta(days=policy.expire_days), EXPIRE_ZERO_GRACE)
        expired = list(
            Message.objects.visible()
            .filter(mailbox_id=mailbox_id, first_retrieved_at__lte=cutoff)
            .order_by("id")
            .values_list("id", flat=True)
        )
    return list(deleted.order_by("id").values_list("id", flat=True)), expired


def _expire_mailbox(mailbox_id: int, now: datetime) -> tuple[int, int]:
    """Delete what one mailbox's policy says is due, locking it as a session would (only when something
    is due: a run must not make clients meet [IN-USE] for nothing); (purged, expired).

    Expired messages are deleted, not hidden, whatever the keep-deleted policy: nobody deleted them.
    """
    purge, expire = due_messages(mailbox_id, policy_of_mailbox_id(mailbox_id), now)
    if not purge and not expire:
        return 0, 0

    def due(mailbox: Mailbox) -> tuple[list[int], list[int]]:  # again, under the lock
        return due_messages(mailbox_id, policy_of_mailbox(mailbox), now)

    lock, (purge, expire) = MailboxLock.take(mailbox_id, "popexpire", then=due, stamp_login=False)
    try:
        with one_writer(), transaction.atomic():
            if not lock.is_held():
                return 0, 0
            octets = Message.objects.filter(id__in=expire).aggregate(total=Sum("size"))["total"] or 0
            purged = delete_messages(purge, mailbox_id=mailbox_id)
            expired = delete_messages(expire, mailbox_id=mailbox_id)
    finally:
        lock.release()
    if expired:
        mailbox = Mailbox.objects.filter(pk=mailbox_id).first()
        send_safely(messages_deleted, mailbox=mailbox, count=expired, octets=octets)
    return purged, expired


def apply_policies(
    mailbox_ids: Iterable[int] | None = None,
    now: datetime | None = None,
    *,
    progress: Callable[[int], None] = lambda done: None,
) -> ExpiryReport:
    """Apply both policies to these mailboxes (default: every one with something to do), locking each as a
    POP3 session would; a locked mailbox is skipped (its session is reading it) and done on the next run, a
    failing one is logged and counted. Idempotent."""
    now = now or timezone.now()
    report = ExpiryReport()
    for done, mailbox_id in enumerate(mailboxes_with_work() if mailbox_ids is None else mailbox_ids, start=1):
        report.mailboxes += 1
        try:
            purged, expired = _expire_mailbox(mailbox_id, now)
        except MailboxInUse:
            report.skipped_locked.append(str(Mailbox.objects.filter(pk=mailbox_id).first()))
        except (Mailbox.DoesNotExist, DatabaseError):
            logger.exception("popexpire: mailbox %s failed; the others go on", mailbox_id)
            report.failed += 1
        else:
            report.purged += purged
            report.expired += expired
        progress(done)
    logger.info("popexpire: %s", report.summary())
    return report
