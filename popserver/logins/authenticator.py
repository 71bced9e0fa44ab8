"""POP3 logins: throttled, through app passwords or Django's ``authenticate()`` (bounded), delayed on failure,
audited, and ending in a locked maildrop."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn

from django.contrib.auth import authenticate, get_user_model
from django.db import DatabaseError, OperationalError
from django.http import HttpRequest
from django.utils import timezone

from popserver.conf import get_setting, worker_share
from popserver.exceptions import (
    AuthenticationFailed,
    LoginLockedOut,
    LoginRefused,
    LoginTooSoon,
    MailboxInUse,
    ServerBusy,
    TemporaryLoginFailure,
)
from popserver.logins.app_passwords import check_app_password, looks_like_app_password
from popserver.logins.peers import is_trusted_peer, peer_group
from popserver.logins.throttle import Throttle, get_throttle
from popserver.mailin.mailboxes import find_mailbox, login_name_of_address, mailbox_of_user
from popserver.models import LoginEvent, LoginThrottle, Mailbox
from popserver.overload import database_unavailable, refused
from popserver.signals import login_failed, login_locked_out, send_safely
from popserver.storage.gate import release_connection, using_database
from popserver.storage.lock import LockWrites
from popserver.storage.maildrop import OrmMaildrop, open_maildrop

from . import audit

logger = logging.getLogger(__name__)

# How long a login waits for a password-check slot before answering [SYS/TEMP].
PASSWORD_CHECK_WAIT = 30.0

_password_checks: threading.BoundedSemaphore | None = None
_password_checks_size = 0
_password_checks_guard = threading.Lock()


def password_check_slots() -> threading.BoundedSemaphore:
    """The process-wide limit on concurrent ``authenticate()`` calls (argon2: ~100 MiB and 8 lanes each): the
    server's POPSERVER_MAX_PASSWORD_CHECKS split between its workers."""
    global _password_checks, _password_checks_size
    size = worker_share("MAX_PASSWORD_CHECKS")
    with _password_checks_guard:
        if _password_checks is None or _password_checks_size != size:
            _password_checks = threading.BoundedSemaphore(size)
            _password_checks_size = size
        return _password_checks


def make_request(peer_ip: str) -> HttpRequest:
    """A minimal request for backends that need one (django-axes and the like)."""
    request = HttpRequest()
    request.META["REMOTE_ADDR"] = peer_ip
    request.META["SERVER_PROTOCOL"] = "POP3"
    return request


# How the session-end log line names a refused login.
REFUSALS = {
    AuthenticationFailed: "auth failed",
    LoginLockedOut: "locked out",
    LoginTooSoon: "login delay",
    MailboxInUse: "mailbox in use",
    TemporaryLoginFailure: "temporary failure",
}


