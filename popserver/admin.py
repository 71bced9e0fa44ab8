"""The admin: mailboxes (addresses, counts, the lock and who holds it, POP3 on/off) and their messages.

Counts and sizes on the mailbox list come from correlated subqueries in the page's one query, so the list costs
the same few queries for 30 mailboxes or 10,000. Messages are read-only here: they arrive through delivery
(or the upload page, which goes through delivery too); their contents need ``view_message_content``.
"""
from datetime import timedelta

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist
from django.db import transaction
from django.db.models import Count, Exists, OuterRef, Prefetch, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode

from . import admin_views, quota
from .admin_ops import LockRelease, delete_messages, empty_mailbox, release_stale_lock
from .conf import get_setting
from .maildrop import lock_is_stale
from .models import Address, Mailbox, Message

User = get_user_model()
USERNAME_LOOKUP = f"user__{User.USERNAME_FIELD}"


def _user_search_fields() -> list[str]:
    """The owner's login name and e-mail field, whatever the site's user model calls them."""
    fields = [USERNAME_LOOKUP]
    email = User.get_email_field_name()
    try:
        if email != User.USERNAME_FIELD and User._meta.get_field(email).concrete:
            fields.append(f"user__{email}")
    except FieldDoesNotExist:
        pass
    return fields


def counted(number: int, singular: str, plural: str = "") -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _describe_lock(mailbox: Mailbox) -> str:
    peer = f" for {mailbox.lock_peer}" if mailbox.lock_peer else ""
    return f"{mailbox.lock_host} pid {mailbox.lock_pid}{peer}"


def _message_list_url(mailbox_id: int) -> str:
    return f"{reverse('admin:popserver_message_changelist')}?{urlencode({'mailbox': mailbox_id})}"


# Mailboxes ----------------------------------------------------------------------------------------------------
class AddressInline(admin.TabularInline):
    model = Address
    extra = 1


class LockFilter(admin.SimpleListFilter):
    title = "lock"
    parameter_name = "locked"

    def lookups(self, request, model_admin):
        return [
            ("yes", "Locked"),
            ("no", "Not locked"),
            ("old", "Locked, heartbeat overdue"),
        ]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.exclude(lock_token="")
        if self.value() == "no":
            return queryset.filter(lock_token="")
        if self.value() == "old":
            overdue = timezone.now() - timedelta(seconds=get_setting("LOCK_STALE_AFTER"))
            return queryset.exclude(lock_token="").filter(lock_heartbeat__lt=overdue)
        return queryset


