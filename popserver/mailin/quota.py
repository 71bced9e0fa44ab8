"""Mailbox quotas: a limit on the octets all of a mailbox's messages take and on how many there are.

A mailbox's own ``quota_bytes`` / ``quota_messages`` win when set (0 = unlimited for that mailbox); empty
means the site's default, POPSERVER_QUOTA_BYTES / POPSERVER_QUOTA_MESSAGES (0 = unlimited). Sizes are those
POP3 clients see in LIST. Delivery checks the quota inside its transaction, after locking the mailbox's row
(``delivery.store_prepared``), so two deliveries at once cannot both squeeze under the limit.

Quota warnings (POPSERVER_QUOTA_WARNINGS, shares of a limit in percent): a delivery that takes the usage from
below a share to at or above it has crossed it (``crossing``). The same row lock makes that race-free, and
crossing back below (mail deleted) and up again is a new crossing, as with Dovecot's ``quota_warning``.
Messages the server writes itself (``Message.server_notice``, the warnings) never count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from django import forms
from django.db.models import Count, Sum

from popserver.conf import get_setting
from popserver.exceptions import QuotaExceeded


@dataclass(frozen=True, slots=True)
class Usage:
    messages: int = 0
    octets: int = 0


@dataclass(frozen=True, slots=True)
class Crossing:
    """A delivery took the usage of ``unit`` ("octets" or "messages") across ``threshold`` percent of
    ``limit``; ``used`` is the usage after it."""

    threshold: float
    unit: str
    used: int
    limit: int

    @property
    def percent(self) -> int:
        return self.used * 100 // self.limit


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


def usage(mailbox_id: int) -> Usage:
    """What counts against the mailbox's quota now (its messages but the server's own notices): one
    aggregate over the (mailbox, server_notice, size) index."""
    from popserver.models import Message

    totals = (
        Message.objects.visible()
        .filter(mailbox_id=mailbox_id, server_notice=False)
        .aggregate(count=Count("pk"), octets=Sum("size"))
    )
    return Usage(totals["count"], totals["octets"] or 0)


def check(mailbox_id: int, applying: Limits, size: int) -> Usage | None:
    """Raise QuotaExceeded if one more message of ``size`` octets would pass ``applying``; else return the
    usage before it (None when nothing is limited: then nothing was counted).

    Call it with the mailbox's row locked, in the transaction that stores the message.
    """
    if applying.unlimited:
        return None
    now = usage(mailbox_id)
    count, octets = now.messages, now.octets
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
    return now


def crossing(before: Usage, size: int, applying: Limits, thresholds=None) -> Crossing | None:
    """The highest share of POPSERVER_QUOTA_WARNINGS (or ``thresholds``) that one more message of ``size``
    octets takes the usage across, upward: below it before, at or above it after. None if none.

    Like Dovecot, one delivery that crosses several shares at once warns once, for the highest; when both
    units cross the same share, the size is named.
    """
    thresholds = get_setting("QUOTA_WARNINGS") if thresholds is None else thresholds
    found = []
    for unit, limit, old, new in (
        ("octets", applying.octets, before.octets, before.octets + size),
        ("messages", applying.messages, before.messages, before.messages + 1),
    ):
        if not limit:
            continue
        for threshold in thresholds:
            if old * 100 < threshold * limit <= new * 100:
                found.append(Crossing(threshold, unit, new, limit))
    return max(found, key=lambda c: (c.threshold, c.unit == "octets"), default=None)


def share(used: int, limit: int) -> int:
    """``used`` as a whole percentage of ``limit`` (rounded down: 99 % is not yet full)."""
    return used * 100 // limit if limit else 0


def usage_parts(messages: int, octets: int, applying: Limits) -> list[tuple[int, str]]:
    """(percent, "1.7 KiB of 500 MiB, 3 %") for each limited unit; empty when nothing is limited."""
    parts = []
    if applying.octets:
        percent = share(octets, applying.octets)
        parts.append((percent, f"{format_octets(octets)} of {format_octets(applying.octets)}, {percent} %"))
    if applying.messages:
        percent = share(messages, applying.messages)
        noun = "message" if applying.messages == 1 else "messages"
        parts.append((percent, f"{messages} of {applying.messages} {noun}, {percent} %"))
    return parts


def describe_usage(messages: int, octets: int, applying: Limits, *, short: bool = False) -> str:
    """Use against the limit, for people: "1.7 KiB of 500 MiB, 3 %" (and "; 7 of 1000 messages, 1 %" when
    both are limited; ``short``: only the fuller of the two), "(full)" when no more mail fits, or
    "unlimited"."""
    parts = usage_parts(messages, octets, applying)
    if not parts:
        return "unlimited"
    if short:
        parts = [max(parts, key=lambda part: part[0])]
    full = (applying.octets and octets >= applying.octets) or (
        applying.messages and messages >= applying.messages
    )
    return "; ".join(text for _, text in parts) + (" (full)" if full else "")


def format_octets(octets: int) -> str:
    """A size for people in binary units, as the README and the quota fields use them: "512 octets",
    "1.7 KiB", "64 MiB", "1.5 GiB"."""
    if octets < 1024:
        return f"{octets} octet" if octets == 1 else f"{octets} octets"
    value = float(octets)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


# Sizes typed by people ---------------------------------------------------------------------------------------
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """Octets from "104857600", "100M", "100 MB", "100 MiB", "1.5G" (binary multiples, as ``format_octets``
    shows them).

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
