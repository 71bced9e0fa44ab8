"""The admin of logins: lock-outs (see and lift them), app passwords (the secret shown once when an
administrator creates one; revocable, never readable) and the read-only audit trail.

Imported at the end of ``popserver.admin``. The audit tables grow with every login attempt, so their pages
run no full-table COUNT or DISTINCT: the user and IP filters list the busiest values of the last day only,
and every username and IP in the list is a link that filters on it (any value works in the URL).
"""
from __future__ import annotations

import ipaddress
from datetime import timedelta

from django import forms
from django.contrib import admin, messages
from django.db.models import BooleanField, Case, Count, When
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from .admin import _user_search_fields, counted
from .apppasswords import create_app_password, revoke_app_password
from .models import AppPassword, LoginEvent, LoginThrottle, SessionRecord
from .protocol.session import Pop3Session
from .throttle import DatabaseThrottle, get_throttle


# Lock-outs ----------------------------------------------------------------------------------------------------
class LockedNowFilter(admin.SimpleListFilter):
    title = "locked out now"
    parameter_name = "locked"

    def lookups(self, request, model_admin):
        return [("yes", "Yes"), ("no", "No (counting failures)")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(locked_until__gt=timezone.now())
        if self.value() == "no":
            return queryset.exclude(locked_until__gt=timezone.now())
        return queryset


@admin.register(LoginThrottle)
class LoginThrottleAdmin(admin.ModelAdmin):
    """The database throttle's counters. Clearing a row lifts its lock-out and forgets its failures."""

    list_display = ("key", "scope", "failures", "window_started", "locked_until", "locked_now")
    list_filter = ("scope", LockedNowFilter)
    search_fields = ("key",)
    actions = ("clear_lockouts",)
    fields = ("scope", "key", "failures", "window_started", "locked_until", "locked_now")
    readonly_fields = fields

    def get_ordering(self, request):
        return ("-locked_now", "-locked_until", "-window_started")  # current lock-outs first

    def get_queryset(self, request):
        locked_now = Case(When(locked_until__gt=timezone.now(), then=True), default=False,
                          output_field=BooleanField())  # not NULL when locked_until is
        rows = self.model._default_manager.annotate(locked_now=locked_now)  # before ordering by it
        return rows.order_by(*self.get_ordering(request))

    @admin.display(description="locked out now", boolean=True, ordering="locked_now")
    def locked_now(self, row):
        return row.locked_until is not None and row.locked_until > timezone.now()

    def has_add_permission(self, request):
        return False  # rows are the throttle's own counters

    def has_change_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        if not isinstance(get_throttle(), DatabaseThrottle):
            self.message_user(
                request,
                "POPSERVER_THROTTLE is not the database throttle: its lock-outs live in the cache and are not "
                "listed here. Lift one with: manage.py poplockouts --clear KEY",
                messages.WARNING,
            )
        return super().changelist_view(request, extra_context)

    @admin.action(description="Clear selected lock-outs", permissions=["delete"])
    def clear_lockouts(self, request, queryset):
        rows = list(queryset)
        self.log_deletions(request, rows)
        count = LoginThrottle.objects.filter(pk__in=[row.pk for row in rows]).delete()[0]
        self.message_user(request, f"Cleared {counted(count, 'lock-out')}: those logins are no longer refused.",
                          messages.SUCCESS)


# App passwords ------------------------------------------------------------------------------------------------
class ActiveFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        if self.value() == "active":
            return queryset.filter(revoked_at=None)
        if self.value() == "revoked":
            return queryset.exclude(revoked_at=None)
        return queryset


class AppPasswordAddForm(forms.ModelForm):
    class Meta:
        model = AppPassword
        fields = ("mailbox", "name")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["name"].help_text = (
            "e.g. the device or program that will use it. The password itself is generated when you save, and "
            "shown to you once."
        )


class AppPasswordChangeForm(forms.ModelForm):
    """The name, and a one-way switch to revoke (a revoked app password is never made active again)."""

    revoke = forms.BooleanField(
        label="Revoked", required=False,
        help_text="POP3 refuses a revoked app password at once. This cannot be undone: create a new one instead.",
    )

    class Meta:
        model = AppPassword
        fields = ("name",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.revoked_at is not None:
            self.fields["revoke"].initial = True
            self.fields["revoke"].disabled = True


@admin.register(AppPassword)
class AppPasswordAdmin(admin.ModelAdmin):
    """The secret exists only in the page that answers the add form; the stored digest is never shown."""

    list_display = ("name", "owner", "created_at", "last_used_at", "last_used_peer", "active")
    list_filter = (ActiveFilter,)
    list_select_related = ("mailbox__user",)
    raw_id_fields = ("mailbox",)  # a select of every mailbox would not do on a large site
    actions = ("revoke_selected",)
    add_fieldsets = ((None, {"fields": ("mailbox", "name")}),)
    fieldsets = (
        (None, {"fields": ("mailbox", "name", "revoke")}),
        ("Use", {"fields": ("created_at", "last_used_at", "last_used_peer", "revoked_at")}),
    )
    change_readonly_fields = ("mailbox", "created_at", "last_used_at", "last_used_peer", "revoked_at")

    def get_search_fields(self, request):
        return ["name", *(f"mailbox__{field}" for field in _user_search_fields())]

    def get_fieldsets(self, request, obj=None):
        return self.fieldsets if obj is not None else self.add_fieldsets

    def get_readonly_fields(self, request, obj=None):
        return self.change_readonly_fields if obj is not None else ()

    def get_form(self, request, obj=None, change=False, **kwargs):
        kwargs["form"] = AppPasswordChangeForm if obj is not None else AppPasswordAddForm
        return super().get_form(request, obj, change, **kwargs)

    @admin.display(description="mailbox", ordering="mailbox__user")
    def owner(self, app_password):
        return str(app_password.mailbox)

    @admin.display(description="active", boolean=True, ordering="revoked_at")
    def active(self, app_password):
        return app_password.is_active

    # Adding: create_app_password makes the row and the secret; the secret goes into the response only.
    def add_view(self, request, form_url="", extra_context=None):
        extra_context = {**(extra_context or {}), "show_save_and_add_another": False,
                         "show_save_and_continue": False}
        return super().add_view(request, form_url, extra_context)

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            if form.cleaned_data.get("revoke") and obj.revoked_at is None:
                revoke_app_password(obj)
            return
        created, secret = create_app_password(obj.mailbox, obj.name)
        for field in AppPassword._meta.concrete_fields:  # the admin goes on with ``obj`` (log, response)
            setattr(obj, field.attname, getattr(created, field.attname))
        obj._state = created._state
        obj.new_secret = secret

    def response_add(self, request, obj, post_url_continue=None):
        secret = getattr(obj, "new_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "title": "App password created",
            "subtitle": None,
            "opts": self.opts,
            "app_password": obj,
            "secret": secret,
        }
        # The admin's views are never cached; nothing else keeps the secret (no message, no log entry).
        return TemplateResponse(request, "admin/popserver/apppassword/created.html", context)

    @admin.action(description="Revoke selected app passwords", permissions=["change"])
    def revoke_selected(self, request, queryset):
        revoked = 0
        for app_password in queryset.filter(revoked_at=None):
            revoke_app_password(app_password)
            self.log_change(request, app_password, "Revoked.")
            revoked += 1
        self.message_user(request, f"Revoked {counted(revoked, 'app password')}.", messages.SUCCESS)


# Audit --------------------------------------------------------------------------------------------------------
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
            model_admin.model.objects.filter(**{f"{model_admin.date_hierarchy}__gte": since}).exclude(**{self.field: None})
            .values_list(self.field).annotate(n=Count("pk")).order_by("-n", self.field)[: self.LIMIT]
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


class AuditAdmin(admin.ModelAdmin):
    """Read-only: rows are written by the server. Superusers may delete them; ``prunepopaudit`` prunes."""

    show_full_result_count = False  # a large table: no second COUNT over every row on each page
    list_per_page = 50

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return request.user.is_superuser and super().has_delete_permission(request, obj)

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
    list_display = ("time", "username_link", "peer_ip_link", "mechanism", "tls", "outcome", "reason")
    list_filter = ("outcome", MechanismFilter, "tls", UsernameFilter, PeerIpFilter)
    search_fields = ("username", "^peer_ip")
    date_hierarchy = "time"
    fields = ("time", "username", "mailbox", "peer_ip", "mechanism", "tls", "outcome", "reason")


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
    list_display = ("started_at", "username_link", "peer_ip_link", "duration_display", "retrieved", "deleted",
                    "end_reason")
    list_filter = (ActivityFilter, UsernameFilter, PeerIpFilter)
    search_fields = ("username", "^peer_ip")
    date_hierarchy = "started_at"
    fields = ("started_at", "duration", "username", "mailbox", "peer_ip", "end_reason", "retrieved_count",
              "retrieved_bytes", "deleted_count", "deleted_bytes")

    @admin.display(description="duration", ordering="duration")
    def duration_display(self, record):
        return f"{record.duration:.1f} s"

    @admin.display(description="retrieved", ordering="retrieved_bytes")
    def retrieved(self, record):
        return f"{counted(record.retrieved_count, 'message')}, {filesizeformat(record.retrieved_bytes)}"

    @admin.display(description="deleted", ordering="deleted_bytes")
    def deleted(self, record):
        return f"{counted(record.deleted_count, 'message')}, {filesizeformat(record.deleted_bytes)}"
