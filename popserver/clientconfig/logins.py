"""The login name a mail client should send for an address: the one POP3 logins really accept.

POP3 logins (``popserver.auth``) take a login name (passed to ``authenticate()`` as given) or any address of
a mailbox (any case; it resolves to its owner). So a mailbox address is published as itself, which also
makes the answer for an unknown address the same as for most known ones. A login name that is an address
but is not among the mailbox's addresses is published as stored (its case matters to ``authenticate()``);
``user+detail@domain`` delivers to ``user@domain`` but only the latter logs in, so the latter is published.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.db.models import CharField, Value
from django.db.models.functions import Lower

from ..conf import get_setting
from ..models import Address, Mailbox

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
    folded = Lower(Value(address, output_field=CharField()))
    is_address = Address.objects.alias(folded=Lower("address")).filter(folded=folded).exists()
    User = get_user_model()
    logins = list(
        Mailbox.objects.alias(folded=Lower(f"user__{User.USERNAME_FIELD}"))
        .filter(folded=folded)
        .values_list(f"user__{User.USERNAME_FIELD}", flat=True)[:10]
    )
    if is_address:
        return address  # resolved by the login, in any case
    if len(logins) == 1:
        return str(logins[0])
    if address in logins:  # login names that differ only in case: only the exact one is sure to work
        return address
    return None


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