@admin.register(Mailbox)
class MailboxAdmin(admin.ModelAdmin):
    inlines = (AddressInline,)
    list_display = (
        "owner", "address_list", "messages_link", "total_size", "quota_usage", "pop3_enabled", "lock_holder",
        "locked_at", "lock_heartbeat", "last_login",
    )
    list_filter = ("pop3_enabled", LockFilter)
    list_select_related = ("user",)
    raw_id_fields = ("user",)  # a select of every user would not do on a large site
    actions = ("release_stale_locks", "empty_mailboxes", "enable_pop3", "disable_pop3")
    readonly_fields = (
        "message_summary", "lock_holder", "locked_at", "lock_heartbeat", "last_login", "created_at",
        "uid_validity", "next_uid", "quota_usage",
    )
    fieldsets = (
        (None, {"fields": ("user", "pop3_enabled")}),
        ("Messages", {"fields": ("message_summary",)}),
        ("Quota", {"fields": ("quota_usage", "quota_bytes", "quota_messages")}),
        ("Lock", {"fields": ("lock_holder", "locked_at", "lock_heartbeat")}),
        ("History", {"fields": ("last_login", "created_at", "uid_validity", "next_uid")}),
    )
    add_fieldsets = ((None, {"fields": ("user", "pop3_enabled")}),)

    def get_search_fields(self, request):
        return [*_user_search_fields(), "addresses__address"]

    def get_fieldsets(self, request, obj=None):
        return self.fieldsets if obj is not None else self.add_fieldsets

    def get_queryset(self, request):
        messages_of = Message.objects.filter(mailbox=OuterRef("pk")).order_by().values("mailbox")
        return (
            super()
            .get_queryset(request)
            .annotate(
                message_count=Coalesce(Subquery(messages_of.annotate(n=Count("pk")).values("n")), Value(0)),
                message_octets=Coalesce(Subquery(messages_of.annotate(s=Sum("size")).values("s")), Value(0)),
            )
            .prefetch_related(Prefetch("addresses", queryset=Address.objects.order_by("address")))
        )

    # Columns and read-only fields -----------------------------------------------------------------------------
    @admin.display(description="owner", ordering=USERNAME_LOOKUP)
    def owner(self, mailbox):
        return str(mailbox.user)

    @admin.display(description="addresses")
    def address_list(self, mailbox):
        return ", ".join(address.address for address in mailbox.addresses.all())

    @admin.display(description="messages", ordering="message_count")
    def messages_link(self, mailbox):
        return format_html('<a href="{}">{}</a>', _message_list_url(mailbox.pk), mailbox.message_count)

    @admin.display(description="size", ordering="message_octets")
    def total_size(self, mailbox):
        return filesizeformat(mailbox.message_octets)

    @admin.display(description="quota")
    def quota_usage(self, mailbox):
        """From the page's annotations and the settings: no query of its own."""
        return quota.describe_usage(mailbox.message_count, mailbox.message_octets, quota.mailbox_limits(mailbox))

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "quota_bytes":  # typed as 500M or 2G, not only in octets
            return quota.SizeField(required=False, label="Size quota", help_text=(
                "All messages together, e.g. 500M or 2G (binary multiples) or octets. "
                "Empty: the site default (POPSERVER_QUOTA_BYTES); 0: unlimited."
            ))
        return super().formfield_for_dbfield(db_field, request, **kwargs)

    @admin.display(description="lock held by")
    def lock_holder(self, mailbox):
        if not mailbox.lock_token:
            return "not locked"
        state = "stale: its holder is gone" if lock_is_stale(mailbox) else "live session"
        return f"{_describe_lock(mailbox)} ({state})"

    @admin.display(description="messages")
    def message_summary(self, mailbox):
        return format_html(
            '{}, {} ({} octets) · <a href="{}">list them</a>',
            counted(mailbox.message_count, "message"), filesizeformat(mailbox.message_octets), mailbox.message_octets,
            _message_list_url(mailbox.pk),
        )

    # Pages --------------------------------------------------------------------------------------------------
    def get_urls(self):
        upload = self.admin_site.admin_view(self.upload_view)
        return [path("<path:object_id>/upload/", upload, name="popserver_mailbox_upload"), *super().get_urls()]

    def upload_view(self, request, object_id):
        return admin_views.mailbox_upload(self, self.admin_site.get_model_admin(Message), request, object_id)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        if request.user.has_perm(admin_views.UPLOAD_PERMISSION):
            extra_context["upload_url"] = reverse("admin:popserver_mailbox_upload", args=[object_id])
        return super().change_view(request, object_id, form_url, extra_context)

    def get_deleted_objects(self, objs, request):
        """A summary instead of Django's list of every related row (which would load each message's body)."""
        mailboxes = list(objs)
        message_count = Message.objects.filter(mailbox__in=mailboxes).count()
        perms_needed = set()
        if not self.has_delete_permission(request):
            perms_needed.add(self.opts.verbose_name)
        if message_count and not request.user.has_perm("popserver.delete_message"):
            perms_needed.add(Message._meta.verbose_name)
        summary = [
            format_html("{}: {} ({})", self.opts.verbose_name.capitalize(), mailbox,
                        counted(mailbox.message_count, "message"))
            for mailbox in mailboxes
        ]
        model_count = {self.opts.verbose_name_plural: len(mailboxes), Message._meta.verbose_name_plural: message_count}
        return summary, model_count, perms_needed, []

    def delete_model(self, request, obj):
        with transaction.atomic():
            empty_mailbox(obj.pk)  # the bodies too, whatever the body store
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            for mailbox in queryset:
                empty_mailbox(mailbox.pk)
            super().delete_queryset(request, queryset)

    # Actions ------------------------------------------------------------------------------------------------
    def has_empty_permission(self, request):
        return request.user.has_perm("popserver.delete_message")

    @admin.action(description="Release the stale lock of the selected mailboxes", permissions=["change"])
    def release_stale_locks(self, request, queryset):
        for mailbox in queryset:
            outcome, seen = release_stale_lock(mailbox.pk)
            if outcome is LockRelease.RELEASED:
                self.log_change(request, mailbox, f"Released the stale lock of {_describe_lock(seen)}.")
                self.message_user(request, f"{mailbox}: released the stale lock of {_describe_lock(seen)}.",
                                  messages.SUCCESS)
            elif outcome is LockRelease.LIVE:
                since = timezone.localtime(seen.locked_at).strftime("%Y-%m-%d %H:%M:%S") if seen.locked_at else "?"
                self.message_user(
                    request,
                    f"{mailbox}: not released: the lock is held by a live session ({_describe_lock(seen)}, "
                    f"since {since}). It is released when that session ends.",
                    messages.ERROR,
                )
            else:
                self.message_user(request, f"{mailbox}: was not locked.", messages.INFO)

    @admin.action(description="Empty the selected mailboxes (delete all their messages)", permissions=["empty"])
    def empty_mailboxes(self, request, queryset):
        if request.POST.get("post") == "yes":
            for mailbox in queryset:
                count, octets = empty_mailbox(mailbox.pk)
                self.log_change(request, mailbox, f"Emptied: deleted {counted(count, 'message')} ({octets} octets).")
                self.message_user(request, f"{mailbox}: deleted {counted(count, 'message')} ({filesizeformat(octets)}).",
                                  messages.SUCCESS)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Empty mailboxes",
            "subtitle": None,
            "opts": self.opts,
            "mailboxes": queryset,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        return TemplateResponse(request, "admin/popserver/mailbox/empty_confirmation.html", context)

    def _set_pop3(self, request, queryset, enabled: bool):
        changed = queryset.filter(pop3_enabled=not enabled)
        for mailbox in changed:
            self.log_change(request, mailbox, [{"changed": {"fields": ["POP3 access"]}}])
        count = Mailbox.objects.filter(pk__in=[mailbox.pk for mailbox in changed]).update(pop3_enabled=enabled)
        self.message_user(request, f"POP3 turned {'on' if enabled else 'off'} for {counted(count, 'mailbox', 'mailboxes')}.",
                          messages.SUCCESS)

    @admin.action(description="Turn POP3 on for the selected mailboxes", permissions=["change"])
    def enable_pop3(self, request, queryset):
        self._set_pop3(request, queryset, True)

    @admin.action(description="Turn POP3 off for the selected mailboxes", permissions=["change"])
    def disable_pop3(self, request, queryset):
        self._set_pop3(request, queryset, False)


