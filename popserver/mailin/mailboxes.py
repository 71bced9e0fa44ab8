"""Mailboxes: the ONE look-up from a login name or address to a mailbox (used by logins, delivery and the
commands), and setting mailboxes up (``manage.py createmailbox``, the demo of the default project).

Works with any user model: the user is found and created by its ``USERNAME_FIELD`` (an email-login model
with no ``username`` field included). Names and addresses compare case-insensitively, with the database's
own lower-casing on both sides.
"""

from dataclasses import dataclass, field
from datetime import timedelta

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.base_user import BaseUserManager
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.core.validators import validate_email
from django.db import models, transaction
from django.db.models import (
    BooleanField,
    CharField,
    Count,
    Exists,
    ExpressionWrapper,
    Q,
    Subquery,
    Sum,
    Value,
)
from django.db.models.functions import Lower
from django.utils import timezone

from popserver.conf import get_setting
from popserver.models import Address, Mailbox
from popserver.storage.compiled import CompiledQuery


# The look-up ---------------------------------------------------------------------------------------------
def find_mailbox(name: str, *, plus_detail: bool = False, auto_create: bool | None = None) -> Mailbox | None:
    """The mailbox of ``name``: a login name (the user model's USERNAME_FIELD), else a mailbox address.

    Case-insensitive. Login names that differ only in case (Django's default User allows them) match only
    exactly. ``plus_detail``: also try the name without its ``+detail`` (delivery: ``bob+lists@example.org``
    -> ``bob@example.org``). ``auto_create`` (default POPSERVER_AUTO_CREATE_MAILBOX): a user without a
    mailbox gets one. The mailbox comes with its ``user`` loaded.
    """
    for candidate in _candidates(name.strip(), plus_detail):
        mailbox, settled = _quick_look_up(candidate)
        if settled:
            if mailbox is not None:
                return mailbox
            continue
        user = user_of_login(candidate)
        mailbox = mailbox_of_user(user, auto_create=auto_create) if user is not None else None
        if mailbox is None:
            address = Address.objects.select_related("mailbox__user").alias(folded=Lower("address"))
            address = address.filter(folded=_folded(candidate)).first()
            mailbox = address.mailbox if address is not None else None
        if mailbox is not None:
            return mailbox
    return None


def _quick_look_up(candidate: str) -> tuple[Mailbox | None, bool]:
    """The common cases in one query: (mailbox, True) when the rules below settle it, else (None, False)
    and the caller takes the long way (users without a mailbox, login names that differ only in case).

    The query finds the mailbox of the login name ``candidate`` as spelled (over the user model's unique
    index) and that of the address (over the case-insensitive index), with whether any login name equals
    it case-insensitively. An exact login name always wins (so does it in ``user_of_login``); an address
    settles it only when no login name matches in any case; nothing found and no such login name: unknown.
    The SQL is compiled once per database and user model (``storage.compiled``): building and compiling it
    again for every recipient was most of LMTP's CPU per RCPT.
    """
    found = _QUICK_QUERY.instances(candidate)
    for mailbox in found:
        if mailbox.is_login:
            return mailbox, True
    if found:
        return (found[0], True) if len(found) == 1 and not found[0].any_login else (None, False)
    return None, not _logins_in_any_case(candidate).exists()


def _logins_in_any_case(candidate: str):
    User = get_user_model()
    return User._default_manager.alias(folded=Lower(User.USERNAME_FIELD)).filter(folded=_folded(candidate))


def _quick_queryset(candidate: str):
    User = get_user_model()
    login_field = f"user__{User.USERNAME_FIELD}"
    of_login = Mailbox.objects.filter(**{login_field: candidate}).values("pk")[:1]
    of_address = (
        Address.objects.alias(folded=Lower("address"))
        .filter(folded=_folded(candidate))
        .order_by("pk")
        .values("mailbox")[:1]
    )
    return (
        Mailbox.objects.select_related("user")
        .filter(Q(pk=Subquery(of_login)) | Q(pk=Subquery(of_address)))
        .annotate(
            is_login=ExpressionWrapper(Q(**{login_field: candidate}), output_field=BooleanField()),
            any_login=Exists(_logins_in_any_case(candidate)),
        )
    )


