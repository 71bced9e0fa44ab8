"""The admin of logins: lock-outs (see and lift them) and app passwords (the secret shown once when an
administrator creates one; revocable, never readable)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.db.models import BooleanField, Case, When
from django.template.response import TemplateResponse
from django.utils import timezone

from popserver.admin.mixins import FitsTheScreen, counted, user_search_fields, when
from popserver.logins.app_passwords import create_app_password, revoke_app_password
from popserver.logins.throttle import DatabaseThrottle, get_throttle
from popserver.models import AppPassword, LoginThrottle


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
class LoginThrottleAdmin(FitsTheScreen, admin.ModelAdmin):
    """The database throttle's counters. Clearing a row lifts its lock-out and forgets its failures."""

    list_display = ("key", "scope", "failures", "window", "until", "locked_now")
    list_filter = ("scope", LockedNowFilter)
    search_fields = ("key",)
    actions = ("clear_lockouts",)
    fields = ("scope", "key", "failures", "window_started", "locked_until", "locked_now")
    readonly_fields = fields

    def get_ordering(self, request):
        return ("-locked_now", "-locked_until", "-window_started")  # current lock-outs first

    def get_queryset(self, request):
        locked_now = Case(
            When(locked_until__gt=timezone.now(), then=True), default=False, output_field=BooleanField()
        )  # not NULL when locked_until is
        rows = self.model._default_manager.annotate(locked_now=locked_now)  # before ordering by it
        return rows.order_by(*self.get_ordering(request))

    @admin.display(description="since", ordering="window_started")
    def window(self, row):
        return when(row.window_started)

    @admin.display(description="until", ordering="locked_until")
    def until(self, row):
        return when(row.locked_until)

    @admin.display(description="locked", boolean=True, ordering="locked_now")
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
        self.message_user(
            request,
            f"Cleared {counted(count, 'lock-out')}: those logins are no longer refused.",
            messages.SUCCESS,
        )


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
        label="Revoked",
        required=False,
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
class AppPasswordAdmin(FitsTheScreen, admin.ModelAdmin):
    """The secret exists only in the page that answers the add form; the stored digest is never shown."""

    list_display = ("name", "owner", "created", "last_used", "active")
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
        return ["name", *(f"mailbox__{field}" for field in user_search_fields())]

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

    @admin.display(description="created", ordering="created_at")
    def created(self, app_password):
        return when(app_password.created_at)

    @admin.display(description="last used", ordering="last_used_at")
    def last_used(self, app_password):
        if app_password.last_used_at is None:
            return "never"
        return f"{when(app_password.last_used_at)} from {app_password.last_used_peer or '?'}"

    @admin.display(description="active", boolean=True, ordering="revoked_at")
    def active(self, app_password):
        return app_password.is_active

    # Adding: create_app_password makes the row and the secret; the secret goes into the response only.
    def add_view(self, request, form_url="", extra_context=None):
        extra_context = {
            **(extra_context or {}),
            "show_save_and_add_another": False,
            "show_save_and_continue": False,
        }
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