class DjangoAuthenticator:
    """The engine's ``authenticate`` callable for one connection.

    The same reply for an unknown user, a wrong password, an inactive user and a missing or switched-off
    mailbox. Failures wait POPSERVER_AUTH_FAILURE_DELAY on ``stop_event`` (a shutdown does not wait for it, and
    no other session is blocked). ``[IN-USE]`` and ``[LOGIN-DELAY]`` after a right password are not failures.
    """

    def __init__(
        self,
        peer_ip: str,
        peer_port: int = 0,
        stop_event: threading.Event | None = None,
        *,
        trusted: bool | None = None,
        throttle: Throttle | None = None,
    ):
        self.peer_ip = peer_ip
        self.peer = f"{peer_ip}:{peer_port}"
        self.stop_event = stop_event or threading.Event()
        self.trusted = is_trusted_peer(peer_ip) if trusted is None else trusted
        self.throttle = throttle or get_throttle()
        self.tls = False  # set by the connection handler once TLS is on
        self.tls_at_proxy = False  # the load balancer in front terminated TLS (PROXY v2 SSL TLV)
        # Called before the failed-login delay: the connection handler makes the connection droppable again
        # (a guesser must not keep its slot for the whole delay).
        self.before_failure_delay: Callable[[], None] = lambda: None
        self.mailbox: Mailbox | None = None
        # For the session-end log line: logins tried on this connection, and what became of the last one.
        self.attempts = 0
        self.last_username = ""
        self.last_mechanism = ""
        self.refusal = ""
        # About the last login, for the server's metrics: the password was checked as an app password; the
        # credentials were right but the account may not use POP3 (refused like a wrong password); the
        # seconds spent in the failed-login delay (not part of the time the login took).
        self.app_password_tried = False
        self.account_disabled = False
        self.failure_delay_waited = 0.0

    def __call__(self, username: str, password: str | None, *, mechanism: str = "USER") -> OrmMaildrop:
        """Log in, or raise a ``LoginRefused``. ``password`` None: credentials that cannot be right (the
        engine's verdict), refused like a wrong password without a check."""
        self.attempts += 1
        self.last_username, self.last_mechanism = username, mechanism
        self._delay_due = False
        self._reservation_due: tuple[str, str] | None = None  # a right password's, until given back
        self.app_password_tried = self.account_disabled = False
        self.failure_delay_waited = 0.0
        try:
            maildrop = self._login(username, password, mechanism)
        except ServerBusy:  # no connection within the wait: logged once for all sessions by the gate
            self.refusal = REFUSALS[TemporaryLoginFailure]
            raise TemporaryLoginFailure() from None
        except DatabaseError as exc:
            if isinstance(exc, OperationalError):  # the database refuses or is gone: load, not a bug
                database_unavailable(exc, "login")
            else:
                logger.exception("login for %r from %s: database error", printable(username), self.peer)
            with contextlib.suppress(ServerBusy):
                with using_database():
                    self._give_back_quietly()  # a right password's, rolled back with the lock
                    self._audit(username, mechanism, LoginEvent.ERROR, "database")
            self.refusal = REFUSALS[TemporaryLoginFailure]
            raise TemporaryLoginFailure() from None
        except LoginRefused as refused:
            self.refusal = REFUSALS.get(type(refused), "auth failed")
            raise
        finally:
            if self._reservation_due is not None:  # any other way out before the lock's transaction committed
                self._give_back_quietly()
            if self._delay_due:
                self._delay()
        if self.stop_event.is_set():  # the server began to stop while this login took its lock
            maildrop.release()
            self.mailbox, self.refusal = None, "server shutting down"
            raise TemporaryLoginFailure()
        return maildrop

    def _login(self, username: str, password: str | None, mechanism: str) -> OrmMaildrop:
        # Throttled by the login name an address resolves to (in Django's normal form: a name typed in NFD
        # finds the NFC account), and by IPv4 address or IPv6 /64.
        group = peer_group(self.peer_ip)
        with using_database():
            login_name = self._login_name(get_user_model().normalize_username(username))
            # The attempt is counted (reserved) before the password check: exact in parallel.
            scope, reservation = self.throttle.check_and_reserve(login_name, group, trusted=self.trusted)
            if scope:
                self._refuse(username, login_name, group, mechanism, scope)
            if not reservation.admitted:
                self._refuse(username, login_name, group, mechanism, LoginThrottle.ACCOUNT_IP)
        mailbox = None
        if password is not None:
            mailbox = self._check_credentials(username, login_name, group, password, mechanism)
        with using_database():
            if mailbox is None:
                scope = self.throttle.failed(login_name, group, trusted=self.trusted, ip_only=True)
                if reservation.last:
                    scope = LoginThrottle.ACCOUNT_IP
                self._audit(username, mechanism, LoginEvent.FAILED, "credentials")
                if scope:
                    send_safely(login_locked_out, username=username, peer=self.peer, scope=scope)
                self._fail(username, mechanism, "credentials")
                raise AuthenticationFailed()
            self._reservation_due = (login_name, group)  # given back by every way out from here
            delay = get_setting("LOGIN_DELAY")
            if (
                delay
                and mailbox.last_login
                and mailbox.last_login > timezone.now() - timedelta(seconds=delay)
            ):
                self._give_back_reservation()
                self._audit(username, mechanism, LoginEvent.LOGIN_DELAY, "", mailbox)
                raise LoginTooSoon()

            try:
                maildrop = open_maildrop(
                    mailbox.pk,
                    self.peer,
                    mailbox=mailbox,
                    in_lock_transaction=_WithTheLock(self, username, mechanism, login_name, group, mailbox),
                )
            except MailboxInUse:
                self._give_back_reservation()
                self._audit(username, mechanism, LoginEvent.IN_USE, "", mailbox)
                raise
            except AuthenticationFailed:  # switched off for POP3 during the password check
                self.account_disabled = True
                self._reservation_due = None  # counted, as for any switched-off mailbox
                self._audit(username, mechanism, LoginEvent.FAILED, "credentials", mailbox)
                self._fail(username, mechanism, "credentials")
                raise
            self._reservation_due = None  # committed with the lock
            self.mailbox = mailbox
            return maildrop

    def _give_back_reservation(self) -> None:
        """A right password: its reservation no longer counts (``Throttle.succeeded``)."""
        if self._reservation_due is not None:
            self.throttle.succeeded(*self._reservation_due)
            self._reservation_due = None

    def _give_back_quietly(self) -> None:
        """``_give_back_reservation`` on a way out that is already failing: its own failure is only logged."""
        try:
            with using_database():
                self._give_back_reservation()
        except (ServerBusy, DatabaseError):
            pass  # the gate, or the failure that brought us here, logged it
        except Exception:
            logger.exception("login from %s: could not give back a right password's reservation", self.peer)

    def _refuse(self, username: str, login_name: str, group: str, mechanism: str, scope: str) -> NoReturn:
        """A lock-out refuses the attempt without a check (inside ``using_database()``)."""
        if scope != LoginThrottle.IP:  # guessing at a locked account still counts against its IP
            self.throttle.failed(login_name, group, trusted=self.trusted, ip_only=True)
        self._audit(username, mechanism, LoginEvent.LOCKED_OUT, scope)
        send_safely(login_locked_out, username=username, peer=self.peer, scope=scope)
        self._fail(username, mechanism, f"locked out ({scope})")
        raise LoginLockedOut()

    def _check_credentials(
        self, username: str, login_name: str, group: str, password: str, mechanism: str
    ) -> Mailbox | None:
        """The mailbox these credentials open (app password or account password), or None.

        The whole-IP lock-out is looked at again once a password-check slot is free: logins queued behind a
        burst of guesses from their IP must not check passwords meanwhile refused to it. No database
        connection is held while queueing for a slot."""
        accepted = get_setting("ACCEPTED_PASSWORDS")
        if accepted in ("app", "both") and looks_like_app_password(password):
            self.app_password_tried = True
            with using_database():
                mailbox = self._mailbox_of(login_name)
                if mailbox is not None and check_app_password(mailbox, password, self.peer):
                    if self._may_log_in(mailbox.user):
                        return mailbox
                    self.account_disabled = True
                    return None
        if accepted not in ("account", "both"):
            return None
        slots = password_check_slots()
        if not slots.acquire(blocking=False):
            release_connection()
            if not slots.acquire(timeout=PASSWORD_CHECK_WAIT):
                refused("password-checks", "no password-check slot came free in time: answered [SYS/TEMP]")
                raise TemporaryLoginFailure()
        user = None
        try:
            with using_database():
                scope = self.throttle.locked_out(login_name, group, trusted=self.trusted, ip_only=True)
                if not scope:
                    user = authenticate(make_request(self.peer_ip), username=login_name, password=password)
        finally:
            slots.release()
        with using_database():
            if scope:  # with the password slot given back first
                self._refuse(username, login_name, group, mechanism, scope)
            if user is None:
                return None
            mailbox = mailbox_of_user(user) if self._may_log_in(user) else None
            if mailbox is None or not mailbox.pop3_enabled:
                self.account_disabled = True
                return None
            return mailbox

    @staticmethod
    def _may_log_in(user) -> bool:
        return getattr(user, "is_active", True)

    @staticmethod
    def _mailbox_of(login_name: str) -> Mailbox | None:
        mailbox = find_mailbox(login_name, auto_create=False)
        return mailbox if mailbox is not None and mailbox.pop3_enabled else None

    def _login_name(self, username: str) -> str:
        """A mailbox address logs in as its owner; anything else is passed to the backends as given."""
        if "@" in username:
            return login_name_of_address(username) or username
        return username

    def _fail(self, username: str, mechanism: str, reason: str) -> None:
        logger.info(
            "login failed: user=<%s> peer=%s mechanism=%s reason=%s",
            printable(username),
            self.peer,
            mechanism,
            reason,
        )
        send_safely(login_failed, username=username, peer=self.peer, mechanism=mechanism, reason=reason)
        self._delay_due = True  # waited out by __call__, without a database connection

    def _delay(self) -> None:
        self.before_failure_delay()
        release_connection()
        delay = get_setting("AUTH_FAILURE_DELAY")
        if delay:
            waiting_since = time.monotonic()
            self.stop_event.wait(delay)
            self.failure_delay_waited = time.monotonic() - waiting_since

    def _audit(self, username: str, mechanism: str, outcome: str, reason: str, mailbox=None) -> None:
        audit.record_login(self._login_event(username, mechanism, outcome, reason, mailbox))

    def _login_event(self, username: str, mechanism: str, outcome: str, reason: str, mailbox) -> dict:
        return audit.login_event(
            username=username,
            peer_ip=self.peer_ip,
            mechanism=mechanism,
            tls=self.tls,
            tls_at_proxy=self.tls_at_proxy,
            outcome=outcome,
            reason=reason,
            mailbox=mailbox,
        )


class _WithTheLock(LockWrites):
    """A right password's writes, in the lock's transaction so that a clean login commits once: its
    reservation given back and its audit row (``_reservation_due`` stays set until that commits). On
    PostgreSQL the lock's one statement makes them (``open_maildrop``)."""

    def __init__(self, authenticator: DjangoAuthenticator, username, mechanism, login_name, group, mailbox):
        self.authenticator = authenticator
        self.username, self.mechanism, self.mailbox = username, mechanism, mailbox
        self.login_name, self.group = login_name, group

    def __call__(self) -> None:
        self.authenticator.throttle.succeeded(self.login_name, self.group)
        self.authenticator._audit(self.username, self.mechanism, LoginEvent.SUCCESS, "", self.mailbox)

    def statements(self):
        authenticator = self.authenticator
        give_back = authenticator.throttle.succeeded_statement(self.login_name, self.group)
        event = audit.login_event_statement(
            authenticator._login_event(self.username, self.mechanism, LoginEvent.SUCCESS, "", self.mailbox)
        )
        return None if give_back is None or event is None else [give_back, event]


def printable(text: str, limit: int = 64) -> str:
    """A client-given name made safe for one log line: control characters replaced, length capped."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
