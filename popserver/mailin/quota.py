"""Mailbox quotas: a limit on the octets all of a mailbox's messages take and on how many there are.

A mailbox's own ``quota_bytes`` / ``quota_messages`` win when set (0 = unlimited for that mailbox); empty
means the site's default, POPSERVER_QUOTA_BYTES / POPSERVER_QUOTA_MESSAGES (0 = unlimited). Sizes are those
POP3 clients see in LIST. Delivery checks the quota inside its transaction, after locking the mailbox's row
(``delivery.store_prepared``), so two deliveries at once cannot both squeeze under the limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django import forms
from django.db.models import Count, Sum
from django.template.defaultfilters import filesizeformat

from popserver.conf import get_setting
from popserver.exceptions import QuotaExceeded


@dataclass(frozen=True, slots=True)
class Limits:
    octets: int = 0  # 0: unlimited
    messages: int = 0

    @property
    def unlimited(self) -> bool:
        return not (self.octets or self.messages)


def limits(quota_bytes: int | None, quota_messages: int | None) -> Limits:
    """The limits that apply, from a mailbox's own fields (None: the site default)."""
    return Limits(
        octets=get_setting("QUOTA_BYTES") if quota_bytes is None else quota_bytes,
        messages=get_setting("QUOTA_MESSAGES") if quota_messages is None else quota_messages,
    )


def mailbox_limits(mailbox) -> Limits:
    return limits(mailbox.quota_bytes, mailbox.quota_messages)


def usage(mailbox_id: int) -> tuple[int, int]:
    """(messages, octets) the mailbox holds now: one aggregate over the (mailbox, size) index."""
    from popserver.models import Message

    totals = (
        Message.objects.visible()
        .filter(mailbox_id=mailbox_id)
        .aggregate(count=Count("pk"), octets=Sum("size"))
    )
    return totals["count"], totals["octets"] or 0


def check(mailbox_id: int, applying: Limits, size: int) -> None:
    """Raise QuotaExceeded if one more message of ``size`` octets would pass ``applying``.

    Call it with the mailbox's row locked, in the transaction that stores the message.
    """
    if applying.unlimited:
        return
    count, octets = usage(mailbox_id)
    if applying.messages and count + 1 > applying.messages:
        raise QuotaExceeded(
            f"mailbox is full: it holds {count} of at most {applying.messages} messages",
            unit="messages",
            limit=applying.messages,
            used=count,
        )
    if applying.octets and octets + size > applying.octets:
        raise QuotaExceeded(
            f"mailbox is full: a message of {size} octets would take it over its quota of {applying.octets} "
            "octets",
            unit="octets",
            limit=applying.octets,
            used=octets,
        )


def describe_usage(messages: int, octets: int, applying: Limits) -> str:
    """For people: "12.3 MB of 100.0 MB, 40 of 1000 messages"; a part without a limit shows the usage alone,
    and a mailbox that takes no more mail says so."""
    size = filesizeformat(octets)
    if applying.octets:
        size = f"{size} of {filesizeformat(applying.octets)}"
    noun = "message" if (applying.messages or messages) == 1 else "messages"
    count = f"{messages} of {applying.messages} {noun}" if applying.messages else f"{messages} {noun}"
    full = (applying.octets and octets >= applying.octets) or (
        applying.messages and messages >= applying.messages
    )
    return f"{size}, {count}" + (" (full)" if full else "")


# Sizes typed by people ---------------------------------------------------------------------------------------
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Octets from "104857600", "100M", "100 MB", "1.5G" (binary multiples, as filesizeformat shows them).

    Raises ValueError for anything else.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.lower()]) if "." in number else int(number) * _UNITS[unit.lower()]


def format_size(octets: int) -> str:
    """The shortest exact form parse_size reads back: "100M" for 104857600, "1000" for 1000."""
    for unit in ("T", "G", "M", "K"):
        factor = _UNITS[unit.lower()]
        if octets and octets % factor == 0:
            return f"{octets // factor}{unit}"
    return str(octets)


class SizeField(forms.Field):
    """A form field for a quota in octets that people can type as "500M" or "2G"; empty is None."""

    widget = forms.TextInput
    default_error_messages = {"invalid": "Enter a size such as 500M, 2G or 1048576 (octets)."}

    def prepare_value(self, value):
        return format_size(value) if isinstance(value, int) else value

    def to_python(self, value):
        if value in self.empty_values or (isinstance(value, str) and not value.strip()):
            return None
        try:
            octets = value if isinstance(value, int) else parse_size(str(value))
        except ValueError:
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid") from None
        if not 0 <= octets < 2**63:  # a PositiveBigIntegerField
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return octets
