"""One rooted exception tree. Nothing here imports Django, so the protocol package can use it."""

import smtplib


class PopserverError(Exception):
    """Base of every popserver error."""


# Delivery ------------------------------------------------------------------------------------------------
class DeliveryError(PopserverError):
    """A message could not be delivered."""


class UnknownRecipient(DeliveryError):
    """No mailbox has that login name or address (sysexits EX_NOUSER)."""


class EmptyMessage(DeliveryError):
    """The message has no bytes (sysexits EX_DATAERR)."""


class MessageTooLarge(DeliveryError):
    """The message is over POPSERVER_MAX_MESSAGE_SIZE (sysexits EX_UNAVAILABLE)."""


class QuotaExceeded(DeliveryError):
    """The mailbox is full: the message would take it over its quota of octets or of messages (the mailbox's
    own limits, or POPSERVER_QUOTA_BYTES / POPSERVER_QUOTA_MESSAGES). ``deliver`` exits EX_TEMPFAIL (75, the
    MTA retries), or EX_UNAVAILABLE (69, a bounce) with POPSERVER_QUOTA_EXCEEDED_PERMANENT.

    ``limit`` is the quota that would be passed, ``unit`` is "octets" or "messages", ``used`` what the
    mailbox held before this message.
    """

    def __init__(self, message: str = "mailbox is full", *, unit: str = "", limit: int = 0, used: int = 0):
        super().__init__(message)
        self.unit, self.limit, self.used = unit, limit, used


class DuplicateMessage(DeliveryError):
    """An imported message whose unique id the mailbox already holds (``importmail`` skips it)."""


class InvalidUniqueId(DeliveryError):
    """An imported unique id that RFC 1939 s.7 does not allow: it must be 1-70 characters in 0x21-0x7E."""


class RecipientsRefused(DeliveryError, smtplib.SMTPRecipientsRefused):
    """``popserver.mailin.email_backend.LocalDeliveryBackend`` delivered the message to none of its recipients.

    Each recipient either has no local mailbox while POPSERVER_MAIL_FALLBACK_BACKEND is unset, or its mailbox
    refused the message (full, or the message is too large); nothing was stored for any recipient. An
    ``smtplib.SMTPRecipientsRefused`` too, as Django documents for ``send_mail()`` errors: ``recipients``
    maps each refused address to ``(SMTP code, reason)``. The mailbox's own error is ``__cause__``.
    """

    def __init__(self, recipients: dict[str, tuple[int, bytes]]):
        smtplib.SMTPRecipientsRefused.__init__(self, recipients)

    def __str__(self) -> str:
        refused = ", ".join(
            f"{address} ({reason.decode(errors='replace')})"
            for address, (_, reason) in self.recipients.items()
        )
        return f"recipients refused: {refused}"


# Login ---------------------------------------------------------------------------------------------------
class LoginRefused(PopserverError):
    """A login did not open a maildrop. ``reply`` is the text after ``-ERR `` (with its RFC 3206 code)."""

    reply = "[AUTH] Authentication failed."
    close_connection = False

    def __init__(self, reply: str | None = None):
        if reply is not None:
            self.reply = reply
        super().__init__(self.reply)


class AuthenticationFailed(LoginRefused):
    """Wrong password, unknown user, or a mailbox that is missing or switched off: one reply for all."""


class MailboxInUse(LoginRefused):
    """RFC 1939 s.8 / RFC 2449 s.8.1.2 IN-USE: the exclusive lock is held by another session."""

    reply = "[IN-USE] Mailbox is locked by another POP3 session."
    close_connection = True  # as Dovecot does


class LoginLockedOut(LoginRefused):
    """Too many failed logins for this name and IP, or from this IP: refused without checking the password."""

    reply = "[SYS/TEMP] Too many failed login attempts, try again later."


class LoginTooSoon(LoginRefused):
    """RFC 2449 s.8.1.1 LOGIN-DELAY: the mailbox logged in less than POPSERVER_LOGIN_DELAY seconds ago."""

    reply = "[LOGIN-DELAY] Logged in too recently, try again later."


class TemporaryLoginFailure(LoginRefused):
    """RFC 3206 s.4: the server cannot log anyone in just now."""

    reply = "[SYS/TEMP] Temporary authentication failure, try again later."


# Load ----------------------------------------------------------------------------------------------------
class ServerBusy(PopserverError):
    """RFC 3206 s.4 [SYS/TEMP]: no database connection came free within POPSERVER_DB_CONNECTION_WAIT, or the
    database refused one. The command is answered ``-ERR`` with ``reply``; the session goes on."""

    reply = "[SYS/TEMP] Server is busy, try again later."


# Maildrop ------------------------------------------------------------------------------------------------
class MaildropError(PopserverError):
    """The storage behind a maildrop failed."""


class MessageExpunged(MaildropError):
    """A message of the snapshot was removed by something else (an administrator, a retention job)."""


class CommitFailed(MaildropError):
    """UPDATE (RFC 1939 s.6) did not happen: nothing was deleted."""


# Stored bodies ---------------------------------------------------------------------------------------------
class BodyUnavailable(PopserverError):
    """A message's body cannot be read now: its object is missing from the storage, shorter than its size, or
    the storage failed. The message stays (nothing is deleted or hidden because of it); RETR and TOP answer
    ``-ERR [SYS/TEMP]`` (RFC 3206 s.4) and the session goes on."""
