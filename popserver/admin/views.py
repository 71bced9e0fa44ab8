"""The admin's pages that read or add message bytes: the raw download, the safe text view and the .eml upload.

Reading a message's contents needs ``popserver.view_message_content`` besides the view permission; uploading
needs ``popserver.add_message``. The text view never renders a message's HTML: every part is shown as escaped
text or listed as an attachment, under a Content-Security-Policy that forbids scripts and remote content.
"""

from __future__ import annotations

import codecs
import logging
import re
from dataclasses import dataclass, field
from email import policy
from email.errors import HeaderParseError
from email.header import decode_header
from email.message import Message as EmailMessage
from email.parser import BytesParser
from itertools import chain

from django import forms
from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponse, HttpResponseRedirect, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import urlencode

from popserver.conf import get_setting
from popserver.exceptions import BodyUnavailable, DeliveryError, MessageExpunged, MessageTooLarge
from popserver.mailin.delivery import deliver
from popserver.mailin.quota import format_octets
from popserver.models import Mailbox, Message
from popserver.storage.bodies import get_body_store
from popserver.storage.maildrop import position_in_listing

logger = logging.getLogger("popserver.admin")

CONTENT_PERMISSION = "popserver.view_message_content"
UPLOAD_PERMISSION = "popserver.add_message"

# The text view: no scripts, no remote anything, no plugins, no forms; the admin's own stylesheets and icons
# and inline styles only. `sandbox` makes the page's origin opaque even if a script slipped in (downloads stay
# allowed for its "raw" link).
TEXT_VIEW_CSP = (
    "default-src 'none'; style-src 'self' 'unsafe-inline'; img-src 'self'; form-action 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; sandbox allow-downloads"
)
DOWNLOAD_CSP = "default-src 'none'; sandbox"

# The text view parses at most this many octets of a message; the raw download always has all of them.
TEXT_VIEW_MAX_OCTETS = 4 * 1024 * 1024
# ...and shows at most this many characters of one text part.
TEXT_PART_MAX_CHARS = 1_000_000


def can_read_content(request) -> bool:
    return request.user.has_perm(CONTENT_PERMISSION)


def _content_headers(response, csp: str):
    response["Content-Security-Policy"] = csp
    response["X-Content-Type-Options"] = "nosniff"
    response["Referrer-Policy"] = "no-referrer"
    response["Cache-Control"] = "private, no-store"
    return response


class MessageContentViews:
    """The message admin's pages that show a message's bytes: the raw download and the text view."""

    def readable_message(self, request, object_id) -> Message:
        message = get_object_or_404(self.get_queryset(request), pk=object_id)
        if not (self.has_view_permission(request, message) and can_read_content(request)):
            raise PermissionDenied
        return message

    def download_view(self, request, object_id):
        return message_download(self.readable_message(request, object_id))

    def text_view(self, request, object_id):
        message = self.readable_message(request, object_id)
        context = {**self.admin_site.each_context(request), "opts": self.opts}
        return message_text_view(request, message, context)


# The raw download ---------------------------------------------------------------------------------------------
def message_download(message: Message):
    """The message's bytes as the server presents them, streamed from the body store chunk by chunk."""
    chunks = get_body_store().read_chunks(message)
    try:
        first = next(chunks)  # read before the status line goes out: a message removed meanwhile is a 404
    except (MessageExpunged, StopIteration):
        raise Http404("That message has been removed.") from None
    except BodyUnavailable as exc:
        return body_unavailable(exc)
    response = StreamingHttpResponse(chain([first], chunks), content_type="message/rfc822")
    # Named by its unique id, as a POP3 client knows it (an imported one may hold any printable character).
    filename = re.sub(r"[^A-Za-z0-9._-]", "_", message.uid)
    response["Content-Disposition"] = f'attachment; filename="message-{filename}.eml"'
    return _content_headers(response, DOWNLOAD_CSP)


