"""Getting mail in: the one API that every delivery path uses (``manage.py deliver``, the admin, the demo).

``deliver(recipient, data)`` stores a message in the form the server presents it (Dovecot's rule: a bare LF
becomes CRLF, a lone CR stays, every other byte is unchanged), with its size in octets of that form, a unique
id for UIDL and the Subject, From and Date headers decoded for display. Everything is written in one
transaction; ``signals.message_delivered`` is sent once it has been committed.
"""
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import decode_header
from email.utils import parsedate_to_datetime
from functools import partial

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import CharField, F, Value
from django.db.models.functions import Lower

from . import signals
from .bodystore import get_body_store
from .conf import get_setting
from .exceptions import EmptyMessage, MessageTooLarge, UnknownRecipient
from .models import Address, Mailbox, Message
from .protocol.wire import normalize_line_endings

logger = logging.getLogger(__name__)

ENVELOPE_PREFIX = b"From "  # an mbox envelope line (Postfix pipe flag F); dovecot-lda drops it too
HEADER_SCAN_LIMIT = 1024 * 1024  # octets searched for the header fields shown for display
DISPLAY_LIMIT = 1000  # characters kept of a decoded Subject or From
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # PostgreSQL text cannot hold NUL; none is worth showing


@dataclass(frozen=True, slots=True)
class DisplayHeaders:
    subject: str = ""
    sender: str = ""
    date: datetime | None = None


def deliver(recipient: str, data: bytes) -> Message:
    """Store ``data`` (an RFC 5322 message, bytes as received) in the mailbox of ``recipient``.

    ``recipient`` is a login name or one of the mailbox's addresses, compared case-insensitively; a
    ``user+detail`` form delivers to ``user``. A leading mbox ``From `` line is dropped.

    Raises ``EmptyMessage`` for no bytes, ``MessageTooLarge`` when the message as stored (the size POP3
    clients see in LIST) is over POPSERVER_MAX_MESSAGE_SIZE, ``UnknownRecipient`` when no mailbox takes it,
    and database errors as they come (the ``deliver`` command turns those into EX_TEMPFAIL).
    """
    data = strip_envelope_line(data)
    if not data:
        raise EmptyMessage("empty message")
    limit = get_setting("MAX_MESSAGE_SIZE")
    if len(data) > limit:  # the presented form is never shorter: refuse before converting
        raise MessageTooLarge(f"message of {len(data)} octets is over the limit of {limit} octets")
    data = normalize_line_endings(data)  # returns data itself when it has no bare LF
    if len(data) > limit:
        raise MessageTooLarge(f"message of {len(data)} octets is over the limit of {limit} octets")
    headers = parse_display_headers(data)

    with transaction.atomic():
        mailbox = resolve_mailbox(recipient)
        # The counter only grows (never reused, even after a QUIT deleted the newest message); the row lock
        # the UPDATE takes serialises concurrent deliveries into one mailbox.
        Mailbox.objects.filter(pk=mailbox.pk).update(next_uid=F("next_uid") + 1)
        next_uid, uid_validity = (
            Mailbox.objects.filter(pk=mailbox.pk).values_list("next_uid", "uid_validity").get()
        )
        mailbox.next_uid, mailbox.uid_validity = next_uid, uid_validity
        message = Message.objects.create(
            mailbox=mailbox,
            uid=format_uid(next_uid - 1, uid_validity),
            size=len(data),
            subject=headers.subject,
            sender=headers.sender,
            date=headers.date,
        )
        get_body_store().save(message, data)
        transaction.on_commit(
            partial(signals.send_safely, signals.message_delivered, mailbox=mailbox, message=message)
        )
    logger.debug("delivered message %s (%d octets, uid %s) to mailbox %s", message.pk, message.size,
                 message.uid, mailbox.pk)
    return message


def format_uid(number: int, uid_validity: int) -> str:
    """Dovecot's ``%08Xu%08Xv``: 16 characters in 0-9A-F (RFC 1939 s.7 allows 1-70 in 0x21-0x7E)."""
    return f"{number:08X}{uid_validity:08X}"


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
    mailbox gets one.
    """
    recipient = recipient.strip()
    for candidate in _candidates(recipient):
        mailbox = _mailbox_of_login(candidate)
        if mailbox is None:
            address = (
                Address.objects.select_related("mailbox")
                .alias(folded=Lower("address"))
                .filter(folded=_folded(candidate))
                .first()
            )
            mailbox = address.mailbox if address is not None else None
        if mailbox is not None:
            return mailbox
    raise UnknownRecipient(f"no mailbox for {recipient!r}" if recipient else "no recipient")


def _candidates(recipient: str) -> list[str]:
    if not recipient:
        return []
    candidates = [recipient]
    local, at, domain = recipient.rpartition("@") if "@" in recipient else (recipient, "", "")
    base = local.split("+", 1)[0]
    if base and base != local:
        candidates.append(f"{base}{at}{domain}")
    return candidates


def _folded(text: str) -> Lower:
    """The database's own lower-casing, as on the column side (SQLite's LOWER() folds ASCII only)."""
    return Lower(Value(text, output_field=CharField()))


def _mailbox_of_login(login: str) -> Mailbox | None:
    User = get_user_model()
    users = list(
        User._default_manager.alias(folded=Lower(User.USERNAME_FIELD)).filter(folded=_folded(login))[:10]
    )
    if not users:
        return None
    if len(users) > 1:  # login names that differ only in case (Django's default User allows them)
        users = [user for user in users if user.get_username() == login]
        if len(users) != 1:
            return None
    user = users[0]
    mailbox = Mailbox.objects.filter(user=user).first()
    if mailbox is None and get_setting("AUTO_CREATE_MAILBOX"):
        mailbox, _ = Mailbox.objects.get_or_create(user=user)
    if mailbox is not None:
        mailbox.user = user
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
