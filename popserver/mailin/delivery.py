"""Getting mail in: the one API that every delivery path uses (``manage.py deliver``, the admin, the demo).

``deliver(recipient, data)`` stores a message in the form the server presents it (Dovecot's rule: a bare LF
becomes CRLF, a lone CR stays, every other byte is unchanged), with its size in octets of that form, a unique
id for UIDL and the Subject, From and Date headers decoded for display. Everything is written in one
transaction, after the mailbox's quota has been checked; ``signals.message_delivered`` is sent once it has
been committed. ``importmail`` stores through the same path (``prepare_message`` and ``store_prepared``),
keeping the unique ids the messages had on the old server.
"""

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header
from email.utils import parsedate_to_datetime
from functools import partial

from django.db import DatabaseError, IntegrityError, connections, router, transaction
from django.db.models import F
from django.utils import timezone

from popserver import signals
from popserver.conf import get_setting
from popserver.exceptions import (
    DuplicateMessage,
    EmptyMessage,
    InvalidUniqueId,
    MessageTooLarge,
    UnknownRecipient,
)
from popserver.mailin import notices, quota
from popserver.mailin.mailboxes import find_mailbox
from popserver.models import DeliveryCount, Mailbox, Message, new_uid_validity
from popserver.protocol.wire import has_header_end, normalize_line_endings
from popserver.storage.bodies import BodyStore, get_body_store
from popserver.storage.compiled import CompiledQuery, Update
from popserver.storage.writelock import one_writer

logger = logging.getLogger(__name__)

ENVELOPE_PREFIX = b"From "  # an mbox envelope line (Postfix pipe flag F); dovecot-lda drops it too
HEADER_SCAN_LIMIT = 1024 * 1024  # octets searched for the header fields shown for display
DISPLAY_LIMIT = 1000  # characters kept of a decoded Subject or From
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # PostgreSQL text cannot hold NUL; none is worth showing
_HEADER_BREAKERS = re.compile(r"[\r\n\x00]")
UID_RE = re.compile(r"[\x21-\x7e]{1,70}")  # RFC 1939 s.7
_GENERATED_FORM = re.compile(r"([0-9A-Fa-f]{8,})([0-9A-Fa-f]{8})")  # format_uid(): counter, then uid_validity
COUNTER_LIMIT = 2**48  # an imported id numbered past this gets a new uid_validity instead of a bigger counter


@dataclass(frozen=True, slots=True)
class DisplayHeaders:
    subject: str = ""
    sender: str = ""
    date: datetime | None = None


@dataclass(frozen=True, slots=True)
class PreparedMessage:
    """A message in its stored form, checked against the size limit, with its display headers."""

    data: bytes
    headers: DisplayHeaders

    @property
    def size(self) -> int:
        return len(self.data)


def deliver(
    recipient: str, data: bytes, *, return_path: str | None = None, delivered_to: str | None = None
) -> Message:
    """Store ``data`` (an RFC 5322 message, bytes as received) in the mailbox of ``recipient``.

    ``recipient`` is a login name or one of the mailbox's addresses, compared case-insensitively; a
    ``user+detail`` form delivers to ``user``. A leading mbox ``From `` line is dropped.

    Nothing is added to the message unless asked, as with Postfix's pipe flags and dovecot-lda:
    ``return_path`` puts ``Return-Path: <return_path>`` on top (``""`` is the null sender, ``<>``) and
    ``delivered_to`` puts ``Delivered-To: delivered_to`` below it. Both count toward the size limit.

    Raises ``EmptyMessage`` for no bytes, ``MessageTooLarge`` when the message as stored (the size POP3
    clients see in LIST) is over POPSERVER_MAX_MESSAGE_SIZE, ``UnknownRecipient`` when no mailbox takes it,
    ``QuotaExceeded`` when the mailbox is full (``popserver.mailin.quota``), ``ValueError`` for a ``return_path``
    or ``delivered_to`` that would break the header (a line break, a NUL), and database errors as they come
    (the ``deliver`` command turns those into EX_TEMPFAIL).
    """
    data = strip_envelope_line(data)
    if not data:
        raise EmptyMessage("empty message")
    prepared = prepare_message(trace_fields(return_path=return_path, delivered_to=delivered_to) + data)
    mailbox = resolve_mailbox(recipient)
    return store_prepared(mailbox, prepared)


