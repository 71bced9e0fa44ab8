"""The login name a mail client should send for an address: the one POP3 logins really accept.

POP3 logins (``popserver.logins.authenticator``) take a login name (passed to ``authenticate()`` as given) or
any address of a mailbox (any case; it resolves to its owner). So a mailbox address is published as itself, which also
makes the answer for an unknown address the same as for most known ones. A login name that is an address
but is not among the mailbox's addresses is published as stored (its case matters to ``authenticate()``);
``user+detail@domain`` delivers to ``user@domain`` but only the latter logs in, so the latter is published.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..conf import get_setting
from ..mailin.mailboxes import login_name_of_address, user_of_login
from ..models import Mailbox

MAX_ADDRESS_LENGTH = 254  # RFC 5321 s.4.5.3.1.3, as a path minus its angle brackets


def is_plausible_address(text: str) -> bool:
    """One ``local@domain`` without spaces or control characters, short enough for a mailbox."""
    local, at, domain = text.rpartition("@")
    return (
        bool(at and local and domain)
        and len(text) <= MAX_ADDRESS_LENGTH
        and all(ch.isprintable() and not ch.isspace() for ch in text)
    )


def login_for_address(address: str) -> str:
    """The name to log in with for ``address`` (see the module docstring). Every call makes the same
    queries whether or not the address exists; an unknown address is answered with itself."""
    login = _working_login(address)
    local, _, domain = address.rpartition("@")
    base = local.split("+", 1)[0]
    base_login = _working_login(f"{base}@{domain}") if base and base != local else None
    return login or base_login or address


def _working_login(address: str) -> str | None:
    """``address`` itself if it is a mailbox address; else the stored login name it matches; else None.
    Both look-ups run either way (``popserver.mailin.mailboxes``, the one look-up logins also use)."""
    is_address = login_name_of_address(address) is not None
    user = user_of_login(address)
    if is_address:
        return address  # resolved to its owner by the login, in any case
    return user.get_username() if user is not None else None


@dataclass(frozen=True)
class Account:
    """What the set-up page and the Apple profile show a signed-in user."""

    login_name: str  # the user's login name (always works)
    address: str | None  # the primary address: the first of the mailbox, else a login name that is one
    username: str  # what clients are told to send (the address where there is one)
    addresses: tuple[str, ...]
    needs_app_password: bool
    app_passwords_accepted: bool

    @property
    def other_logins(self) -> list[str]:
        """The other names that log in: the remaining addresses, then the login name."""
        others = [a for a in self.addresses if a != self.username]
        return [*others, self.login_name] if self.login_name != self.username else others


def account_of(mailbox: Mailbox) -> Account:
    user = mailbox.user
    login_name = user.get_username()
    addresses = tuple(mailbox.addresses.order_by("pk").values_list("address", flat=True))
    address = addresses[0] if addresses else (login_name if is_plausible_address(login_name) else None)
    accepted = get_setting("ACCEPTED_PASSWORDS")
    has_password = user.has_usable_password() if hasattr(user, "has_usable_password") else True
    return Account(
        login_name=login_name,
        address=address,
        username=address if addresses else login_name,
        addresses=addresses,
        needs_app_password=accepted == "app" or (accepted == "both" and not has_password),
        app_passwords_accepted=accepted in ("app", "both"),
    )