_QUICK_QUERY = CompiledQuery(_quick_queryset, model=Mailbox)


def user_of_login(login: str):
    """The user whose login name is ``login`` (case-insensitive, exact where several differ only in case)."""
    User = get_user_model()
    users = list(
        User._default_manager.alias(folded=Lower(User.USERNAME_FIELD)).filter(folded=_folded(login))[:10]
    )
    if len(users) > 1:
        users = [user for user in users if user.get_username() == login]
    return users[0] if len(users) == 1 else None


# A user's mailbox (one; Mailbox.user is one-to-one), compiled once: every login looks it up.
_MAILBOX_OF_USER = CompiledQuery(
    lambda user_id: Mailbox.objects.filter(user_id=user_id), model=Mailbox, kinds=(int,)
)


def mailbox_of_user(user, *, auto_create: bool | None = None) -> Mailbox | None:
    """``user``'s mailbox; created when missing if ``auto_create`` (default POPSERVER_AUTO_CREATE_MAILBOX)."""
    if isinstance(user.pk, int):
        mailbox = next(iter(_MAILBOX_OF_USER.instances(user.pk)), None)
    else:  # a user model whose key is not a number (a UUID): the placeholders are numbers
        mailbox = Mailbox.objects.filter(user=user).first()
    if mailbox is None and (get_setting("AUTO_CREATE_MAILBOX") if auto_create is None else auto_create):
        mailbox, _ = Mailbox.objects.get_or_create(user=user)
    if mailbox is not None:
        mailbox.user = user
    return mailbox


def login_name_of_address(address: str) -> str | None:
    """The login name of the owner of mailbox address ``address``, or None."""
    owner = (
        Address.objects.alias(folded=Lower("address"))
        .filter(folded=_folded(address))
        .values_list(f"mailbox__user__{get_user_model().USERNAME_FIELD}", flat=True)
        .first()
    )
    return None if owner is None else str(owner)


def _candidates(name: str, plus_detail: bool) -> list[str]:
    if not name:
        return []
    candidates = [name]
    if plus_detail:
        local, at, domain = name.rpartition("@") if "@" in name else (name, "", "")
        base = local.split("+", 1)[0]
        if base and base != local:
            candidates.append(f"{base}{at}{domain}")
    return candidates


def _folded(text: str) -> Lower:
    """The database's own lower-casing, as on the column side (SQLite's LOWER() folds ASCII only)."""
    return Lower(Value(text, output_field=CharField()))


# Setting up --------------------------------------------------------------------------------------------------
@dataclass
class MailboxSetup:
    """What ``set_up_mailbox`` found and changed."""

    mailbox: Mailbox
    user_created: bool = False
    mailbox_created: bool = False
    password_set: bool = False
    address_added: bool = False
    password_warnings: list[str] = field(default_factory=list)  # the site's password validators' complaints


def create_mailbox(username: str, *, email: str | None = None, password: str | None = None) -> Mailbox:
    """The mailbox of user ``username``, creating the user and the mailbox if missing.

    ``password`` (when given) becomes the user's password; ``email`` (when given) becomes an address of the
    mailbox if it is not one yet. Raises ``ValidationError`` for an invalid login name or address, an
    address of another mailbox, an empty password, or a user model that needs fields we cannot fill.
    """
    return set_up_mailbox(username, email=email, password=password).mailbox