def prepare_message(data: bytes) -> PreparedMessage:
    """``data`` in the form the server presents it (bare LF as CRLF), its size checked, headers parsed.

    Raises ``EmptyMessage`` or ``MessageTooLarge``.
    """
    if not data:
        raise EmptyMessage("empty message")
    limit = get_setting("MAX_MESSAGE_SIZE")
    if len(data) > limit:  # the presented form is never shorter: refuse before converting
        raise MessageTooLarge(f"message of {len(data)} octets is over the limit of {limit} octets")
    data = normalize_line_endings(data)  # returns data itself when it has no bare LF
    if len(data) > limit:
        raise MessageTooLarge(f"message of {len(data)} octets is over the limit of {limit} octets")
    return PreparedMessage(data, parse_display_headers(data))


_STATE_FIELDS = ("next_uid", "uid_validity", "quota_bytes", "quota_messages")
_LOCKED_STATE = CompiledQuery(
    lambda pk: Mailbox.objects.select_for_update().filter(pk=pk).values_list(*_STATE_FIELDS),
    model=Mailbox,
    kinds=(int,),
    write=True,
)
_SET_NEXT_UID = CompiledQuery(
    lambda next_uid, pk: Update(Mailbox.objects.filter(pk=pk), next_uid=next_uid),
    model=Mailbox,
    kinds=(int, int),
    write=True,
)


# By database alias: the SQL of _take_next_uid, or None where UPDATE has no RETURNING.
_TAKE_NEXT_UID: dict[str, str | None] = {}


def _take_next_uid(pk: int) -> tuple[list, int]:
    """The mailbox's locked state (``_STATE_FIELDS``) and how far its counter has been moved already.

    Where UPDATE has RETURNING (PostgreSQL; SQLite from 3.35; not MariaDB) the row lock and the counter are
    one statement that takes the next id at once (``next_uid`` is given as it was before): one round trip
    fewer per copy. Elsewhere the row is locked with SELECT ... FOR UPDATE and the counter written after.
    A refusal after it (the quota) rolls the counter back with the rest of the transaction or savepoint."""
    alias = router.db_for_write(Mailbox)
    connection = connections[alias]
    sql = _TAKE_NEXT_UID.get(alias, "")
    if sql == "":
        sql = None
        if connection.vendor == "postgresql" or (
            connection.vendor == "sqlite" and connection.Database.sqlite_version_info >= (3, 35)
        ):
            quote, meta = connection.ops.quote_name, Mailbox._meta
            columns = [quote(meta.get_field(name).column) for name in _STATE_FIELDS]
            sql = (
                f"UPDATE {quote(meta.db_table)} SET {columns[0]} = {columns[0]} + 1 "
                f"WHERE {quote(meta.pk.column)} = %s RETURNING {', '.join(columns)}"
            )
        _TAKE_NEXT_UID[alias] = sql
    if sql is None:
        return _LOCKED_STATE.rows(pk), 0
    with connection.cursor() as cursor:
        cursor.execute(sql, [pk])
        rows = cursor.fetchall()
    return [(row[0] - 1, *row[1:]) for row in rows], 1


