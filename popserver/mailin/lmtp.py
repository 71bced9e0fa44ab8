"""LMTP's delivery handler: the LMTP engine (``popserver.protocol.lmtp``) over the delivery API.

A recipient is resolved exactly as ``deliver`` does (login name or address, case-insensitively, then without
its ``+detail``; POPSERVER_AUTO_CREATE_MAILBOX applies). A mailbox whose POP3 access is switched off is
unknown to the outside (``550 5.1.1``), and a full mailbox is refused at RCPT already (as Dovecot's
``lmtp_rcpt_check_quota``) and again when the message is stored.

Each copy gets the trace fields Dovecot's LMTP adds, each switchable: ``Return-Path: <sender>`` on top
(POPSERVER_LMTP_ADD_RETURN_PATH) and ``Delivered-To: recipient`` below it, the address as given in RCPT TO
(POPSERVER_LMTP_ADD_DELIVERED_TO), only when the transaction has one recipient, as Dovecot does: then the
copies of a message to several recipients are the same bytes, and a content-addressed body store keeps one
object for all of them (issue 21). The rest of the bytes are what came in, with bare LF as CRLF.

On PostgreSQL the copies are stored by one prepared statement where they can be (``onestatement``: no
quota refusal or warning, the database body store); the others, and everywhere else all of them, as follows.
The copies of one message are stored in one transaction (one commit, whatever the number of recipients),
each in its own savepoint when there are several: a full mailbox or a failing row refuses that recipient
alone. The admin's delivery count is written in the same transaction. The replies are sent after the
commit, so a 250 always means a stored message. A database error is ``451 4.3.0`` for the
recipients it touches, with one log line; so is a connection that does not come free within
POPSERVER_DB_CONNECTION_WAIT (``runlmtp``'s queries count against the process's budget, ``storage/gate.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from django.db import DatabaseError, close_old_connections, connections, router, transaction

from ..conf import get_setting
from ..exceptions import EmptyMessage, MessageTooLarge, QuotaExceeded, ServerBusy, UnknownRecipient
from ..models import Mailbox
from ..protocol.lmtp import Envelope, Outcome, RecipientCheck
from ..storage.gate import using_database
from ..storage.writelock import one_writer
from .delivery import (
    DisplayHeaders,
    PreparedMessage,
    count_in_transaction,
    counting_deliveries,
    header_value,
    prepare_message,
    resolve_mailbox,
    store_prepared,
    trace_fields,
)
from .onestatement import store_at_once, takes
from .quota import check as check_quota
from .quota import mailbox_limits

logger = logging.getLogger("popserver.lmtp")

__all__ = ["MailboxDeliveryHandler"]


class MailboxDeliveryHandler:
    """The ``DeliveryHandler`` of ``runlmtp``: recipients are mailboxes, messages go through the delivery API.

    Settings are read when it is made (one per connection), so a connection sees one configuration.
    """

    def __init__(self, *, peer: str = "") -> None:
        self.peer = peer
        self.max_message_size = get_setting("MAX_MESSAGE_SIZE")
        self.add_return_path = get_setting("LMTP_ADD_RETURN_PATH")
        self.add_delivered_to = get_setting("LMTP_ADD_DELIVERED_TO")

    # RCPT ----------------------------------------------------------------------------------------------
    def check_recipient(self, address: str, *, size: int | None) -> RecipientCheck:
        """Resolve ``address`` and look at its quota (for a message of ``size`` octets, or at least one)."""
        try:
            with using_database():  # the process's budget of connections (runlmtp; a no-op elsewhere)
                mailbox = resolve_mailbox(address)
                if not mailbox.pop3_enabled:
                    return RecipientCheck(Outcome.UNKNOWN)
                if size is not None and size > self.max_message_size:
                    return RecipientCheck(Outcome.TOO_BIG)
                check_quota(mailbox.pk, mailbox_limits(mailbox), max(size or 0, 1))
        except UnknownRecipient:
            return RecipientCheck(Outcome.UNKNOWN)
        except QuotaExceeded:
            return RecipientCheck(Outcome.OVER_QUOTA)
        except ServerBusy:  # no connection came free in time (logged by the gate): the MTA tries again
            return RecipientCheck(Outcome.TEMPORARY_ERROR)
        except DatabaseError as exc:
            self._database_error(f"RCPT TO:<{address}>", exc)
            return RecipientCheck(Outcome.TEMPORARY_ERROR)
        return RecipientCheck(Outcome.ACCEPTED, token=mailbox)

    # DATA ----------------------------------------------------------------------------------------------
    def deliver(self, envelope: Envelope) -> Iterable[Outcome]:
        """Store one copy per recipient in one transaction; the outcomes in RCPT order."""
        recipients = envelope.recipients
        outcomes: list[Outcome | None] = [None] * len(recipients)
        try:
            body = prepare_message(envelope.data)  # bare LF as CRLF, display headers parsed: once for all
        except EmptyMessage:
            body = PreparedMessage(b"", DisplayHeaders())  # trace fields may still make it a message
        except MessageTooLarge:
            return [Outcome.TOO_BIG] * len(recipients)

        copies: list[tuple[int, Mailbox, PreparedMessage]] = []
        single = len(recipients) == 1
        for index, recipient in enumerate(recipients):
            data = self._trace(envelope.sender, recipient.address if single else None) + body.data
            if not data:
                outcomes[index] = Outcome.REJECTED
            elif len(data) > self.max_message_size:
                outcomes[index] = Outcome.TOO_BIG
            else:
                copies.append((index, recipient.token, PreparedMessage(data, body.headers)))

        # Copies one statement can store (PostgreSQL) are committed first, on their own.
        at_once: list[tuple[int, object]] = []
        copies = self._store_at_once(copies, at_once)
        stored: list[tuple[int, object]] = []
        try:
            if copies:
                self._store_in_turn(copies, recipients, outcomes, stored)
        except (DatabaseError, ServerBusy) as exc:  # the transaction as a whole (begin, commit, a broken
            # savepoint), or no connection came free in time: none of its copies is stored
            if isinstance(exc, DatabaseError):
                self._database_error(f"delivery of a message to {len(copies)} recipients", exc)
            stored = []
        stored += at_once
        if stored:
            stored.sort(key=lambda pair: pair[0])
            message_id = header_value(body.data, b"message-id") if logger.isEnabledFor(logging.INFO) else None
            for index, message in stored:
                outcomes[index] = Outcome.ACCEPTED
                logger.info(
                    "lmtp(%s): msgid=%s from=<%s> to=<%s>: saved mail (%d octets, uid %s)",
                    message.mailbox,
                    _printable(message_id),
                    _printable(envelope.sender),
                    _printable(recipients[index].address),
                    message.size,
                    message.uid,
                )
        return [o if o is not None else Outcome.TEMPORARY_ERROR for o in outcomes]

    def _store_in_turn(self, copies, recipients, outcomes: list, stored: list[tuple[int, object]]) -> None:
        """Store each copy with ``store_prepared``, in one transaction; refusals go to ``outcomes``, the
        stored copies to ``stored`` (to be reported once the transaction has committed)."""
        several = len(copies) > 1
        # One lock order for every delivery (the mailbox rows, by primary key): no deadlock between two.
        # The admin's delivery count is the transaction's last statement (counting_deliveries): one
        # commit per message, whatever the number of recipients.
        with using_database(), counting_deliveries(), one_writer(), transaction.atomic():
            for index, mailbox, prepared in sorted(copies, key=lambda copy: copy[1].pk):
                try:
                    # With several copies each has a savepoint: a refusal undoes its copy alone. A single
                    # copy needs none: a refusal rolls the whole transaction back (two round trips fewer).
                    message = store_prepared(mailbox, prepared, savepoint=several)
                except QuotaExceeded:
                    outcomes[index] = Outcome.OVER_QUOTA
                except Mailbox.DoesNotExist:  # deleted since RCPT
                    outcomes[index] = Outcome.UNKNOWN
                except DatabaseError as exc:
                    self._database_error(f"delivery to <{recipients[index].address}>", exc)
                    outcomes[index] = Outcome.TEMPORARY_ERROR
                else:
                    stored.append((index, message))
            if stored:
                count_in_transaction(sum(message.size for _, message in stored), messages=len(stored))

    def _store_at_once(
        self, copies: list[tuple[int, Mailbox, PreparedMessage]], stored: list[tuple[int, object]]
    ) -> list[tuple[int, Mailbox, PreparedMessage]]:
        """Store what one statement can (``onestatement``: PostgreSQL, the same bytes for all) and add it to
        ``stored``; returns the copies left for ``store_prepared``. A copy of a mailbox already
        taken (two recipients, one mailbox) is left too: the statement writes one copy per mailbox."""
        taken: dict[int, int] = {}  # mailbox id -> index of its copy
        data = copies[0][2].data if copies else b""
        candidates = {mailbox.pk for mailbox in takes([copy[1] for copy in copies])}
        for index, mailbox, prepared in copies:
            if mailbox.pk in candidates and mailbox.pk not in taken and prepared.data == data:
                taken[mailbox.pk] = index
        if not taken:
            return copies
        by_index = {index: (mailbox, prepared) for index, mailbox, prepared in copies}
        try:
            with using_database():
                messages = store_at_once([by_index[i][0] for i in taken.values()], copies[0][2])
        except (DatabaseError, ServerBusy) as exc:
            if (
                isinstance(exc, DatabaseError) and _connection_lost()
            ):  # perhaps after its commit: those copies get 451, never a second store
                self._database_error(f"delivery of a message to {len(taken)} recipients", exc)
                return [copy for copy in copies if copy[0] not in taken.values()]
            # The database refused it: nothing stored; the usual way tries each copy again.
            logger.warning("lmtp: storing in one statement failed, storing each copy in turn: %s", exc)
            return copies
        for mailbox_id, message in messages.items():
            stored.append((taken[mailbox_id], message))
        done = {taken[mailbox_id] for mailbox_id in messages}
        return [copy for copy in copies if copy[0] not in done]

    # Helpers -------------------------------------------------------------------------------------------
    def _trace(self, sender: str, recipient: str | None) -> bytes:
        """Return-Path, and Delivered-To for a transaction with one recipient (``recipient`` None: several)."""
        return trace_fields(
            return_path=sender if self.add_return_path else None,
            delivered_to=recipient if self.add_delivered_to and recipient is not None else None,
        )

    def _database_error(self, what: str, exc: DatabaseError) -> None:
        """One log line (no traceback: the database's message says it), and a connection fit for the next
        command (a broken one is closed, so the next query reconnects)."""
        text = " ".join(str(exc).split())[:300]
        logger.error("lmtp: %s failed (451 4.3.0) peer=%s: %s: %s", what, self.peer, type(exc).__name__, text)
        if not transaction.get_connection().in_atomic_block:
            close_old_connections()


def _connection_lost() -> bool:
    """The delivery's database connection is gone (closed or broken): whether its last statement committed
    cannot be known."""
    driver = connections[router.db_for_write(Mailbox)].connection
    return driver is None or bool(getattr(driver, "closed", False)) or bool(getattr(driver, "broken", False))


def _printable(value: bytes | str | None, limit: int = 200) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else "?" for c in value[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."