# Messages -----------------------------------------------------------------------------------------------------
class MailboxFilter(admin.SimpleListFilter):
    """Messages of one mailbox (``?mailbox=<id>``). Lists at most LIMIT mailboxes that have messages: the
    mailbox list links to every mailbox's messages."""

    title = "mailbox"
    parameter_name = "mailbox"
    LIMIT = 100

    def lookups(self, request, model_admin):
        with_messages = Mailbox.objects.filter(Exists(Message.objects.filter(mailbox=OuterRef("pk"))))
        choices = list(with_messages.select_related("user").order_by(USERNAME_LOOKUP)[: self.LIMIT])
        selected = self.value()
        if selected and selected.isdigit() and all(str(mailbox.pk) != selected for mailbox in choices):
            choices += list(Mailbox.objects.select_related("user").filter(pk=selected))
        return [(str(mailbox.pk), str(mailbox)) for mailbox in choices]

    def queryset(self, request, queryset):
        value = self.value()
        if value is None:
            return queryset
        if not value.isdigit():
            return queryset.none()
        return queryset.filter(mailbox_id=int(value))


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = ("subject_line", "sender", "date", "size_display", "uid", "arrived_at", "mailbox")
    list_filter = (MailboxFilter,)
    list_select_related = ("mailbox__user",)
    search_fields = ("subject", "sender")
    ordering = ("-id",)
    show_full_result_count = False  # a large table: no second COUNT over every message on each page
    show_facets = admin.ShowFacets.NEVER  # nor a COUNT per mailbox in the filter
    fields = ("mailbox", "subject", "sender", "date", "size_display", "uid", "arrived_at")
    readonly_fields = fields

    # The links to a message's contents appear only for staff who may read them.
    def get_list_display(self, request):
        if admin_views.can_read_content(request):
            return (*self.list_display, "contents")
        return self.list_display

    def get_fields(self, request, obj=None):
        if admin_views.can_read_content(request):
            return (*self.fields, "contents")
        return self.fields

    def get_readonly_fields(self, request, obj=None):
        return self.get_fields(request, obj)

    @admin.display(description="subject", ordering="subject")
    def subject_line(self, message):
        return message.subject or "(no subject)"

    @admin.display(description="size", ordering="size")
    def size_display(self, message):
        return f"{message.size} octets" if message.size < 1024 else f"{filesizeformat(message.size)} ({message.size} octets)"

    @admin.display(description="contents")
    def contents(self, message):
        return format_html_join(
            " · ", '<a href="{}">{}</a>',
            [
                (reverse("admin:popserver_message_text", args=[message.pk]), "text"),
                (reverse("admin:popserver_message_download", args=[message.pk]), "download"),
            ],
        )

    # Read-only: messages come in through delivery, never edited by hand.
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        extra_context = dict(extra_context or {})
        mailbox_id = request.GET.get(MailboxFilter.parameter_name, "")
        if mailbox_id.isdigit() and request.user.has_perm(admin_views.UPLOAD_PERMISSION):
            mailbox = Mailbox.objects.select_related("user").filter(pk=mailbox_id).first()
            if mailbox is not None:
                extra_context["upload_mailbox"] = mailbox
                extra_context["upload_url"] = reverse("admin:popserver_mailbox_upload", args=[mailbox.pk])
        return super().changelist_view(request, extra_context)

    def get_urls(self):
        def view(function):
            return self.admin_site.admin_view(lambda request, object_id: function(self, request, object_id))

        return [
            path("<path:object_id>/text/", view(admin_views.message_text_view), name="popserver_message_text"),
            path("<path:object_id>/download/", view(admin_views.message_download),
                 name="popserver_message_download"),
            *super().get_urls(),
        ]

    # Deleting: the bodies go through the body store; the confirmation page lists messages, not body rows.
    def get_deleted_objects(self, objs, request):
        selected = list(objs)
        perms_needed = set() if self.has_delete_permission(request) else {self.opts.verbose_name}
        summary = [format_html("Message: {} ({} octets)", message, message.size) for message in selected]
        return summary, {self.opts.verbose_name_plural: len(selected)}, perms_needed, []

    def delete_model(self, request, obj):
        delete_messages([obj.pk])

    def delete_queryset(self, request, queryset):
        delete_messages(list(queryset.values_list("pk", flat=True)))


from . import admin_security  # noqa: F401  (lock-outs, app passwords, audit: registers their admins)