def store_prepared(
    mailbox: Mailbox,
    prepared: PreparedMessage,
    *,
    uid: str | None = None,
    enforce_quota: bool = True,
    send_signal: bool = True,
    savepoint: bool = True,
) -> Message:
    """Store a prepared message in ``mailbox``: the one storage path of delivery and of ``importmail``.

    One transaction: lock the mailbox's row, check the quota (unless ``enforce_quota`` is false), take the
    next unique id (or keep ``uid``, an imported one), write the row and the body, and when the message takes
    the mailbox across a share of its quota (POPSERVER_QUOTA_WARNINGS), a warning after it. After the commit:
    ``message_delivered`` (and ``quota_warning``) when ``send_signal``, which also marks a delivery (imports
    neither warn nor count in the admin's overview).

    With ``uid``: raises ``InvalidUniqueId`` unless it is 1-70 characters in 0x21-0x7E, ``DuplicateMessage``
    if the mailbox already has it; and the counter is moved past it (or the mailbox's uid_validity changed)
    so that no id the server generates later can equal it.

    Inside a caller's transaction the copy gets a savepoint, so that a refusal undoes it alone; a caller that
    stores one copy and rolls back on any refusal passes ``savepoint=False`` (two round trips fewer).
    """
    if uid is not None:
        validate_uid(uid)
    store = get_body_store()
    staged = store.stage(prepared.data)  # an object store writes the object now, before any row refers to it
    # SQLite: queue behind other writers (the server's included) instead of polling; not inside a caller's
    # transaction, which may already hold SQLite's write lock (taking ours then could only invert the order).
    writer = nullcontext() if transaction.get_connection().in_atomic_block else one_writer()
    with writer, transaction.atomic(savepoint=savepoint):
        # The row lock serialises deliveries and imports into one mailbox: the quota sum and the counter
        # below see every message committed before it (READ COMMITTED on PostgreSQL and MariaDB; SQLite's
        # IMMEDIATE transactions hold the database's write lock from their start). So of two deliveries
        # racing across a warning share, exactly one sees itself crossing it.
        if uid is None:  # a new id: lock the row and take the id in one statement where the database can
            locked, moved = _take_next_uid(mailbox.pk)
        else:
            locked, moved = _LOCKED_STATE.rows(mailbox.pk), 0  # compiled once
        if not locked:
            raise Mailbox.DoesNotExist(f"mailbox {mailbox.pk} is gone")
        state = dict(zip(_STATE_FIELDS, locked[0], strict=True))
        crossing = warning = None
        if enforce_quota:
            applying = quota.limits(state["quota_bytes"], state["quota_messages"])
            before = quota.check(mailbox.pk, applying, prepared.size)
            if before is not None and send_signal:
                crossing = quota.crossing(before, prepared.size, applying)
            if crossing is not None and get_setting("QUOTA_WARNING_MESSAGE"):
                after = quota.Usage(before.messages + 1, before.octets + prepared.size)
                try:
                    warning = quota_warning_message(mailbox, crossing, applying, after)
                except DatabaseError:
                    raise
                except Exception:  # noqa: BLE001  (a site's broken template must never refuse mail)
                    logger.exception("could not write the quota warning of mailbox %s", mailbox.pk)
        next_uid, uid_validity = state["next_uid"], state["uid_validity"]
        if uid is None:
            # The counter only grows: never reused, even after a QUIT deleted the newest message.
            uid = format_uid(next_uid, uid_validity)
            next_uid += 1
        else:
            if Message.objects.filter(mailbox_id=mailbox.pk, uid=uid).exists():
                raise DuplicateMessage(f"the mailbox already has a message with unique id {uid}")
            next_uid, uid_validity = _keep_generated_ids_apart(mailbox.pk, uid, next_uid, uid_validity)
        warning_uid = None
        if warning is not None:
            warning_uid = format_uid(next_uid, uid_validity)
            next_uid += 1
        if next_uid != state["next_uid"] + moved:
            _SET_NEXT_UID.execute(next_uid, mailbox.pk)
        mailbox.next_uid, mailbox.uid_validity = next_uid, uid_validity
        message = _save(mailbox, prepared, uid, store, staged)
        # The warning's body is staged here, inside the transaction: a crash leaves at most an unreferenced
        # object, which popgc removes.
        notice = None if warning is None else _save(mailbox, warning, warning_uid, store, server_notice=True)
        if send_signal:
            if not getattr(_batch, "open", False):  # else the caller counts (counting_deliveries)
                transaction.on_commit(partial(count_delivery, message.size))
            transaction.on_commit(
                partial(signals.send_safely, signals.message_delivered, mailbox=mailbox, message=message)
            )
        if crossing is not None:
            transaction.on_commit(
                partial(
                    signals.send_safely,
                    signals.quota_warning,
                    mailbox=mailbox,
                    unit=crossing.unit,
                    threshold=crossing.threshold,
                    used=crossing.used,
                    limit=crossing.limit,
                    message=notice,
                )
            )
    logger.debug(
        "stored message %s (%d octets, uid %s) in mailbox %s",
        message.pk,
        message.size,
        message.uid,
        mailbox.pk,
    )
    if crossing is not None:
        logger.info(
            "mailbox %s crossed %s %% of its quota of %d %s",
            mailbox.pk,
            crossing.threshold,
            crossing.limit,
            crossing.unit,
        )
    return message