def body_unavailable(exc: BodyUnavailable) -> HttpResponse:
    """A body in a storage that cannot be read now (its object missing, the storage down): 503, one log line."""
    logger.error("admin: %s", exc)
    return HttpResponse(
        "This message's body cannot be read now; see the server log.", status=503, content_type="text/plain"
    )


# The text view ------------------------------------------------------------------------------------------------
# C0 controls (but tab and newline) and DEL shown as their visible Unicode "control pictures" (U+2400...).
_CONTROL_PICTURES = {code: 0x2400 + code for code in range(0x20) if code not in (0x09, 0x0A)}
_CONTROL_PICTURES[0x7F] = 0x2421


def displayable(text: str) -> str:
    """Text safe to show: undecodable bytes (surrogate escapes) as U+FFFD, line ends as LF, controls visible."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text.replace("\r\n", "\n").replace("\r", "\n").translate(_CONTROL_PICTURES)


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Decode with the declared charset (UTF-8 if none or unknown); bytes that do not decode become U+FFFD."""
    try:
        codecs.lookup(charset or "utf-8")
        return data.decode(charset or "utf-8", errors="replace")
    except (LookupError, ValueError):  # unknown charset, a bytes-to-bytes codec, or one without "replace"
        return data.decode("utf-8", errors="replace")


def decode_header_value(raw: str) -> str:
    """An unfolded header value with its RFC 2047 encoded words decoded; raw 8-bit bytes read as UTF-8."""
    raw = " ".join(raw.split("\r\n")).replace("\n", " ")
    try:
        parts = decode_header(raw)
    except (HeaderParseError, ValueError):
        return displayable(raw)
    text = []
    for value, charset in parts:
        if isinstance(value, str):
            text.append(value)
        elif charset is None:  # the parts between encoded words, as decode_header hands them back
            text.append(value.decode("raw-unicode-escape"))
        else:
            text.append(decode_bytes(value, charset))
    return displayable("".join(text))


@dataclass
class TextPart:
    label: str
    text: str
    truncated: bool = False


@dataclass
class OtherPart:
    content_type: str
    filename: str
    size: int
    reason: str


@dataclass
class MessageText:
    headers: list[tuple[str, str]] = field(default_factory=list)
    texts: list[TextPart] = field(default_factory=list)
    others: list[OtherPart] = field(default_factory=list)


def _payload_bytes(part: EmailMessage) -> bytes:
    payload = part.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def message_text(data: bytes) -> MessageText:
    """Headers, the text/plain parts as text and every other part as an entry with its size. Nothing here
    renders or follows anything the message says: HTML parts are only listed."""
    parsed = BytesParser(policy=policy.compat32).parsebytes(data)  # the most lenient parser
    result = MessageText(
        headers=[(displayable(name), decode_header_value(value)) for name, value in parsed.raw_items()]
    )
    leaves = [part for part in parsed.walk() if not part.is_multipart()]
    for number, part in enumerate(leaves, start=1):
        content_type = displayable(part.get_content_type())
        filename = displayable(decode_header_value(part.get_filename() or ""))
        payload = _payload_bytes(part)
        if content_type == "text/plain" and part.get_content_disposition() != "attachment":
            text = displayable(decode_bytes(payload, part.get_content_charset()))
            label = f"Part {number}" if len(leaves) > 1 else ""
            result.texts.append(TextPart(label, text[:TEXT_PART_MAX_CHARS], len(text) > TEXT_PART_MAX_CHARS))
        else:
            reason = "HTML is never rendered here" if content_type == "text/html" else "attachment"
            result.others.append(OtherPart(content_type, filename, len(payload), reason))
    return result


def read_head(message_id: int, limit: int) -> bytes:
    """The first ``limit`` octets of a message, read chunk by chunk."""
    data = bytearray()
    for chunk in get_body_store().read_chunks(message_id):
        data += chunk
        if len(data) >= limit:
            break
    return bytes(data[:limit])


