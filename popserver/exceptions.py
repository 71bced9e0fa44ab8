"""One rooted exception tree. Nothing here imports Django, so the protocol package can use it."""


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
    """RFC 1939 s.8 / RFC 2449 s.8.1.1: the exclusive lock is held by another session."""

    reply = "[IN-USE] Mailbox is locked by another POP3 session."
    close_connection = True  # as Dovecot does


class LoginLockedOut(LoginRefused):
    """Too many failed logins for this name and IP, or from this IP: refused without checking the password."""

    reply = "[SYS/TEMP] Too many failed login attempts, try again later."


class LoginTooSoon(LoginRefused):
    """RFC 2449 s.8.1.2 LOGIN-DELAY: the mailbox logged in less than POPSERVER_LOGIN_DELAY seconds ago."""

    reply = "[LOGIN-DELAY] Logged in too recently, try again later."


class TemporaryLoginFailure(LoginRefused):
    """RFC 3206 s.4: the server cannot log anyone in just now."""

    reply = "[SYS/TEMP] Temporary authentication failure, try again later."


# Maildrop ------------------------------------------------------------------------------------------------
class MaildropError(PopserverError):
    """The storage behind a maildrop failed."""


class MessageExpunged(MaildropError):
    """A message of the snapshot was removed by something else (an administrator, a retention job)."""


class CommitFailed(MaildropError):
    """UPDATE (RFC 1939 s.6) did not happen: nothing was deleted."""