def _save(
    mailbox: Mailbox,
    prepared: PreparedMessage,
    uid: str,
    store: BodyStore,
    staged: object = None,
    *,
    server_notice: bool = False,
) -> Message:
    headers = prepared.headers
    message = Message(
        mailbox=mailbox,
        uid=uid,
        size=prepared.size,
        subject=headers.subject,
        sender=headers.sender,
        date=headers.date,
        server_notice=server_notice,
        has_header_end=has_header_end(prepared.data),
    )
    store.save(message, prepared.data, staged)  # saves the row with its body's location
    return message


def quota_warning_message(
    mailbox: Mailbox, crossing: quota.Crossing, applying: quota.Limits, after: quota.Usage
) -> PreparedMessage:
    """The warning as a prepared message (``popserver.mailin.notices``); never refused for its size."""
    data = normalize_line_endings(notices.quota_warning(mailbox, crossing, applying, after))
    return PreparedMessage(data, parse_display_headers(data))


_batch = threading.local()  # open: counting_deliveries() is open in this thread


@contextmanager
def counting_deliveries() -> Iterator[None]:
    """Inside the block ``store_prepared`` leaves the admin's delivery count to the caller, who adds the copies
    that stayed with ``count_in_transaction`` before its commit (LMTP: one statement in the delivery's own
    transaction instead of a commit of its own after it). Not re-entrant."""
    _batch.open = True
    try:
        yield
    finally:
        _batch.open = False


def count_in_transaction(octets: int, *, messages: int = 1, now: datetime | None = None) -> None:
    """Add ``messages`` deliveries of ``octets`` in all to their hour's ``DeliveryCount`` inside the caller's
    transaction, which counts them if and only if it commits. One UPDATE; its row lock is held to the
    commit, as ``count_delivery``'s own commit held it (the lock is taken after the mailbox rows, in every
    delivery: no deadlock). The hour's first delivery finds no row: it is counted after the commit by
    ``count_delivery``, which creates it. A database error here is the transaction's (it raises)."""
    hour = (now or timezone.now()).replace(minute=0, second=0, microsecond=0)
    add = {"messages": F("messages") + messages, "octets": F("octets") + octets}
    if not DeliveryCount.objects.filter(hour=hour).update(**add):
        transaction.on_commit(partial(count_delivery, octets, now=hour, messages=messages))


def count_delivery(octets: int, now: datetime | None = None, *, messages: int = 1) -> None:
    """Add ``messages`` deliveries of ``octets`` in all to their hour's ``DeliveryCount`` (the admin's
    overview). Runs after the deliveries have committed, in its own short write; a failure is logged and
    changes nothing for them."""
    hour = (now or timezone.now()).replace(minute=0, second=0, microsecond=0)
    add = {"messages": F("messages") + messages, "octets": F("octets") + octets}
    try:
        with one_writer():
            if DeliveryCount.objects.filter(hour=hour).update(**add):
                return
            try:
                with transaction.atomic():  # the hour's first delivery: one process creates its row
                    DeliveryCount.objects.create(hour=hour, messages=messages, octets=octets)
            except IntegrityError:
                DeliveryCount.objects.filter(hour=hour).update(**add)
    except DatabaseError:
        logger.exception("could not count a delivery")


# Trace fields --------------------------------------------------------------------------------------------
def trace_fields(*, return_path: str | None = None, delivered_to: str | None = None) -> bytes:
    """``Return-Path: <...>`` and ``Delivered-To: ...`` lines (CRLF) for the ones given, in that order.

    A return path may come with or without its angle brackets; ``""`` and ``"<>"`` are the null sender.
    Raises ValueError for a value with a CR, LF or NUL (it would end the header) or an empty Delivered-To.
    Command-line bytes that are not UTF-8 (decoded with surrogateescape) are written back as they came.
    """
    lines = []
    if return_path is not None:
        path = return_path.strip()
        if path.startswith("<") and path.endswith(">"):
            path = path[1:-1]
        lines.append(("Return-Path", f"<{path}>"))
    if delivered_to is not None:
        if not delivered_to.strip():
            raise ValueError("empty Delivered-To address")
        lines.append(("Delivered-To", delivered_to.strip()))
    for name, value in lines:
        if _HEADER_BREAKERS.search(value):
            raise ValueError(f"{name} must not contain a line break or a NUL: {value!r}")
    return b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape") for name, value in lines)