def message_text_view(request, message: Message, admin_context: dict | None = None):
    """The text view, in the admin's header and breadcrumbs (``admin_context``: the admin site's
    ``each_context``) but without its scripts: the CSP forbids them, the page needs none."""
    try:
        data = read_head(message.pk, TEXT_VIEW_MAX_OCTETS)
    except MessageExpunged:
        raise Http404("That message has been removed.") from None
    except BodyUnavailable as exc:
        return body_unavailable(exc)
    number, total = position_in_listing(message)
    context = {
        **(admin_context or {}),
        "is_nav_sidebar_enabled": False,  # its script would be refused by the CSP
        "title": message.subject or f"Message {message.uid}",
        "subtitle": None,
        "message": message,
        "number": number,
        "total": total,
        "parsed": message_text(data),
        "partial": message.size > TEXT_VIEW_MAX_OCTETS,
        "shown_octets": TEXT_VIEW_MAX_OCTETS,
        "change_url": reverse("admin:popserver_message_change", args=[message.pk]),
        "download_url": reverse("admin:popserver_message_download", args=[message.pk]),
    }
    response = TemplateResponse(request, "admin/popserver/message/text.html", context)
    return _content_headers(response, TEXT_VIEW_CSP)


# The upload ---------------------------------------------------------------------------------------------------
class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """A file field that takes several files (Django's documented pattern)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": ".eml,message/rfc822"}))
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        one = super().clean
        if isinstance(data, list | tuple) and data:
            return [one(item, initial) for item in data]
        return [one(data or None, initial)]  # no file at all: "This field is required."


class UploadForm(forms.Form):
    files = MultipleFileField(
        label="Messages",
        allow_empty_file=True,  # an empty file gets its own error from delivery
        help_text="One or more .eml files (RFC 5322 messages), each delivered as it would arrive by mail.",
    )


def deliver_file(mailbox: Mailbox, upload, limit: int) -> Message:
    """Deliver one uploaded file into the mailbox through the delivery API (and its checks). The owner's
    login name is the recipient: delivery tries login names before addresses."""
    if upload.size > limit:  # refused before it is read into memory
        raise MessageTooLarge(
            f"file of {format_octets(upload.size)} is over the limit of {format_octets(limit)}"
        )
    return deliver(mailbox.user.get_username(), upload.read())


class MailboxUploadView:
    """The mailbox admin's upload page."""

    def upload_view(self, request, object_id):
        """Upload .eml files into one mailbox; a message per file says what became of it."""
        mailbox = get_object_or_404(Mailbox.objects.select_related("user"), pk=object_id)
        if not (
            self.has_view_or_change_permission(request, mailbox) and request.user.has_perm(UPLOAD_PERMISSION)
        ):
            raise PermissionDenied
        limit = get_setting("MAX_MESSAGE_SIZE")
        form = UploadForm(request.POST, request.FILES) if request.method == "POST" else UploadForm()
        if request.method == "POST" and form.is_valid():
            delivered = 0
            for upload in form.cleaned_data["files"]:
                name = upload.name
                try:
                    message = deliver_file(mailbox, upload, limit)
                except DeliveryError as error:
                    reason = str(error) or type(error).__doc__
                    messages.error(request, f"File {name}: not delivered: {reason}.")
                    continue
                delivered += 1
                self.admin_site.get_model_admin(Message).log_addition(
                    request, message, f"Uploaded from {name}."
                )
                number, total = position_in_listing(message)
                # "File x.eml: ...": the admin capitalises a message's first letter, never a name.
                messages.success(
                    request,
                    f"File {name}: delivered as message {number} of {total} in {mailbox} (unique id "
                    f"{message.uid}, {format_octets(message.size)}), subject “{message.subject or '(none)'}”.",
                )
            if delivered:
                changelist = reverse("admin:popserver_message_changelist")
                return HttpResponseRedirect(f"{changelist}?{urlencode({'mailbox': mailbox.pk})}")
            return HttpResponseRedirect(request.get_full_path())
        context = {
            **self.admin_site.each_context(request),
            "title": f"Upload messages into {mailbox}",
            "subtitle": None,
            "opts": self.opts,
            "original": mailbox,
            "form": form,
            "limit": limit,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/popserver/mailbox/upload.html", context)
