"""An email backend that delivers into local mailboxes: ``EMAIL_BACKEND = "popserver.mailin.email_backend.LocalDeliveryBackend"``.

Each recipient (To, Cc and Bcc) that delivery knows (a login name or an address, ``user+detail`` too) gets
the message as Django would send it over SMTP, ``message().as_bytes(linesep="\\r\\n")``: Bcc is not among its
headers. Other recipients go to the backend named by POPSERVER_MAIL_FALLBACK_BACKEND (e.g. Django's SMTP
backend), with the same To, Cc, Date and Message-ID. Without a fallback they are refused: ``RecipientsRefused``
names them, and nothing is delivered to anyone.

The local copies of one message are stored in one transaction: a full mailbox (``QuotaExceeded``) or a message
over POPSERVER_MAX_MESSAGE_SIZE refuses the message for every local recipient (``RecipientsRefused``, the
mailbox's error as its ``__cause__``), so sending it again never delivers twice. ``fail_silently`` turns
these errors (and database errors) into a log line and a message not counted as sent.
"""

import copy
import logging
from email.utils import parseaddr

from django.core.mail import get_connection
from django.core.mail.backends.base import BaseEmailBackend
from django.db import DatabaseError, transaction

from popserver.conf import get_setting
from popserver.exceptions import (
    DeliveryError,
    MessageTooLarge,
    QuotaExceeded,
    RecipientsRefused,
    UnknownRecipient,
)
from popserver.mailin.delivery import prepare_message, resolve_mailbox, store_prepared

logger = logging.getLogger(__name__)


class LocalDeliveryBackend(BaseEmailBackend):
    """Delivers to local mailboxes; the rest to POPSERVER_MAIL_FALLBACK_BACKEND. Extra keyword arguments
    (``get_connection(host=..., port=...)``) are passed on to the fallback backend."""

    def __init__(self, fail_silently: bool = False, **kwargs):
        super().__init__(fail_silently=fail_silently)
        self.fallback_kwargs = kwargs
        self.fallback = None  # the fallback backend's connection, made when a message first needs it

    def open(self):
        return False  # nothing to open for local mailboxes; the fallback opens itself when used

    def close(self) -> None:
        if self.fallback is not None:
            try:
                self.fallback.close()
            finally:
                self.fallback = None

    def send_messages(self, email_messages) -> int:
        """Deliver each message; returns how many went to at least one recipient."""
        sent = 0
        for message in email_messages or ():
            try:
                sent += bool(self._send(message))
            except (DeliveryError, DatabaseError):
                if not self.fail_silently:
                    raise
                logger.warning("message not sent (fail_silently)", exc_info=True)
        return sent

    # ------------------------------------------------------------------------------------------------------
    def _send(self, message) -> bool:
        recipients = message.recipients()  # To + Cc + Bcc, empty ones left out
        if not recipients:
            return False
        local: dict[int, tuple] = {}  # mailbox pk -> (mailbox, its addresses)
        remote: list[str] = []
        for address in recipients:
            try:
                mailbox = resolve_mailbox(parseaddr(address)[1] or address)
            except UnknownRecipient:
                remote.append(address)
                continue
            local.setdefault(mailbox.pk, (mailbox, []))[1].append(address)
        fallback = self._fallback() if remote else None
        if remote and fallback is None:
            reason = b"5.1.1 no local mailbox, and no POPSERVER_MAIL_FALLBACK_BACKEND"
            raise RecipientsRefused({address: (550, reason) for address in remote})
        sent = False
        mime = None
        if local:
            mime = message.message()  # once: every copy has the same Date and Message-ID
            self._deliver_locally(mime.as_bytes(linesep="\r\n"), local)
            sent = True
        if remote:
            outgoing = message if mime is None else _for_remote(message, mime, set(remote))
            sent = bool(fallback.send_messages([outgoing])) or sent
        return sent

    @staticmethod
    def _deliver_locally(data: bytes, local: dict) -> None:
        try:
            prepared = prepare_message(data)
        except MessageTooLarge as exc:
            reason = f"5.3.4 {exc}".encode()
            raise RecipientsRefused(
                {address: (552, reason) for _, addresses in local.values() for address in addresses}
            ) from exc
        with transaction.atomic():  # all local copies or none
            for pk in sorted(local):  # one lock order for every sender: no deadlock between two of them
                mailbox, addresses = local[pk]
                try:
                    store_prepared(mailbox, prepared)
                except QuotaExceeded as exc:
                    code, status = (
                        (552, "5.2.2") if get_setting("QUOTA_EXCEEDED_PERMANENT") else (452, "4.2.2")
                    )
                    reason = f"{status} {exc}".encode()
                    raise RecipientsRefused({address: (code, reason) for address in addresses}) from exc

    def _fallback(self):
        if self.fallback is None:
            path = get_setting("MAIL_FALLBACK_BACKEND")
            if not path:
                return None
            self.fallback = get_connection(path, fail_silently=self.fail_silently, **self.fallback_kwargs)
        return self.fallback


def _for_remote(message, mime, remote: set[str]):
    """A copy of ``message`` for the fallback backend: only the remote recipients get it, while its headers
    stay those of the local copies (the same To and Cc, Date and Message-ID)."""
    outgoing = copy.copy(message)
    headers = dict(message.extra_headers)
    # Django's message() takes To and Cc from extra_headers under exactly these names, when present there.
    for name, addresses in (("To", message.to), ("Cc", message.cc)):
        if name not in headers and addresses:
            headers[name] = ", ".join(str(address) for address in addresses)
    present = {name.lower() for name in headers}
    for name in ("Date", "Message-ID"):
        if name.lower() not in present:
            headers[name] = mime[name]
    outgoing.extra_headers = headers
    outgoing.to = [address for address in message.to if address in remote]
    outgoing.cc = [address for address in message.cc if address in remote]
    outgoing.bcc = [address for address in message.bcc if address in remote]
    return outgoing
