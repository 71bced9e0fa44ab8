"""``popserver.mailin.email_backend.LocalDeliveryBackend``: Django's send_mail() into local mailboxes, read back with poplib
from a live server; Bcc stays out of the headers; other recipients go to the fallback backend or are refused
by name; a full mailbox refuses the message for every local recipient."""

import email
import smtplib

import pytest
from django.core import mail
from django.core.mail import EmailMessage, get_connection, send_mail
from django.test import override_settings

from popserver.storage.bodies import get_body_store
from popserver.exceptions import QuotaExceeded, RecipientsRefused
from popserver.models import Message

# Part of the delivery suite: runs against both body stores (issue 21).
pytestmark = pytest.mark.usefixtures("body_store")

BACKEND = "popserver.mailin.email_backend.LocalDeliveryBackend"
LOCMEM = "django.core.mail.backends.locmem.EmailBackend"


@pytest.fixture
def local_backend(settings):
    settings.EMAIL_BACKEND = BACKEND
    settings.POPSERVER_MAIL_FALLBACK_BACKEND = None


def stored(message: Message) -> bytes:
    return b"".join(get_body_store().read_chunks(message.pk))


@pytest.mark.live
def test_send_mail_then_poplib_retrieves_it(local_backend, pop3_server, make_mailbox):
    make_mailbox("alice", email="alice@example.org")
    sent = send_mail(
        "Hello from Django", "It works.\nSecond line.", "site@example.org", ["alice@example.org"]
    )
    assert sent == 1
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    assert client.stat()[0] == 1
    _, lines, _ = client.retr(1)
    client.quit()
    parsed = email.message_from_bytes(b"\r\n".join(lines))
    assert parsed["Subject"] == "Hello from Django"
    assert parsed["From"] == "site@example.org" and parsed["To"] == "alice@example.org"
    assert parsed["Message-ID"] and parsed["Date"]
    assert parsed.get_payload() == "It works.\r\nSecond line."


@pytest.mark.django_db
def test_the_bytes_are_what_django_would_send_over_smtp_without_bcc(local_backend, make_mailbox):
    alice = make_mailbox("alice", email="alice@example.org")
    bob = make_mailbox("bob", email="bob@example.org")
    message = EmailMessage(
        "Secret list",
        "body",
        "site@example.org",
        to=["alice@example.org"],
        bcc=["bob@example.org"],
        headers={"Message-ID": "<fixed@example.org>", "Date": "Thu, 26 Nov 2026 10:00:00 +0000"},
    )
    assert message.send() == 1
    expected = message.message().as_bytes(linesep="\r\n")
    for mailbox in (alice, bob):
        assert stored(Message.objects.get(mailbox=mailbox)) == expected
    assert b"bob@example.org" not in expected and b"Bcc" not in expected


@pytest.mark.django_db
def test_one_copy_per_mailbox_and_user_plus_detail(local_backend, make_mailbox):
    alice = make_mailbox("alice", email="alice@example.org")
    sent = send_mail(
        "s", "b", "site@example.org", ["alice@example.org", "Alice <ALICE+news@example.org>", "alice"]
    )
    assert sent == 1
    assert Message.objects.filter(mailbox=alice).count() == 1


@pytest.mark.django_db
def test_without_a_fallback_remote_recipients_are_refused_by_name(local_backend, make_mailbox):
    alice = make_mailbox("alice", email="alice@example.org")
    with pytest.raises(RecipientsRefused) as refused:
        send_mail(
            "s", "b", "site@example.org", ["alice@example.org", "carol@example.net", "dave@example.com"]
        )
    assert "carol@example.net" in str(refused.value) and "dave@example.com" in str(refused.value)
    assert "POPSERVER_MAIL_FALLBACK_BACKEND" in str(refused.value)
    assert set(refused.value.recipients) == {"carol@example.net", "dave@example.com"}
    assert isinstance(refused.value, smtplib.SMTPRecipientsRefused)  # what send_mail() callers catch
    assert not Message.objects.filter(mailbox=alice).exists()  # nobody got it
    assert send_mail("s", "b", "site@example.org", ["carol@example.net"], fail_silently=True) == 0


