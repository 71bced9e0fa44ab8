"""The admin: mailboxes (addresses, counts, the lock and who holds it, POP3 on/off) and their messages.

Counts and sizes on the mailbox list come from correlated subqueries in the page's one query, so the list costs
the same few queries for 30 mailboxes or 10,000. Messages are read-only here: they arrive through delivery
(or the upload page, which goes through delivery too); their contents need ``view_message_content``.
"""

import ipaddress
from datetime import timedelta

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Count, OuterRef, Prefetch, Subquery, Sum, Value
from django.db.models.functions import Coalesce
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.http import urlencode

from popserver.admin import views as admin_views
from popserver.admin.mixins import USERNAME_LOOKUP, FitsTheScreen, User, counted, user_search_fields, when
from popserver.conf import get_setting
from popserver.mailin import quota
from popserver.models import Address, Mailbox, Message
from popserver.storage.deletion import empty_mailbox
from popserver.storage.lock import LockRelease, lock_is_stale, release_stale_lock


def _describe_lock(mailbox: Mailbox) -> str:
    peer = f" for {mailbox.lock_peer}" if mailbox.lock_peer else ""
    return f"{mailbox.lock_host} pid {mailbox.lock_pid}{peer}"


def _short_host(host: str) -> str:
    """A node's host name without its domain ("pop1" for pop1.mail.example.org), an address as it is."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.split(".", 1)[0] or host
    return host


ADDRESSES_LISTED = 2  # in the list; the rest in the cell's title


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
class MailboxAdmin(FitsTheScreen, admin_views.MailboxUploadView, admin.ModelAdmin):
    inlines = (AddressInline,)
    # Fits 1280 px beside the navigation and the filters: the lock's details are in its cell's title and on
    # the change page.
    list_display = ("owner", "messages_link", "quota_short", "pop3", "lock_state", "last_login_display")
    list_filter = ("pop3_enabled", LockFilter)
    list_select_related = ("user",)
    raw_id_fields = ("user",)  # when the user model's admin cannot serve an autocomplete (see below)
    actions = ("release_stale_locks", "empty_mailboxes", "enable_pop3", "disable_pop3")
    readonly_fields = (
        "message_summary",
        "lock_holder",
        "locked_at",
        "lock_heartbeat",
        "last_login",
        "created_at",
        "uid_validity",
        "next_uid",
        "quota_usage",
        "recently_deleted",
    )
    fieldsets = (
        (None, {"fields": ("user", "pop3_enabled")}),
        ("Messages", {"fields": ("message_summary",)}),
        ("Quota", {"fields": ("quota_usage", "quota_bytes", "quota_messages")}),
        (
            "Deleted and retrieved mail",
            {"fields": ("recently_deleted", "keep_deleted_days", "expire_policy", "expire_days")},
        ),
        ("Lock", {"fields": ("lock_holder", "locked_at", "lock_heartbeat")}),
        ("History", {"fields": ("last_login", "created_at")}),
        (
            "Internals",
            {
                "fields": ("uid_validity", "next_uid"),
                "classes": ("collapse",),
                "description": "The parts of the unique ids (UIDL) the server gives new messages: the next "
                "counter value and the mailbox's uid validity. Set by the server, never edited here.",
            },
        ),
    )
    add_fieldsets = ((None, {"fields": ("user", "pop3_enabled")}),)

    def get_search_fields(self, request):
        return [*user_search_fields(), "addresses__address"]

    @admin.display(description="recently deleted")
    def recently_deleted(self, mailbox):
        """Messages a QUIT hid under the keep-deleted policy: restorable from the message list."""
        count = Message.objects.recently_deleted().filter(mailbox=mailbox).count()
        if not count:
            return "none"
        url = f"{_message_list_url(mailbox.pk)}&{urlencode({'state': 'deleted'})}"
        return format_html(
            '<a href="{}">{}</a> (select them there and restore)', url, counted(count, "message")
        )

    def get_fieldsets(self, request, obj=None):
        return self.fieldsets if obj is not None else self.add_fieldsets

    def get_autocomplete_fields(self, request):
        """The owner is chosen by typing a name, where the user model's admin can search (it is registered
        with search_fields, as Django's UserAdmin is); otherwise by id (raw_id_fields)."""
        user_admin = self.admin_site._registry.get(User)
        return ("user",) if user_admin is not None and user_admin.get_search_fields(request) else ()

    def get_queryset(self, request):
        messages_of = Message.objects.visible().filter(mailbox=OuterRef("pk")).order_by().values("mailbox")
        notices_of = messages_of.filter(server_notice=True)  # the server's own, not counted in the quota
        return (
            super()
            .get_queryset(request)
            .annotate(
                message_count=Coalesce(Subquery(messages_of.annotate(n=Count("pk")).values("n")), Value(0)),
                message_octets=Coalesce(Subquery(messages_of.annotate(s=Sum("size")).values("s")), Value(0)),
                notice_count=Coalesce(Subquery(notices_of.annotate(n=Count("pk")).values("n")), Value(0)),
                notice_octets=Coalesce(Subquery(notices_of.annotate(s=Sum("size")).values("s")), Value(0)),
            )
            .prefetch_related(Prefetch("addresses", queryset=Address.objects.order_by("address")))
        )

    # Columns and read-only fields -----------------------------------------------------------------------------
    @admin.display(description="owner and addresses", ordering=USERNAME_LOOKUP)
    def owner(self, mailbox):
        """The owner (the link to the mailbox), its addresses below it: the first ones, all in the title."""
        addresses = [address.address for address in mailbox.addresses.all()]
        more = len(addresses) - ADDRESSES_LISTED
        return format_html(
            '{}<br><span class="quiet" title="{}">{}{}</span>',
            str(mailbox.user),
            ", ".join(addresses),
            ", ".join(addresses[:ADDRESSES_LISTED]),
            f" and {more} more" if more > 0 else "",
        )

    @admin.display(description="POP3", boolean=True, ordering="pop3_enabled")
    def pop3(self, mailbox):
        return mailbox.pop3_enabled

    @admin.display(description="last login", ordering="last_login")
    def last_login_display(self, mailbox):
        return when(mailbox.last_login) if mailbox.last_login else "never"

    @admin.display(description="messages", ordering="message_count")
    def messages_link(self, mailbox):
        return format_html(
            '<a href="{}">{}</a>, {}',
            _message_list_url(mailbox.pk),
            mailbox.message_count,
            quota.format_octets(mailbox.message_octets),
        )

    def _quota_counts(self, mailbox) -> tuple[int, int]:
        return (
            mailbox.message_count - mailbox.notice_count,
            mailbox.message_octets - mailbox.notice_octets,
        )

    @admin.display(description="quota")
    def quota_short(self, mailbox):
        """Use against the fuller limit (both in the title): from the page's annotations, no query of its own."""
        applying = quota.mailbox_limits(mailbox)
        return format_html(
            '<span title="{}">{}</span>',
            quota.describe_usage(*self._quota_counts(mailbox), applying),
            quota.describe_usage(*self._quota_counts(mailbox), applying, short=True),
        )

    @admin.display(description="quota")
    def quota_usage(self, mailbox):
        return quota.describe_usage(*self._quota_counts(mailbox), quota.mailbox_limits(mailbox))

    @admin.display(description="lock", ordering="locked_at")
    def lock_state(self, mailbox):
        if not mailbox.lock_token:
            return "-"
        state = "stale" if lock_is_stale(mailbox) else "live"
        return format_html(
            '<span title="{}">{}<br><span class="quiet">{}</span></span>',
            f"{_describe_lock(mailbox)}, since {when(mailbox.locked_at)}, "
            f"last heartbeat {when(mailbox.lock_heartbeat)}",
            state,
            _short_host(mailbox.lock_host),
        )

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        if db_field.name == "quota_bytes":  # typed as 500M or 2G, not only in octets
            return quota.SizeField(
                required=False,
                label="Size quota",
                help_text=(
                    "All messages together, e.g. 500M or 2G (binary multiples) or octets. "
                    "Empty: the site default (POPSERVER_QUOTA_BYTES); 0: unlimited."
                ),
            )
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
            '{}, {} · <a href="{}">list them</a>',
            counted(mailbox.message_count, "message"),
            quota.format_octets(mailbox.message_octets),
            _message_list_url(mailbox.pk),
        )

    # Pages --------------------------------------------------------------------------------------------------
    def get_urls(self):
        upload = self.admin_site.admin_view(self.upload_view)
        return [
            path("<path:object_id>/upload/", upload, name="popserver_mailbox_upload"),
            *super().get_urls(),
        ]

    def save_model(self, request, obj, form, change):
        """Save only what the form changed: the counters and the lock fields belong to deliveries and
        sessions, which may have moved them since the page was loaded (a stale next_uid would make every
        later delivery collide)."""
        if change:
            obj.save(update_fields=[name for name in form.changed_data if name in form.fields])
        else:
            obj.save()

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
            format_html(
                "{}: {} ({})",
                self.opts.verbose_name.capitalize(),
                mailbox,
                counted(mailbox.message_count, "message"),
            )
            for mailbox in mailboxes
        ]
        model_count = {
            self.opts.verbose_name_plural: len(mailboxes),
            Message._meta.verbose_name_plural: message_count,
        }
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
            # "Mailbox alice: ...": the admin capitalises a message's first letter, never a name.
            if outcome is LockRelease.RELEASED:
                self.log_change(request, mailbox, f"Released the stale lock of {_describe_lock(seen)}.")
                self.message_user(
                    request,
                    f"Mailbox {mailbox}: released the stale lock of {_describe_lock(seen)}.",
                    messages.SUCCESS,
                )
            elif outcome is LockRelease.LIVE:
                self.message_user(
                    request,
                    f"Mailbox {mailbox}: not released: the lock is held by a live session "
                    f"({_describe_lock(seen)}, since {when(seen.locked_at)}). It is released when that "
                    "session ends.",
                    messages.ERROR,
                )
            else:
                self.message_user(request, f"Mailbox {mailbox}: was not locked.", messages.INFO)

    @admin.action(
        description="Empty the selected mailboxes (delete all their messages)", permissions=["empty"]
    )
    def empty_mailboxes(self, request, queryset):
        if request.POST.get("post") == "yes":
            for mailbox in queryset:
                count, octets = empty_mailbox(mailbox.pk)
                self.log_change(
                    request, mailbox, f"Emptied: deleted {counted(count, 'message')} ({octets} octets)."
                )
                self.message_user(
                    request,
                    f"Mailbox {mailbox}: deleted {counted(count, 'message')} ({quota.format_octets(octets)}).",
                    messages.SUCCESS,
                )
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
        count = Mailbox.objects.filter(pk__in=[mailbox.pk for mailbox in changed]).update(
            pop3_enabled=enabled
        )
        self.message_user(
            request,
            f"POP3 turned {'on' if enabled else 'off'} for {counted(count, 'mailbox', 'mailboxes')}.",
            messages.SUCCESS,
        )

    @admin.action(description="Turn POP3 on for the selected mailboxes", permissions=["change"])
    def enable_pop3(self, request, queryset):
        self._set_pop3(request, queryset, True)

    @admin.action(description="Turn POP3 off for the selected mailboxes", permissions=["change"])
    def disable_pop3(self, request, queryset):
        self._set_pop3(request, queryset, False)


# Messages -----------------------------------------------------------------------------------------------------
