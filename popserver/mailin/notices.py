"""Messages the server writes into a mailbox itself: the quota warning.

Its text comes from templates a site can override (``popserver/quota_warning_subject.txt``, one line, and
``popserver/quota_warning.txt``); both get ``mailbox``, ``user``, ``unit`` ("octets" or "messages"),
``threshold`` and ``percent`` (of the limit), ``used`` and ``limit`` (numbers), ``used_text`` and
``limit_text`` ("400 MiB", "800 messages"), ``usage`` (every limited unit, "400 MiB of 500 MiB, 80 %") and
``permanent`` (POPSERVER_QUOTA_EXCEEDED_PERMANENT: mail over quota bounces rather than waits).
"""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate

from django.conf import settings
from django.core.mail import make_msgid
from django.template.loader import render_to_string

from popserver.conf import get_setting
from popserver.mailin import quota
from popserver.models import Mailbox


def _count_text(unit: str, number: int) -> str:
    if unit == "octets":
        return quota.format_octets(number)
    return f"{number} message" if number == 1 else f"{number} messages"


def quota_warning(
    mailbox: Mailbox, crossing: quota.Crossing, applying: quota.Limits, after: quota.Usage
) -> bytes:
    """The warning for ``crossing`` (``after``: the usage with the delivery that crossed) as an RFC 5322
    message (UTF-8 text), addressed to the mailbox's first address (or its login name), from
    DEFAULT_FROM_EMAIL, marked ``Auto-Submitted: auto-generated`` (RFC 3834) so that vacation responders
    leave it alone."""
    context = {
        "mailbox": mailbox,
        "user": mailbox.user,
        "unit": crossing.unit,
        "threshold": _number(crossing.threshold),
        "percent": crossing.percent,
        "used": crossing.used,
        "limit": crossing.limit,
        "used_text": _count_text(crossing.unit, crossing.used),
        "limit_text": _count_text(crossing.unit, crossing.limit),
        "usage": quota.describe_usage(after.messages, after.octets, applying),
        "permanent": get_setting("QUOTA_EXCEEDED_PERMANENT"),
    }
    subject = " ".join(render_to_string("popserver/quota_warning_subject.txt", context).split())
    body = render_to_string("popserver/quota_warning.txt", context)
    address = mailbox.addresses.order_by("pk").values_list("address", flat=True).first()
    message = EmailMessage(policy=SMTP)
    message["From"] = settings.DEFAULT_FROM_EMAIL
    message["To"] = address or mailbox.user.get_username()
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid()
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body, charset="utf-8")
    return message.as_bytes()


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