# Unique ids ----------------------------------------------------------------------------------------------
def format_uid(number: int, uid_validity: int) -> str:
    """The layout of Dovecot's ``%08Xu%08Xv`` in upper case: 16 characters in 0-9A-F (RFC 1939 s.7 allows 1-70
    in 0x21-0x7E). Dovecot's own ``X`` gives lower case; these ids are this server's and must never change
    form (clients would download everything again), so they stay as they are."""
    return f"{number:08X}{uid_validity:08X}"


def validate_uid(uid: str) -> None:
    """Raise InvalidUniqueId unless ``uid`` is 1-70 characters in 0x21-0x7E (RFC 1939 s.7)."""
    if not isinstance(uid, str) or not UID_RE.fullmatch(uid):
        raise InvalidUniqueId(
            f"unique id {uid!r} is not allowed: RFC 1939 wants 1-70 printable ASCII characters, no spaces"
        )


def generated_number(uid: str, uid_validity: int) -> int | None:
    """N if ``uid`` has the form of a generated id, ``format_uid(N, uid_validity)`` (case ignored, to be
    safe with clients that fold case); None otherwise."""
    match = _GENERATED_FORM.fullmatch(uid)
    if match is None or int(match[2], 16) != uid_validity:
        return None
    return int(match[1], 16)


def _keep_generated_ids_apart(mailbox_id: int, uid: str, next_uid: int, uid_validity: int) -> tuple[int, int]:
    """Make sure the server never generates ``uid`` (being imported): returns the new (next_uid, uid_validity).

    Generated ids are ``format_uid(next_uid, uid_validity)`` with a counter that only grows, so an imported
    id of that form moves the counter past it. One whose number is too large to count past gets the mailbox
    a new uid_validity instead (stored ids are kept as they are; only later ones change form).
    """
    number = generated_number(uid, uid_validity)
    if number is None:
        return next_uid, uid_validity
    if number < COUNTER_LIMIT:
        if number >= next_uid:
            next_uid = number + 1
            Mailbox.objects.filter(pk=mailbox_id).update(next_uid=next_uid)
        return next_uid, uid_validity
    return next_uid, renew_uid_validity(mailbox_id, also=[uid])


def renew_uid_validity(mailbox_id: int, also=(), avoid=()) -> int:
    """Give the mailbox a new uid_validity that none of its ids (nor those in ``also``) ends with and that is
    not in ``avoid``; returns it. Call with the mailbox's row locked. Stored ids do not change."""
    taken = [u.upper() for u in Message.objects.filter(mailbox_id=mailbox_id).values_list("uid", flat=True)]
    taken += [u.upper() for u in also]
    current = Mailbox.objects.filter(pk=mailbox_id).values_list("uid_validity", flat=True).get()
    while True:
        candidate = new_uid_validity()
        suffix = f"{candidate:08X}"
        if candidate != current and candidate not in avoid and not any(u.endswith(suffix) for u in taken):
            break
    Mailbox.objects.filter(pk=mailbox_id).update(uid_validity=candidate)
    logger.info(
        "mailbox %s: uid_validity renewed so that generated unique ids stay apart from imported ones",
        mailbox_id,
    )
    return candidate


def strip_envelope_line(data: bytes) -> bytes:
    """``data`` without a leading mbox ``From `` line (only the first line, only if it starts so)."""
    if not data.startswith(ENVELOPE_PREFIX):
        return data
    end = data.find(b"\n")
    return b"" if end < 0 else data[end + 1 :]