@pytest.mark.django_db
def test_remote_recipients_go_to_the_fallback_with_the_same_headers(local_backend, settings, make_mailbox):
    settings.POPSERVER_MAIL_FALLBACK_BACKEND = LOCMEM
    alice = make_mailbox("alice", email="alice@example.org")
    message = EmailMessage(
        "Mixed",
        "body",
        "site@example.org",
        to=["alice@example.org", "carol@example.net"],
        cc=["dave@example.com"],
        bcc=["erin@example.com", "alice+bcc@example.org"],
    )
    with get_connection() as connection:
        assert connection.send_messages([message]) == 1
    (outgoing,) = mail.outbox
    assert outgoing.recipients() == ["carol@example.net", "dave@example.com", "erin@example.com"]
    local = email.message_from_bytes(stored(Message.objects.get(mailbox=alice)))
    remote = outgoing.message()
    for name in ("To", "Cc", "Date", "Message-ID", "Subject", "From"):
        assert remote[name] == local[name], name
    assert local["To"] == "alice@example.org, carol@example.net" and local["Cc"] == "dave@example.com"
    assert (
        "Bcc" not in local and message.recipients()[-1] == "alice+bcc@example.org"
    )  # the original unchanged


@pytest.mark.django_db
def test_only_remote_recipients_go_to_the_fallback_unchanged(local_backend, settings):
    settings.POPSERVER_MAIL_FALLBACK_BACKEND = LOCMEM
    assert send_mail("s", "b", "site@example.org", ["carol@example.net"]) == 1
    assert mail.outbox[0].to == ["carol@example.net"]
    assert not Message.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("permanent,code", [(False, 452), (True, 552)])
def test_a_full_mailbox_refuses_it_for_every_local_recipient(
    local_backend, settings, make_mailbox, permanent, code
):
    settings.POPSERVER_QUOTA_EXCEEDED_PERMANENT = permanent
    alice = make_mailbox("alice", email="alice@example.org")
    bob = make_mailbox("bob", email="bob@example.org", quota_messages=0)
    carol = make_mailbox("carol", email="carol@example.org", quota_messages=1)
    send_mail("first", "b", "site@example.org", ["carol@example.org"])
    with pytest.raises(RecipientsRefused) as refused:
        send_mail(
            "second", "b", "site@example.org", ["alice@example.org", "bob@example.org", "carol@example.org"]
        )
    assert list(refused.value.recipients) == ["carol@example.org"]
    assert refused.value.recipients["carol@example.org"][0] == code
    assert "mailbox is full" in str(refused.value)
    assert isinstance(refused.value.__cause__, QuotaExceeded)
    # all or nothing: alice and bob (unlimited) did not get it either, so sending again delivers once
    # (carol's first message filled her quota: the server's warning beside it is not counted)
    assert [Message.objects.filter(mailbox=m, server_notice=False).count() for m in (alice, bob, carol)] == [
        0,
        0,
        1,
    ]
    assert (
        send_mail(
            "second", "b", "site@example.org", ["alice@example.org", "carol@example.org"], fail_silently=True
        )
        == 0
    )


@pytest.mark.django_db
def test_a_message_over_the_size_limit_is_refused(local_backend, settings, make_mailbox):
    settings.POPSERVER_MAX_MESSAGE_SIZE = 100
    make_mailbox("alice", email="alice@example.org")
    with pytest.raises(RecipientsRefused, match="over the limit") as refused:
        send_mail("big", "x" * 200, "site@example.org", ["alice@example.org"])
    assert refused.value.recipients["alice@example.org"][0] == 552


@pytest.mark.django_db
def test_the_delivery_signal_is_sent_after_the_commit(
    local_backend, make_mailbox, django_capture_on_commit_callbacks
):
    from popserver import signals

    make_mailbox("alice", email="alice@example.org")
    received = []

    def receiver(**kwargs):
        received.append(kwargs["message"].subject)

    signals.message_delivered.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            send_mail("signalled", "b", "site@example.org", ["alice@example.org"])
    finally:
        signals.message_delivered.disconnect(receiver)
    assert received == ["signalled"]


@pytest.mark.django_db
def test_no_recipients_no_message(local_backend):
    assert EmailMessage("s", "b", "site@example.org", to=[]).send() == 0
    assert get_connection().send_messages([]) == 0


@override_settings(POPSERVER_MAIL_FALLBACK_BACKEND="no.such.Backend")
def test_a_fallback_that_cannot_be_imported_is_a_check_error():
    from django.core.checks import run_checks

    assert "popserver.E006" in {m.id for m in run_checks()}
