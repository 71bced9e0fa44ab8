"""POP3 logins through Django's ``authenticate()``, bounded, delayed on failure, ending in a locked maildrop."""
from __future__ import annotations

import ipaddress
import logging
import threading

from django.contrib.auth import authenticate, get_user_model
from django.db import DatabaseError
from django.http import HttpRequest

from .conf import get_setting
from .exceptions import AuthenticationFailed, LoginRefused, TemporaryLoginFailure
from .maildrop import OrmMaildrop, open_maildrop
from .models import Address, Mailbox
from .signals import login_failed, send_safely

logger = logging.getLogger(__name__)

# How long a login waits for a password-check slot before answering [SYS/TEMP].
PASSWORD_CHECK_WAIT = 30.0

_password_checks: threading.BoundedSemaphore | None = None
_password_checks_size = 0
_password_checks_guard = threading.Lock()


def password_check_slots() -> threading.BoundedSemaphore:
    """The process-wide limit on concurrent ``authenticate()`` calls (argon2: ~100 MiB and 8 lanes each)."""
    global _password_checks, _password_checks_size
    size = get_setting("MAX_PASSWORD_CHECKS")
    with _password_checks_guard:
        if _password_checks is None or _password_checks_size != size:
            _password_checks = threading.BoundedSemaphore(size)
            _password_checks_size = size
        return _password_checks


def is_trusted_peer(ip: str) -> bool:
    """True if ``ip`` is in POPSERVER_TRUSTED_NETWORKS (loopback by default)."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in ipaddress.ip_network(net, strict=False) for net in get_setting("TRUSTED_NETWORKS"))


def make_request(peer_ip: str) -> HttpRequest:
    """A minimal request for backends that need one (django-axes and the like)."""
    request = HttpRequest()
    request.META["REMOTE_ADDR"] = peer_ip
    request.META["SERVER_PROTOCOL"] = "POP3"
    return request


class DjangoAuthenticator:
    """The engine's ``authenticate`` callable for one connection.

    The same reply for an unknown user, a wrong password, an inactive user and a missing or switched-off
    mailbox; each costs one password check and the failure delay, which waits on ``stop_event`` so a shutdown
    does not wait for it and no other session is blocked.
    """

    def __init__(self, peer_ip: str, peer_port: int = 0, stop_event: threading.Event | None = None):
        self.peer_ip = peer_ip
        self.peer = f"{peer_ip}:{peer_port}"
        self.stop_event = stop_event or threading.Event()
        self.mailbox: Mailbox | None = None

    def __call__(self, username: str, password: str, *, mechanism: str = "USER") -> OrmMaildrop:
        try:
            mailbox = self._check_password(username, password)
            if mailbox is None:
                raise AuthenticationFailed()
            maildrop = open_maildrop(mailbox.pk, self.peer)
        except AuthenticationFailed as exc:
            self._failed(username, mechanism, "credentials")
            raise exc
        except LoginRefused:
            raise  # [IN-USE] and the like: not a failed login, no delay
        except DatabaseError:
            logger.exception("login for %r from %s: database error", username, self.peer)
            raise TemporaryLoginFailure() from None
        self.mailbox = mailbox
        return maildrop

    def _check_password(self, username: str, password: str) -> Mailbox | None:
        login_name = self._login_name(username)
        slots = password_check_slots()
        if not slots.acquire(timeout=PASSWORD_CHECK_WAIT):
            raise TemporaryLoginFailure()
        try:
            user = authenticate(make_request(self.peer_ip), username=login_name, password=password)
        finally:
            slots.release()
        if user is None or not getattr(user, "is_active", True):
            return None
        mailbox = Mailbox.objects.filter(user=user).first()
        if mailbox is None and get_setting("AUTO_CREATE_MAILBOX"):
            mailbox, _ = Mailbox.objects.get_or_create(user=user)
        if mailbox is None or not mailbox.pop3_enabled:
            return None
        return mailbox

    def _login_name(self, username: str) -> str:
        """A mailbox address logs in as its owner; anything else is passed to the backends as given."""
        if "@" in username:
            owner = (
                Address.objects.filter(address__iexact=username)
                .values_list(f"mailbox__user__{get_user_model().USERNAME_FIELD}", flat=True)
                .first()
            )
            if owner:
                return str(owner)
        return username

    def _failed(self, username: str, mechanism: str, reason: str) -> None:
        logger.info("login failed: user=<%s> peer=%s mechanism=%s reason=%s", _printable(username),
                    self.peer, mechanism, reason)
        send_safely(login_failed, username=username, peer=self.peer, mechanism=mechanism, reason=reason)
        delay = get_setting("AUTH_FAILURE_DELAY")
        if delay:
            self.stop_event.wait(delay)


def _printable(text: str, limit: int = 64) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