# Recipients ----------------------------------------------------------------------------------------------
def resolve_mailbox(recipient: str) -> Mailbox:
    """The mailbox that takes mail for ``recipient``; raises ``UnknownRecipient``.

    Tried in order, each case-insensitively: the login name (the user model's USERNAME_FIELD), then an
    address; then the same for the recipient without its ``+detail`` (``bob+lists@example.org`` ->
    ``bob@example.org``, ``bob+lists`` -> ``bob``). With POPSERVER_AUTO_CREATE_MAILBOX a user without a
    mailbox gets one. (``popserver.mailin.mailboxes.find_mailbox``.)
    """
    recipient = recipient.strip()
    mailbox = find_mailbox(recipient, plus_detail=True)
    if mailbox is None:
        raise UnknownRecipient(f"no mailbox for {recipient!r}" if recipient else "no recipient")
    return mailbox


# Headers for display -------------------------------------------------------------------------------------
def parse_display_headers(data: bytes) -> DisplayHeaders:
    """Subject, From and Date of a message in the presented form; never raises on garbage.

    RFC 2047 encoded words are decoded (an unknown charset or broken encoding is replaced, not fatal), raw
    8-bit header bytes are read as UTF-8 with undecodable bytes replaced, and the Date is an aware datetime
    in UTC or None.
    """
    fields = _header_fields(data)
    return DisplayHeaders(
        subject=decode_header_value(fields.get(b"subject", b"")),
        sender=decode_header_value(fields.get(b"from", b"")),
        date=parse_date(fields.get(b"date", b"")),
    )


def header_value(data: bytes, name: bytes) -> bytes | None:
    """The first ``name`` field (lower case, e.g. ``b"x-uidl"``) of a message in the presented form, unfolded
    and stripped; None when absent."""
    value = _header_fields(data, wanted=(name,)).get(name)
    return None if value is None else value.strip()


def _header_fields(data: bytes, wanted=(b"subject", b"from", b"date")) -> dict[bytes, bytes]:
    """The first occurrence of each wanted field in the header section, unfolded (RFC 5322 s.2.2.3)."""
    end = data.find(b"\r\n\r\n", 0, HEADER_SCAN_LIMIT)
    head = data[:end] if end >= 0 else data[:HEADER_SCAN_LIMIT]
    fields: dict[bytes, bytes] = {}
    current = None
    for line in head.split(b"\r\n"):
        if not line:  # the blank line that ends the header section (also a message that starts with one)
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                fields[current] += line
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip().lower()
        current = name if colon and name in wanted and name not in fields else None
        if current is not None:
            fields[current] = value
    return fields


def decode_header_value(raw: bytes) -> str:
    """A header value for display: RFC 2047 decoded, control characters removed, whitespace collapsed."""
    text = raw.decode("utf-8", errors="replace")
    try:
        parts = decode_header(text)
    except Exception:  # noqa: BLE001  (broken encoded words: show the text as it is; garbage never raises)
        parts = [(text, None)]
    decoded = []
    for part, charset in parts:
        if isinstance(part, str):
            decoded.append(part)
            continue
        try:  # decode_header gives the text around encoded words as raw-unicode-escape bytes
            decoded.append(part.decode(charset or "raw-unicode-escape", errors="replace"))
        except Exception:  # noqa: BLE001  (an unknown or non-text charset: read as UTF-8)
            decoded.append(part.decode("utf-8", errors="replace"))
    text = " ".join(_CONTROL_CHARS.sub(" ", "".join(decoded)).split())
    # no lone surrogates (from odd escapes) may reach the database
    return text.encode("utf-8", errors="replace").decode("utf-8")[:DISPLAY_LIMIT]


def parse_date(raw: bytes) -> datetime | None:
    """An RFC 5322 date as an aware datetime in UTC, or None when absent or unreadable."""
    text = " ".join(_CONTROL_CHARS.sub(" ", raw.decode("ascii", errors="replace")).split())
    if not text:
        return None
    try:
        value = parsedate_to_datetime(text)
        if value.tzinfo is None:  # "-0000": UTC, local zone unknown (RFC 5322 s.3.3)
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
    except Exception:  # noqa: BLE001  (ValueError, OverflowError...: an unreadable date is no date)
        return None
    return value if value.year >= 1000 else None  # MariaDB's DATETIME starts at year 1000
