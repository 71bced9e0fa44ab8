"""App passwords: random, named, revocable secrets that work for POP3 only (never for the site's login).

They are high-entropy, so a keyed SHA-256 (HMAC with SECRET_KEY) stores them safely and checks them in
microseconds; argon2 would cost ~100 MiB per password checked (see PITFALLS).
"""

from __future__ import annotations

import secrets

from django.utils import timezone
from django.utils.crypto import salted_hmac

from popserver.models import AppPassword, Mailbox

ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i: read aloud and typed on phones
GROUPS, GROUP_SIZE = 4, 5  # 20 characters of 31 symbols: about 99 bits


def _normalize(secret: str) -> str:
    return secret.replace("-", "").replace(" ", "").lower()


def _digest(secret: str) -> str:
    return salted_hmac("popserver.AppPassword", _normalize(secret), algorithm="sha256").hexdigest()


def looks_like_app_password(secret: str) -> bool:
    """True if ``secret`` has an app password's shape: other passwords skip the database look-up."""
    normalized = _normalize(secret)
    return len(normalized) == GROUPS * GROUP_SIZE and all(ch in ALPHABET for ch in normalized)


def create_app_password(mailbox: Mailbox, name: str) -> tuple[AppPassword, str]:
    """A new app password; the secret is returned once and never stored."""
    raw = "".join(secrets.choice(ALPHABET) for _ in range(GROUPS * GROUP_SIZE))
    secret = "-".join(raw[i : i + GROUP_SIZE] for i in range(0, len(raw), GROUP_SIZE))
    app_password = AppPassword.objects.create(mailbox=mailbox, name=name[:100], digest=_digest(secret))
    return app_password, secret


def check_app_password(mailbox: Mailbox, secret: str, peer: str = "") -> AppPassword | None:
    """The mailbox's active app password matching ``secret`` (stamping its last use), or None."""
    if not looks_like_app_password(secret):
        return None
    app_password = AppPassword.objects.filter(
        mailbox=mailbox, digest=_digest(secret), revoked_at=None
    ).first()
    if app_password is not None:
        AppPassword.objects.filter(pk=app_password.pk).update(
            last_used_at=timezone.now(), last_used_peer=peer[:64]
        )
    return app_password


def revoke_app_password(app_password: AppPassword) -> None:
    if app_password.revoked_at is None:
        app_password.revoked_at = timezone.now()
        app_password.save(update_fields=["revoked_at"])
