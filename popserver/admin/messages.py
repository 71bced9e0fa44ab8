"""The admin of messages: read-only rows (they arrive through delivery), their contents for staff with
``view_message_content``, deletion through the one delete path (bodies included)."""

from django.contrib import admin, messages
from django.db.models import Exists, OuterRef
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from popserver.admin import views as admin_views
from popserver.admin.mixins import USERNAME_LOOKUP, FitsTheScreen, when
from popserver.mailin.quota import format_octets
from popserver.models import Mailbox, Message
from popserver.storage.deletion import delete_messages
from popserver.storage.retention import restore_messages
from popserver.storage.maildrop import position_in_listing


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


class StateFilter(admin.SimpleListFilter):
    """Messages POP3 shows, or those a keep-deleted QUIT hid (restorable until ``popexpire`` purges them)."""

    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("deleted", "recently deleted"), ("all", "all")]

    def choices(self, changelist):
        yield {
            "selected": self.value() is None,
            "query_string": changelist.get_query_string(remove=[self.parameter_name]),
            "display": "in the mailbox",
        }
        for lookup, title in self.lookup_choices:
            yield {
                "selected": self.value() == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request, queryset):
        if self.value() == "deleted":
            return queryset.recently_deleted()
        if self.value() == "all":
            return queryset
        return queryset.visible()


@admin.register(Message)
class MessageAdmin(FitsTheScreen, admin_views.MessageContentViews, admin.ModelAdmin):
    """A message is named by its unique id (UIDL) and its position in a POP3 listing, as a client knows it;
    never by its database id."""

    list_display = ("subject_line", "sender_and_mailbox", "size_display", "arrived", "uid")
    list_filter = (StateFilter, MailboxFilter)
    actions = ("restore_messages",)
    list_select_related = ("mailbox__user",)
    search_fields = ("subject", "sender", "=uid")
    ordering = ("-id",)
    show_full_result_count = False  # a large table: no second COUNT over every message on each page
    show_facets = admin.ShowFacets.NEVER  # nor a COUNT per mailbox in the filter
    fields = ("mailbox", "subject", "sender", "date", "size_display", "uid", "position", "arrived_at")
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

    @admin.display(description="from, mailbox", ordering="mailbox__" + USERNAME_LOOKUP)
    def sender_and_mailbox(self, message):
        return format_html('{}<br><span class="quiet">in {}</span>', message.sender or "-", message.mailbox)

    @admin.display(description="arrived", ordering="id")
    def arrived(self, message):
        return when(message.arrived_at)

    @admin.display(description="size", ordering="size")
    def size_display(self, message):
        return format_octets(message.size)

    @admin.display(description="POP3 number")
    def position(self, message):
        number, total = position_in_listing(message)
        note = " (a quota warning from the server)" if message.server_notice else ""
        return f"{number} of {total}: the number a POP3 client logging in now would give it{note}"

    @admin.display(description="contents")
    def contents(self, message):
        return format_html_join(
            " · ",
            '<a href="{}">{}</a>',
            [
                (reverse("admin:popserver_message_text", args=[message.pk]), "text"),
                (reverse("admin:popserver_message_download", args=[message.pk]), "download"),
            ],
        )

    @admin.action(
        permissions=["restore_messages"],
        description="Restore the selected deleted messages (with their unique ids)",
    )
    def restore_messages(self, request, queryset):
        restored = restore_messages(list(queryset.recently_deleted().values_list("pk", flat=True)))
        self.message_user(request, f"Restored {restored} message(s).", messages.SUCCESS)

    def has_restore_messages_permission(self, request):
        return request.user.has_perm("popserver.delete_message")

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
        text, download = (
            self.admin_site.admin_view(self.text_view),
            self.admin_site.admin_view(self.download_view),
        )
        return [
            path("<path:object_id>/text/", text, name="popserver_message_text"),
            path("<path:object_id>/download/", download, name="popserver_message_download"),
            *super().get_urls(),
        ]

    # Deleting: the bodies go through the body store; the confirmation page lists messages, not body rows.
    def get_deleted_objects(self, objs, request):
        selected = list(objs)
        perms_needed = set() if self.has_delete_permission(request) else {self.opts.verbose_name}
        summary = [
            format_html("Message {} “{}” ({})", message.uid, message.subject, format_octets(message.size))
            for message in selected
        ]
        return summary, {self.opts.verbose_name_plural: len(selected)}, perms_needed, []

    def delete_model(self, request, obj):
        delete_messages([obj.pk])

    def delete_queryset(self, request, queryset):
        delete_messages(list(queryset.values_list("pk", flat=True)))
