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
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from popserver.admin.mixins import ReadOnlyAdmin, counted
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


class MechanismFilter(admin.SimpleListFilter):
    """The mechanisms the protocol offers (not a DISTINCT over the table)."""

    title = "mechanism"
    parameter_name = "mechanism"

    def lookups(self, request, model_admin):
        return [(name, name) for name in ("USER", *Pop3Session.sasl_mechanisms)]

    def queryset(self, request, queryset):
        return queryset if self.value() is None else queryset.filter(mechanism=self.value())


def _filter_link(request_path: str, parameter: str, value) -> str:
    if value in (None, ""):
        return "-"
    return format_html('<a href="{}?{}">{}</a>', request_path, urlencode({parameter: value}), value)


class AuditAdmin(ReadOnlyAdmin):
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
    list_display = ("time", "username_link", "peer_ip_link", "mechanism", "tls", "outcome", "reason", "node")
    list_filter = ("outcome", MechanismFilter, "tls", "tls_at_proxy", UsernameFilter, PeerIpFilter, "node")
    search_fields = ("username", "^peer_ip")
    date_hierarchy = "time"
    fields = (
        "time",
        "username",
        "mailbox",
        "peer_ip",
        "mechanism",
        "tls",
        "tls_at_proxy",
        "outcome",
        "reason",
        "node",
    )


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
        "started_at",
        "username_link",
        "peer_ip_link",
        "duration_display",
        "retrieved",
        "deleted",
        "end_reason",
        "node",
    )
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

    @admin.display(description="duration", ordering="duration")
    def duration_display(self, record):
        return f"{record.duration:.1f} s"

    @admin.display(description="retrieved", ordering="retrieved_bytes")
    def retrieved(self, record):
        return f"{counted(record.retrieved_count, 'message')}, {filesizeformat(record.retrieved_bytes)}"

    @admin.display(description="deleted", ordering="deleted_bytes")
    def deleted(self, record):
        return f"{counted(record.deleted_count, 'message')}, {filesizeformat(record.deleted_bytes)}"
