"""Setting up mailboxes: the logic behind ``manage.py createmailbox`` (and the demo of the default project).

Works with any user model: the user is found and created by its ``USERNAME_FIELD`` (an email-login model
with no ``username`` field included).
"""
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model, password_validation
from django.contrib.auth.base_user import BaseUserManager
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.core.validators import validate_email
from django.db import models, transaction
from django.db.models import CharField, Value
from django.db.models.functions import Lower

from .models import Address, Mailbox


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
        .filter(folded=Lower(Value(email, output_field=CharField())))
        .first()
    )
    if existing is None:
        Address.objects.create(mailbox=mailbox, address=email)
        return True
    if existing.mailbox_id != mailbox.pk:
        raise ValidationError(f"The address {email} already delivers to the mailbox of {existing.mailbox}.")
    return False