def set_up_mailbox(username: str, *, email: str | None = None, password: str | None = None) -> MailboxSetup:
    """``create_mailbox`` with a report of what was done (for the command's output)."""
    if password == "":
        raise ValidationError("The password is empty.")
    if email is not None:
        email = email.strip()
        validate_email(email)
    User = get_user_model()
    login = _clean_login(User, username)
    with transaction.atomic():
        try:
            user, user_created = User._default_manager.get_by_natural_key(login), False
        except User.DoesNotExist:
            user, user_created = _create_user(User, login, email=email, password=password), True
        if password is not None and not user_created:
            user.set_password(password)
            user.save(update_fields=["password"])
        mailbox, mailbox_created = Mailbox.objects.get_or_create(user=user)
        address_added = _add_address(mailbox, email) if email else False
    return MailboxSetup(
        mailbox=mailbox,
        user_created=user_created,
        mailbox_created=mailbox_created,
        password_set=password is not None,
        address_added=address_added,
        password_warnings=_password_warnings(password, user),
    )


def _password_warnings(password: str | None, user) -> list[str]:
    if password is None:
        return []
    try:
        password_validation.validate_password(password, user)
    except ValidationError as exc:
        return list(exc.messages)
    return []


def _clean_login(User, username: str) -> str:
    """The login name as the user model stores it (normalised and validated like its form would)."""
    login_field = User._meta.get_field(User.USERNAME_FIELD)
    login = User.normalize_username(username.strip())
    if isinstance(login_field, models.EmailField):
        login = BaseUserManager.normalize_email(login)
    return login_field.clean(login, None)


def _create_user(User, login: str, *, email: str | None, password: str | None):
    extra = {}
    email_field = User.get_email_field_name()
    if email and email_field != User.USERNAME_FIELD and _has_field(User, email_field):
        extra[email_field] = email
    for name in User.REQUIRED_FIELDS:
        if name in extra:
            continue
        model_field = User._meta.get_field(name)
        if not (model_field.has_default() or model_field.blank or model_field.null):
            raise ValidationError(
                f"{User._meta.label} requires {name!r}, which createmailbox cannot fill in: create the user "
                "another way (createsuperuser, the admin) and run createmailbox again."
            )
    manager = User._default_manager
    if hasattr(manager, "create_user"):
        return manager.create_user(**{User.USERNAME_FIELD: login}, password=password, **extra)
    user = User(**{User.USERNAME_FIELD: login}, **extra)
    user.set_password(password)  # None: an unusable password
    user.save()
    return user


def _has_field(User, name: str) -> bool:
    try:
        User._meta.get_field(name)
    except FieldDoesNotExist:
        return False
    return True


def _add_address(mailbox: Mailbox, email: str) -> bool:
    """Add ``email`` to the mailbox; False if it is already one of its addresses (in any case)."""
    existing = (
        Address.objects.select_related("mailbox__user")
        .alias(folded=Lower("address"))
        .filter(folded=_folded(email))
        .first()
    )
    if existing is None:
        Address.objects.create(mailbox=mailbox, address=email)
        return True
    if existing.mailbox_id != mailbox.pk:
        raise ValidationError(f"The address {email} already delivers to the mailbox of {existing.mailbox}.")
    return False


# Inactive mailboxes ------------------------------------------------------------------------------------------
def inactive_mailboxes(days: int, now=None) -> models.QuerySet:
    """Mailboxes with no successful POP3 login for ``days`` days: the last one was earlier, or there was none
    and the mailbox is older than that (a new one has not had its chance yet). Oldest activity first, each
    with ``message_count`` and ``message_octets`` (one aggregate query, over the (mailbox, ...) index)."""
    cutoff = (now or timezone.now()) - timedelta(days=days)
    return (
        Mailbox.objects.filter(Q(last_login__lt=cutoff) | Q(last_login=None, created_at__lt=cutoff))
        .select_related("user")
        .annotate(message_count=Count("messages"), message_octets=Sum("messages__size"))
        .order_by(models.F("last_login").asc(nulls_first=True), "created_at", "pk")
    )
