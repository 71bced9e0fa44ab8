"""The read-only audit trail: login events and session records.

The audit tables grow with every login attempt, so their pages
run no full-table COUNT or DISTINCT: the user and IP filters list the busiest values of the last day only,
and every username and IP in the list is a link that filters on it (any value works in the URL).
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta

from django.contrib import admin
from django.db.models import Count
from django.templatetags.static import static
from django.urls import reverse
from django.utils import timezone
from django.utils.html import conditional_escape, format_html
from django.utils.safestring import mark_safe
from django.utils.http import urlencode

from popserver.admin.mixins import ReadOnlyAdmin, when
from popserver.logins.peers import is_trusted_peer
from popserver.mailin.quota import format_octets
from popserver.models import LoginEvent, SessionRecord
from popserver.protocol.session import Pop3Session


class BusiestValueFilter(admin.SimpleListFilter):
    """Filter on one column. Lists the LIMIT values with the most rows in the last day (one range query on
    the model admin's indexed ``date_hierarchy`` column, not a scan of the whole table) and the selected
    value; any value can be given in the URL."""

    field = ""
    LIMIT = 10
    RECENT = timedelta(days=1)

    def clean(self, value: str) -> str | None:
        return value

    def lookups(self, request, model_admin):
        since = timezone.now() - self.RECENT
        busiest = (
            model_admin.model.objects.filter(**{f"{model_admin.date_hierarchy}__gte": since})
            .exclude(**{self.field: None})
            .values_list(self.field)
            .annotate(n=Count("pk"))
            .order_by("-n", self.field)[: self.LIMIT]
        )
        values = [str(value) for value, _ in busiest]
        selected = self.clean(self.value()) if self.value() is not None else None
        if selected is not None and selected not in values:
            values.append(selected)
        return [(value, value) for value in values]

    def queryset(self, request, queryset):
        if self.value() is None:
            return queryset
        value = self.clean(self.value())
        return queryset.none() if value is None else queryset.filter(**{self.field: value})


class UsernameFilter(BusiestValueFilter):
    title = "username (busiest of the last day)"
    parameter_name = field = "username"


class PeerIpFilter(BusiestValueFilter):
    title = "peer IP (busiest of the last day)"
    parameter_name = field = "peer_ip"

    def clean(self, value: str) -> str | None:
        try:
            return str(ipaddress.ip_address(value))  # PostgreSQL's inet refuses anything else
        except ValueError:
            return None


class OutcomeFilter(admin.SimpleListFilter):
    """An outcome, or every failure at once (``?outcome=failures``: the overview links here)."""

    title = "outcome"
    parameter_name = "outcome"
    FAILURES = "failures"

    def lookups(self, request, model_admin):
        return [(self.FAILURES, "Any failure"), *LoginEvent.OUTCOMES]

    def queryset(self, request, queryset):
        value = self.value()
        if value is None:
            return queryset
        if value == self.FAILURES:
            return queryset.exclude(outcome=LoginEvent.SUCCESS)
        return queryset.filter(outcome=value)


class TlsFilter(admin.SimpleListFilter):
    title = "TLS"
    parameter_name = "tls"

    def lookups(self, request, model_admin):
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(tls=self.value() == "yes")
        return queryset


class MechanismFilter(admin.SimpleListFilter):
    """The mechanisms the protocol offers (not a DISTINCT over the table)."""

    title = "mechanism"
    parameter_name = "mechanism"

    def lookups(self, request, model_admin):
        return [(name, name) for name in ("USER", *Pop3Session.sasl_mechanisms)]

    def queryset(self, request, queryset):
        return queryset if self.value() is None else queryset.filter(mechanism=self.value())


def _icon(yes: bool) -> str:
    """The admin's own yes/no icon, as its boolean columns show it."""
    return format_html(
        '<img src="{}" alt="{}">', static(f"admin/img/icon-{'yes' if yes else 'no'}.svg"), str(yes)
    )


def _filter_link(request_path: str, parameter: str, value) -> str:
    if value in (None, ""):
        return "-"
    # An IPv6 address may break after a colon (the list fits 1280 px); nothing else breaks mid-value.
    shown = mark_safe(":<wbr>".join(conditional_escape(part) for part in str(value).split(":")))  # noqa: S308
    return format_html('<a href="{}?{}">{}</a>', request_path, urlencode({parameter: value}), shown)


class AuditAdmin(ReadOnlyAdmin):  # lists that fit 1280 px: see FitsTheScreen
    """The audit trail: written by the server; ``prunepopaudit`` prunes it."""

    def _changelist_url(self) -> str:
        return reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_changelist")

    @admin.display(description="username", ordering="username")
    def username_link(self, row):
        return _filter_link(self._changelist_url(), UsernameFilter.parameter_name, row.username)

    @admin.display(description="peer IP", ordering="peer_ip")
    def peer_ip_link(self, row):
        return _filter_link(self._changelist_url(), PeerIpFilter.parameter_name, row.peer_ip)


@admin.register(LoginEvent)
class LoginEventAdmin(AuditAdmin):
    list_display = (
        "time_display",
        "username_link",
        "peer_ip_link",
        "mechanism",
        "tls_display",
        "outcome_display",
        "node",
    )
    list_filter = (OutcomeFilter, MechanismFilter, TlsFilter, UsernameFilter, PeerIpFilter, "node")
    search_fields = ("username", "^peer_ip")
    date_hierarchy = "time"
    fields = (
        "time",
        "username",
        "mailbox",
        "peer_ip",
        "mechanism",
        "tls_display",
        "outcome",
        "reason",
        "node",
    )

    @admin.display(description="time", ordering="time")
    def time_display(self, event):
        return when(event.time)  # may wrap: Django's date columns do not, and need room the list has not

    @admin.display(description="TLS", ordering="tls")
    def tls_display(self, event):
        """A tick for TLS; "TLS at proxy" where a load balancer ended it; "local" where no TLS is expected
        (POPSERVER_TRUSTED_NETWORKS, loopback by default: passwords may come in the clear from there); a cross
        only where TLS was missing."""
        if event.tls_at_proxy:
            return "TLS at proxy"
        if event.tls:
            return _icon(True)
        if event.peer_ip and is_trusted_peer(event.peer_ip):
            return "local"
        return _icon(False)

    @admin.display(description="outcome", ordering="outcome")
    def outcome_display(self, event):
        outcome = event.get_outcome_display()
        return f"{outcome} ({event.reason})" if event.reason else outcome


class ActivityFilter(admin.SimpleListFilter):
    title = "activity"
    parameter_name = "activity"

    def lookups(self, request, model_admin):
        return [("retrieved", "Retrieved messages"), ("deleted", "Deleted messages"), ("none", "Neither")]

    def queryset(self, request, queryset):
        if self.value() == "retrieved":
            return queryset.filter(retrieved_count__gt=0)
        if self.value() == "deleted":
            return queryset.filter(deleted_count__gt=0)
        if self.value() == "none":
            return queryset.filter(retrieved_count=0, deleted_count=0)
        return queryset


@admin.register(SessionRecord)
class SessionRecordAdmin(AuditAdmin):
    list_display = (
        "started",
        "username_link",
        "peer_ip_link",
        "duration_display",
        "activity",
        "end_reason",
    )  # the node is a filter and on the record's page: one more column would not fit 1280 px
    list_filter = (ActivityFilter, UsernameFilter, PeerIpFilter, "node")
    search_fields = ("username", "^peer_ip")
    date_hierarchy = "started_at"
    fields = (
        "started_at",
        "duration",
        "username",
        "mailbox",
        "peer_ip",
        "end_reason",
        "retrieved_count",
        "retrieved_bytes",
        "deleted_count",
        "deleted_bytes",
        "node",
    )

    @admin.display(description="started", ordering="started_at")
    def started(self, record):
        return when(record.started_at)

    @admin.display(description="duration", ordering="duration")
    def duration_display(self, record):
        return f"{record.duration:.1f} s"

    @admin.display(description="messages", ordering="retrieved_bytes")
    def activity(self, record):
        if not (record.retrieved_count or record.deleted_count):
            return "none"
        text = f"{record.retrieved_count} retrieved, {format_octets(record.retrieved_bytes)}"
        return f"{text}; {record.deleted_count} deleted" if record.deleted_count else text
