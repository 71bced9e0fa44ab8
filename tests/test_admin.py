"""The admin with the Django test client: every page and action, the permissions, the query count of the
mailbox list, the raw download, the safe text view and the upload."""

import os
import poplib
import re
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext, override_settings
from django.urls import reverse
from django.utils import timezone

from popserver.storage.bodies import get_body_store
from popserver.mailin.delivery import deliver
from popserver.exceptions import MessageExpunged
from popserver.storage.maildrop import open_maildrop
from popserver.models import Mailbox, Message, MessageChunk
from tests.conftest import CORPUS_SIZES, corpus_files

pytestmark = pytest.mark.django_db

MAILBOX_LIST = reverse("admin:popserver_mailbox_changelist")
MESSAGE_LIST = reverse("admin:popserver_message_changelist")

SCRIPT_MESSAGE = (
    b"From: Mallory <mallory@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: <script>document.title='pwned'</script> greetings\r\n"
    b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"X-Raw: caf\xe9 \xff\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hello <script>document.title='pwned'</script> & bad bytes: \xff\xfe end\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b'<html><body><img src="http://203.0.113.9/track.png">'
    b"<script>document.body.insertAdjacentHTML('beforeend', '<p id=pwned>pwned</p>')</script></body></html>\r\n"
    b"--b1--\r\n"
)


def presented(raw: bytes) -> bytes:
    """The form a message is stored and served in (see the corpus README): no mbox "From " line, bare LF as
    CRLF, every other byte unchanged."""
    if raw.startswith(b"From "):
        raw = raw.split(b"\n", 1)[1]
    return re.sub(rb"(?<!\r)\n", b"\r\n", raw)


def simple_message(subject: str, body: str = "Hello.", sender: str = "Bob <bob@example.net>") -> bytes:
    return (
        f"From: {sender}\r\nTo: alice@example.org\r\nSubject: {subject}\r\n"
        f"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n\r\n{body}\r\n"
    ).encode()


@pytest.fixture
def superuser_client(db):
    user = get_user_model().objects.create_superuser("root", "root@example.org", "root-password")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def staff_client(db):
    """staff_client(*codenames) -> a client logged in as staff with exactly these popserver permissions."""
    made = []

    def make(*codenames: str) -> Client:
        user = get_user_model().objects.create_user(f"staff{len(made)}", password="pw", is_staff=True)
        permissions = list(
            Permission.objects.filter(content_type__app_label="popserver", codename__in=codenames)
        )
        assert len(permissions) == len(codenames), codenames
        user.user_permissions.add(*permissions)
        client = Client()
        client.force_login(user)
        made.append(user)
        return client

    return make


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", email="alice@example.org")
    mailbox.user.email = "alice.smith@example.com"
    mailbox.user.save()
    return mailbox


def lock(mailbox: Mailbox, *, host: str, pid: int, heartbeat_age: float = 0, peer: str = "192.0.2.7:40000"):
    now = timezone.now()
    Mailbox.objects.filter(pk=mailbox.pk).update(
        lock_token="t" * 32,
        lock_host=host,
        lock_pid=pid,
        lock_instance="i" * 32,
        lock_peer=peer,
        locked_at=now - timedelta(seconds=heartbeat_age + 60),
        lock_heartbeat=now - timedelta(seconds=heartbeat_age),
    )


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def post_action(client: Client, action: str, *mailboxes: Mailbox, **extra):
    data = {"action": action, "_selected_action": [m.pk for m in mailboxes], **extra}
    return client.post(MAILBOX_LIST, data, follow=True)


def texts(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# The mailbox list -----------------------------------------------------------------------------------------
def test_mailbox_list_shows_counts_sizes_addresses_and_lock(superuser_client, alice, make_mailbox):
    deliver("alice", simple_message("one"))
    deliver("alice", simple_message("two"))
    make_mailbox("bob", email="bob@example.org", pop3_enabled=False)
    lock(alice, host="mx9.example.org", pid=4242)
    response = superuser_client.get(MAILBOX_LIST)
    assert response.status_code == 200
    rows = {str(row.user): row for row in response.context["cl"].result_list}
    assert rows["alice"].message_count == 2
    assert rows["alice"].message_octets == sum(
        Message.objects.filter(mailbox=alice).values_list("size", flat=True)
    )
    assert rows["bob"].message_count == 0 and rows["bob"].message_octets == 0
    html = response.content.decode()
    assert "alice@example.org" in html and "bob@example.org" in html
    # the lock: live, its host in the cell, its details in the title
    assert re.search(r'title="mx9\.example\.org pid 4242 for 192\.0\.2\.7:40000, since [^"]+">live<br>', html)
    assert '<span class="quiet">mx9</span>' in html  # the node without its domain: the list fits 1280 px


def changelist_queries(client: Client, query: str = "") -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(MAILBOX_LIST + query)
    assert response.status_code == 200
    return len(captured)


def test_mailbox_list_costs_the_same_queries_for_1_and_30_mailboxes(superuser_client, make_mailbox):
    def add(index: int) -> None:
        mailbox = make_mailbox(f"user{index:02}", email=f"user{index:02}@example.org")
        deliver(f"user{index:02}", simple_message(f"hello {index}"))
        if index % 3 == 0:
            lock(mailbox, host="mx9.example.org", pid=4000 + index)

    add(0)
    superuser_client.get(MAILBOX_LIST)  # the first request loads the session and content types
    one = changelist_queries(superuser_client)
    for index in range(1, 30):
        add(index)
    thirty = changelist_queries(superuser_client)
    assert thirty == one
    assert one <= 6  # session, user, two counts, the page's one annotated query, the addresses
    # Sorted by message count and by size, and searched: still no query per row.
    assert changelist_queries(superuser_client, "?o=3") == one
    assert changelist_queries(superuser_client, "?o=-4") == one


@pytest.mark.parametrize("term", ["alice", "ALICE.SMITH@example", "alice@example.org"])
def test_mailbox_search_by_owner_email_and_address(superuser_client, alice, make_mailbox, term):
    make_mailbox("bob", email="bob@example.org")
    Mailbox.objects.get(user__username="bob").addresses.create(address="bob-two@example.org")
    response = superuser_client.get(MAILBOX_LIST, {"q": term})
    assert [m.pk for m in response.context["cl"].result_list] == [alice.pk]
    # An owner with two matching addresses is listed once, with its counts right.
    response = superuser_client.get(MAILBOX_LIST, {"q": "bob"})
    (bob,) = response.context["cl"].result_list
    assert bob.message_count == 0


def test_mailbox_filters(superuser_client, make_mailbox):
    free = make_mailbox("free")
    off = make_mailbox("off", pop3_enabled=False)
    live = make_mailbox("live")
    old = make_mailbox("old")
    lock(live, host="mx9.example.org", pid=1)
    lock(old, host="mx9.example.org", pid=1, heartbeat_age=3600)

    def listed(**query) -> set[int]:
        response = superuser_client.get(MAILBOX_LIST, query)
        assert response.status_code == 200
        return {m.pk for m in response.context["cl"].result_list}

    assert listed(pop3_enabled__exact="0") == {off.pk}
    assert listed(pop3_enabled__exact="1") == {free.pk, live.pk, old.pk}
    assert listed(locked="yes") == {live.pk, old.pk}
    assert listed(locked="no") == {free.pk, off.pk}
    assert listed(locked="old") == {old.pk}


# The mailbox pages ----------------------------------------------------------------------------------------
def test_mailbox_change_page_shows_lock_messages_and_upload(superuser_client, alice):
    deliver("alice", simple_message("one"))
    lock(alice, host="mx9.example.org", pid=77, peer="198.51.100.4:1234")
    Mailbox.objects.filter(pk=alice.pk).update(last_login=timezone.now())
    response = superuser_client.get(reverse("admin:popserver_mailbox_change", args=[alice.pk]))
    assert response.status_code == 200
    html = response.content.decode()
    assert "mx9.example.org pid 77 for 198.51.100.4:1234" in html
    assert "1 message, " in html
    assert reverse("admin:popserver_mailbox_upload", args=[alice.pk]) in html
    assert "alice@example.org" in html  # the address inline


def test_mailbox_page_chooses_the_owner_by_name_and_keeps_internals_out_of_the_form(superuser_client, alice):
    html = superuser_client.get(reverse("admin:popserver_mailbox_change", args=[alice.pk])).content.decode()
    # the owner: an autocomplete over the user admin's search, not a raw id box
    assert re.search(r'<select name="user"[^>]*class="admin-autocomplete', html)
    assert 'data-field-name="user"' in html and "vForeignKeyRawIdAdminField" not in html
    # the unique-id counters: read-only, in a collapsed section of their own
    assert re.search(r"<details[^>]*>\s*<summary>\s*<h2[^>]*>\s*Internals", html)
    assert 'name="next_uid"' not in html and 'name="uid_validity"' not in html
    assert html.index(f"{alice.uid_validity}") > html.index("Internals")


def test_mailbox_owner_by_id_when_the_user_admin_cannot_search(superuser_client, alice):
    from django.contrib import admin

    user_model = get_user_model()
    user_admin = admin.site._registry.pop(user_model)
    try:
        html = superuser_client.get(reverse("admin:popserver_mailbox_add")).content.decode()
    finally:
        admin.site._registry[user_model] = user_admin
    assert re.search(r'<input type="text" name="user"', html) and "admin-autocomplete" not in html


def test_mailbox_change_form_edits_pop3_and_addresses(superuser_client, alice):
    address = alice.addresses.get()
    url = reverse("admin:popserver_mailbox_change", args=[alice.pk])
    data = {
        "user": alice.user.pk,
        # pop3_enabled unchecked: off
        "addresses-TOTAL_FORMS": "2",
        "addresses-INITIAL_FORMS": "1",
        "addresses-MIN_NUM_FORMS": "0",
        "addresses-MAX_NUM_FORMS": "1000",
        "addresses-0-id": address.pk,
        "addresses-0-mailbox": alice.pk,
        "addresses-0-address": "alice@example.org",
        "addresses-1-mailbox": alice.pk,
        "addresses-1-address": "a.smith@example.org",
        "_save": "Save",
    }
    response = superuser_client.post(url, data)
    assert response.status_code == 302, response.context["errors"] if response.context else response
    alice.refresh_from_db()
    assert alice.pop3_enabled is False
    assert sorted(alice.addresses.values_list("address", flat=True)) == [
        "a.smith@example.org",
        "alice@example.org",
    ]


def test_mailbox_add_page(superuser_client):
    user = get_user_model().objects.create_user("carol")
    response = superuser_client.get(reverse("admin:popserver_mailbox_add"))
    assert response.status_code == 200
    response = superuser_client.post(
        reverse("admin:popserver_mailbox_add"),
        {
            "user": user.pk,
            "pop3_enabled": "on",
            "addresses-TOTAL_FORMS": "1",
            "addresses-INITIAL_FORMS": "0",
            "addresses-MIN_NUM_FORMS": "0",
            "addresses-MAX_NUM_FORMS": "1000",
            "addresses-0-address": "carol@example.org",
        },
    )
    assert response.status_code == 302
    assert Mailbox.objects.get(user=user).addresses.get().address == "carol@example.org"


def test_delete_mailbox_deletes_its_messages_and_bodies(superuser_client, alice):
    message = deliver("alice", simple_message("one"))
    url = reverse("admin:popserver_mailbox_delete", args=[alice.pk])
    response = superuser_client.get(url)
    assert response.status_code == 200
    assert "alice (1 message)" in response.content.decode()
    response = superuser_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    assert not Mailbox.objects.filter(pk=alice.pk).exists()
    assert not MessageChunk.objects.filter(message_id=message.pk).exists()


# Actions --------------------------------------------------------------------------------------------------
def test_release_a_stale_lock_of_a_dead_process_on_this_host(superuser_client, alice):
    lock(alice, host=socket.gethostname()[:255], pid=dead_pid())
    response = post_action(superuser_client, "release_stale_locks", alice)
    assert any("released the stale lock" in text for text in texts(response))
    alice.refresh_from_db()
    assert not alice.lock_token and alice.lock_host == "" and alice.locked_at is None
    assert LogEntry.objects.filter(object_id=str(alice.pk), change_message__contains="stale lock").exists()


def test_release_a_stale_lock_with_an_old_heartbeat(superuser_client, alice):
    lock(alice, host="elsewhere.example.org", pid=123, heartbeat_age=3600)
    response = post_action(superuser_client, "release_stale_locks", alice)
    assert texts(response) == [
        "Mailbox alice: released the stale lock of elsewhere.example.org pid 123 for 192.0.2.7:40000."
    ]
    # the admin capitalises a message's first letter: the owner's name stays as written
    assert '<li class="success">Mailbox alice: released' in response.content.decode()
    alice.refresh_from_db()
    assert not alice.lock_token


def test_release_refuses_a_lock_held_by_a_live_session(superuser_client, alice, make_mailbox):
    # A live session of this very process (the lock's token is in its registry of live locks)...
    maildrop = open_maildrop(alice.pk, peer="203.0.113.5:5000")
    # ...and one on another host whose heartbeat is fresh.
    bob = make_mailbox("bob")
    lock(bob, host="elsewhere.example.org", pid=123)
    try:
        response = post_action(superuser_client, "release_stale_locks", alice, bob)
        messages_ = texts(response)
        assert len(messages_) == 2
        assert all("not released: the lock is held by a live session" in text for text in messages_)
        assert any("203.0.113.5:5000" in text for text in messages_)
        assert any("elsewhere.example.org pid 123" in text for text in messages_)
        alice.refresh_from_db()
        bob.refresh_from_db()
        assert alice.lock_token == maildrop.token
        assert bob.lock_token
    finally:
        maildrop.release()


def test_release_on_an_unlocked_mailbox_says_so(superuser_client, alice):
    response = post_action(superuser_client, "release_stale_locks", alice)
    assert texts(response) == ["Mailbox alice: was not locked."]


def test_empty_mailbox_asks_first_then_deletes_messages_and_bodies(superuser_client, alice, make_mailbox):
    kept = deliver(make_mailbox("bob").user.username, simple_message("bob's"))
    ids = [deliver("alice", simple_message(f"m{i}")).pk for i in range(3)]
    maildrop = open_maildrop(alice.pk)  # a live session that listed the three messages
    try:
        response = post_action(superuser_client, "empty_mailboxes", alice)
        assert response.status_code == 200
        assert response.templates[0].name == "admin/popserver/mailbox/empty_confirmation.html"
        assert "alice: 3 messages" in response.content.decode()
        assert Message.objects.filter(mailbox=alice).count() == 3  # nothing deleted before confirming

        response = post_action(superuser_client, "empty_mailboxes", alice, post="yes")
        assert any(text.startswith("Mailbox alice: deleted 3 messages") for text in texts(response))
        assert not Message.objects.filter(mailbox=alice).exists()
        assert not MessageChunk.objects.filter(message_id__in=ids).exists()
        assert Message.objects.filter(pk=kept.pk).exists()
        # The live session's snapshot still lists them; reading one finds it gone (-ERR Message 1 expunged.).
        with pytest.raises(MessageExpunged):
            list(maildrop.read(1))
    finally:
        maildrop.release()


@pytest.mark.live
@pytest.mark.django_db(transaction=True)  # the server's threads do not share the test's transaction
def test_a_live_pop3_session_keeps_its_lock_and_sees_emptied_messages_expunged(pop3_server, make_mailbox):
    dora = make_mailbox("dora", "secret")
    deliver("dora", simple_message("first"))
    deliver("dora", simple_message("second"))
    operator = get_user_model().objects.create_superuser("operator", "operator@example.org", "pw")
    admin_client = Client()
    admin_client.force_login(operator)
    pop = pop3_server.poplib()
    try:
        pop.user("dora")
        pop.pass_("secret")
        assert pop.stat()[0] == 2

        response = post_action(admin_client, "release_stale_locks", dora)
        (refusal,) = texts(response)
        assert refusal.startswith("Mailbox dora: not released: the lock is held by a live session (")
        dora.refresh_from_db()
        assert dora.lock_token

        post_action(admin_client, "empty_mailboxes", dora, post="yes")
        assert not Message.objects.filter(mailbox=dora).exists()
        with pytest.raises(poplib.error_proto) as refused:
            pop.retr(1)
        assert refused.value.args == (b"-ERR Message 1 expunged.",)
        assert pop.quit().startswith(b"+OK")
    finally:
        pop.close()


@pytest.mark.parametrize(("action", "enabled"), [("enable_pop3", True), ("disable_pop3", False)])
def test_turn_pop3_on_and_off(superuser_client, make_mailbox, action, enabled):
    first = make_mailbox("first", pop3_enabled=not enabled)
    second = make_mailbox("second", pop3_enabled=enabled)
    response = post_action(superuser_client, action, first, second)
    assert texts(response) == [f"POP3 turned {'on' if enabled else 'off'} for 1 mailbox."]
    assert set(Mailbox.objects.values_list("pop3_enabled", flat=True)) == {enabled}
    assert LogEntry.objects.filter(object_id=str(first.pk)).count() == 1


# The message list and page ----------------------------------------------------------------------------------
@pytest.fixture
def messages_of_two(alice, make_mailbox):
    make_mailbox("bob", email="bob@example.org")
    return {
        "a1": deliver("alice", simple_message("Quarterly report", sender="Carol <carol@example.net>")),
        "a2": deliver("alice", simple_message("Lunch?", sender="Dave <dave@example.net>")),
        "b1": deliver("bob", simple_message("Quarterly numbers", sender="Dave <dave@example.net>")),
    }


def listed_messages(client, **query) -> list[int]:
    response = client.get(MESSAGE_LIST, query)
    assert response.status_code == 200
    return sorted(m.pk for m in response.context["cl"].result_list)


def test_message_list_shows_fields_and_links(superuser_client, messages_of_two):
    a1 = messages_of_two["a1"]
    response = superuser_client.get(MESSAGE_LIST)
    html = response.content.decode()
    for text in ["Quarterly report", "Carol &lt;carol@example.net&gt;", a1.uid, "alice", f"{a1.size} octets"]:
        assert text in html
    assert reverse("admin:popserver_message_text", args=[a1.pk]) in html
    assert reverse("admin:popserver_message_download", args=[a1.pk]) in html
    assert reverse("admin:popserver_message_add") not in html  # read-only: no add button


def test_message_search_and_mailbox_filter(superuser_client, messages_of_two, alice):
    m = messages_of_two
    assert listed_messages(superuser_client, q="quarterly") == sorted([m["a1"].pk, m["b1"].pk])
    assert listed_messages(superuser_client, q="dave@example") == sorted([m["a2"].pk, m["b1"].pk])
    assert listed_messages(superuser_client, mailbox=alice.pk) == sorted([m["a1"].pk, m["a2"].pk])
    assert listed_messages(superuser_client, mailbox=alice.pk, q="quarterly") == [m["a1"].pk]
    assert listed_messages(superuser_client, mailbox="nonsense") == []
    response = superuser_client.get(MESSAGE_LIST, {"mailbox": alice.pk})
    assert reverse("admin:popserver_mailbox_upload", args=[alice.pk]) in response.content.decode()


def test_message_list_links_from_the_mailbox_list(superuser_client, messages_of_two, alice):
    response = superuser_client.get(MAILBOX_LIST)
    assert f'href="{MESSAGE_LIST}?mailbox={alice.pk}"' in response.content.decode()


def test_message_page_is_read_only(superuser_client, messages_of_two):
    a1 = messages_of_two["a1"]
    url = reverse("admin:popserver_message_change", args=[a1.pk])
    response = superuser_client.get(url)
    assert response.status_code == 200
    html = response.content.decode()
    assert "Quarterly report" in html and a1.uid in html
    assert 'name="_save"' not in html
    assert reverse("admin:popserver_message_text", args=[a1.pk]) in html
    response = superuser_client.post(url, {"subject": "edited"})
    assert response.status_code == 403
    a1.refresh_from_db()
    assert a1.subject == "Quarterly report"
    assert superuser_client.get(reverse("admin:popserver_message_add")).status_code == 403


def test_delete_message_deletes_its_body(superuser_client, messages_of_two):
    a1 = messages_of_two["a1"]
    url = reverse("admin:popserver_message_delete", args=[a1.pk])
    assert superuser_client.get(url).status_code == 200
    assert superuser_client.post(url, {"post": "yes"}).status_code == 302
    assert not Message.objects.filter(pk=a1.pk).exists()
    assert not MessageChunk.objects.filter(message_id=a1.pk).exists()


def test_delete_selected_messages(superuser_client, messages_of_two):
    m = messages_of_two
    data = {"action": "delete_selected", "_selected_action": [m["a1"].pk, m["b1"].pk]}
    response = superuser_client.post(MESSAGE_LIST, data)
    assert response.status_code == 200 and "Quarterly report" in response.content.decode()
    response = superuser_client.post(MESSAGE_LIST, {**data, "post": "yes"})
    assert response.status_code == 302
    assert list(Message.objects.values_list("pk", flat=True)) == [m["a2"].pk]


# Download -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", corpus_files(), ids=lambda path: path.name)
def test_download_is_the_stored_bytes_exactly(superuser_client, alice, path):
    raw = path.read_bytes()
    message = deliver("alice", raw)
    expected = presented(raw)
    assert len(expected) == CORPUS_SIZES[path.name][1]
    response = superuser_client.get(reverse("admin:popserver_message_download", args=[message.pk]))
    assert response.status_code == 200
    assert response.streaming
    assert b"".join(response.streaming_content) == expected
    assert response["Content-Type"] == "message/rfc822"
    assert response["Content-Disposition"] == f'attachment; filename="message-{message.uid}.eml"'  # its UIDL
    assert response["X-Content-Type-Options"] == "nosniff"


def test_download_of_an_imported_unique_id_gets_a_safe_file_name(superuser_client, alice):
    from popserver.mailin.delivery import prepare_message, store_prepared

    message = store_prepared(alice, prepare_message(simple_message("old")), uid='a"b/c\\d', send_signal=False)
    response = superuser_client.get(reverse("admin:popserver_message_download", args=[message.pk]))
    assert response["Content-Disposition"] == 'attachment; filename="message-a_b_c_d.eml"'


@override_settings(POPSERVER_BODY_CHUNK_SIZE=1000)
def test_download_streams_chunk_by_chunk(superuser_client, alice):
    raw = simple_message("big", body="x" * 4500)
    message = deliver("alice", raw)
    assert MessageChunk.objects.filter(message=message).count() == 5
    response = superuser_client.get(reverse("admin:popserver_message_download", args=[message.pk]))
    chunks = list(response.streaming_content)
    assert len(chunks) == 5 and b"".join(chunks) == raw


def test_download_of_a_message_whose_body_is_gone_is_404(superuser_client, alice):
    message = deliver("alice", simple_message("gone"))
    get_body_store().delete([message.pk])
    response = superuser_client.get(reverse("admin:popserver_message_download", args=[message.pk]))
    assert response.status_code == 404


# The text view ------------------------------------------------------------------------------------------
def text_view(client, message):
    response = client.get(reverse("admin:popserver_message_text", args=[message.pk]))
    assert response.status_code == 200
    return response


def test_text_view_escapes_script_and_never_renders_html(superuser_client, alice):
    message = deliver("alice", SCRIPT_MESSAGE)
    response = text_view(superuser_client, message)
    html = response.content.decode()
    assert "<script" not in html.lower()
    assert (
        "&lt;script&gt;document.title=&#x27;pwned&#x27;&lt;/script&gt;" in html
    )  # subject and text, escaped
    assert "Hello &lt;script&gt;" in html
    assert "<img" not in html and "203.0.113.9" not in html  # the HTML part is listed, never shown
    assert "text/html" in html and "HTML is never rendered here" in html
    csp = response["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "sandbox" in csp
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["X-Frame-Options"] == "DENY"


def test_text_view_has_the_admin_header_and_names_the_message_as_pop3_does(superuser_client, alice):
    deliver("alice", simple_message("first"))
    message = deliver("alice", simple_message("second"))
    response = text_view(superuser_client, message)
    html = response.content.decode()
    assert '<header id="header">' in html and 'id="site-name"' in html and 'class="breadcrumbs"' in html
    assert (
        f'&rsaquo; <a href="{reverse("admin:popserver_message_change", args=[message.pk])}">{message.uid}</a>'
        in html
    )
    assert (
        f"Message 2 of 2 in alice as a POP3 client would number it now, unique id\n<code>{message.uid}"
        in html
    )
    assert "<script" not in html and "<form" not in html  # the CSP allows neither: none is needed
    assert "admin/css/base.css" in html  # the admin's stylesheets, which the CSP allows
    assert "style-src 'self' 'unsafe-inline'" in response["Content-Security-Policy"]


def test_text_view_shows_undecodable_bytes_as_replacement_characters(superuser_client, alice):
    message = deliver("alice", SCRIPT_MESSAGE)
    html = text_view(superuser_client, message).content.decode()
    assert "bad bytes: \ufffd\ufffd end" in html
    assert "caf\ufffd \ufffd" in html  # raw 8-bit header bytes that are not UTF-8


def test_text_view_of_the_corpus(superuser_client, alice):
    if not corpus_files():
        pytest.skip("the shared corpus is not here (../shared/corpus or tests/corpus)")
    by_name = {path.name: deliver("alice", path.read_bytes()) for path in corpus_files()}
    for message in by_name.values():
        text_view(superuser_client, message)  # every one renders
    latin1 = text_view(superuser_client, by_name["06-latin1-bytes.eml"]).content.decode()
    assert "\u00e0\u00e1\u00e2" in latin1  # the declared charset is used
    nul = text_view(superuser_client, by_name["13-nul-byte.eml"]).content.decode()
    assert "before\u2400after" in nul and "\x00" not in nul
    multipart = text_view(superuser_client, by_name["11-multipart-attachment.eml"]).content.decode()
    assert "application/octet-stream “data.bin”" in multipart
    assert "(attachment)" in multipart
    utf8 = text_view(superuser_client, by_name["05-8bit-utf8.eml"])
    assert utf8.status_code == 200


def test_text_view_decodes_encoded_words_and_quoted_printable(superuser_client, alice):
    raw = (
        b"From: =?utf-8?q?Ren=C3=A9e?= <renee@example.net>\r\nSubject: =?iso-8859-1?q?caf=E9?= au lait\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"na=C3=AFve =3D yes\r\n"
    )
    html = text_view(superuser_client, deliver("alice", raw)).content.decode()
    assert "Renée &lt;renee@example.net&gt;" in html
    assert "café au lait" in html
    assert "naïve = yes" in html


def test_text_view_of_a_large_message_shows_its_beginning(superuser_client, alice, monkeypatch):
    from popserver.admin import views as admin_views

    monkeypatch.setattr(admin_views, "TEXT_VIEW_MAX_OCTETS", 200)
    message = deliver("alice", simple_message("big", body="y" * 1000))
    html = text_view(superuser_client, message).content.decode()
    assert "this view shows its beginning only" in html
    assert "y" * 50 in html and "y" * 1000 not in html


# Upload ---------------------------------------------------------------------------------------------------
def upload_url(mailbox: Mailbox) -> str:
    return reverse("admin:popserver_mailbox_upload", args=[mailbox.pk])


def eml(name: str, data: bytes) -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type="message/rfc822")


def test_upload_page(superuser_client, alice):
    response = superuser_client.get(upload_url(alice))
    assert response.status_code == 200
    html = response.content.decode()
    assert 'type="file"' in html and "multiple" in html and 'enctype="multipart/form-data"' in html


def test_upload_one_message(superuser_client, alice):
    response = superuser_client.post(
        upload_url(alice), {"files": eml("hello.eml", simple_message("Uploaded one"))}
    )
    assert response.status_code == 302
    assert response["Location"] == f"{MESSAGE_LIST}?mailbox={alice.pk}"
    message = Message.objects.get(mailbox=alice)
    assert message.subject == "Uploaded one" and message.sender == "Bob <bob@example.net>"
    assert LogEntry.objects.filter(
        object_id=str(message.pk), change_message="Uploaded from hello.eml."
    ).exists()
    response = superuser_client.get(response["Location"])
    # Named as a POP3 client knows it: its position now and its unique id, never the database id.
    assert texts(response)[0] == (
        f"File hello.eml: delivered as message 1 of 1 in alice (unique id {message.uid}, "
        f"{message.size} octets), subject “Uploaded one”."
    )
    assert "Uploaded one" in response.content.decode()


def test_upload_several_messages_with_per_file_results(superuser_client, alice):
    files = [
        eml("one.eml", simple_message("First")),
        eml("empty.eml", b""),
        eml("two.eml", simple_message("Second").replace(b"\r\n", b"\n")),  # bare LF: stored with CRLF
    ]
    response = superuser_client.post(upload_url(alice), {"files": files}, follow=True)
    assert response.status_code == 200
    results = texts(response)
    assert len(results) == 3
    assert results[0].startswith("File one.eml: delivered as message 1 of 1 in alice (unique id ")
    assert results[1] == "File empty.eml: not delivered: empty message."
    assert results[2].startswith("File two.eml: delivered as message 2 of 2 in alice")
    assert Message.objects.filter(mailbox=alice).count() == 2
    assert sorted(Message.objects.values_list("subject", "size")) == [
        ("First", len(simple_message("First"))),
        ("Second", len(simple_message("Second"))),
    ]


@override_settings(POPSERVER_MAX_MESSAGE_SIZE=300)
def test_upload_over_the_size_limit_is_refused(superuser_client, alice):
    small = simple_message("small")
    big = simple_message("big", body="z" * 400)
    # A file under the limit on disk but over it once bare LFs become CRLF is refused by delivery itself.
    grows = simple_message("grows", body="\n" * 150).replace(b"\r\n", b"\n")
    assert len(grows) < 300 < len(presented(grows))
    files = [eml("small.eml", small), eml("big.eml", big), eml("grows.eml", grows)]
    response = superuser_client.post(upload_url(alice), {"files": files}, follow=True)
    results = texts(response)
    assert results[0].startswith("File small.eml: delivered")
    assert (
        results[1]
        == f"File big.eml: not delivered: file of {len(big)} octets is over the limit of 300 octets."
    )
    assert (
        results[2].startswith("File grows.eml: not delivered: message of")
        and "over the limit of 300" in results[2]
    )
    assert list(Message.objects.values_list("subject", flat=True)) == ["small"]


def test_upload_with_nothing_delivered_stays_on_the_form(superuser_client, alice):
    response = superuser_client.post(upload_url(alice), {"files": eml("empty.eml", b"")})
    assert response.status_code == 302 and response["Location"] == upload_url(alice)


def test_upload_without_a_file_shows_the_form_error(superuser_client, alice):
    response = superuser_client.post(upload_url(alice), {})
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()


def test_upload_to_a_missing_mailbox_is_404(superuser_client):
    response = superuser_client.get(reverse("admin:popserver_mailbox_upload", args=[999999]))
    assert response.status_code == 404


# Permissions --------------------------------------------------------------------------------------------
def test_anonymous_users_are_sent_to_the_login_page(client, alice):
    message = deliver("alice", simple_message("secret"))
    for url in [
        MAILBOX_LIST,
        MESSAGE_LIST,
        upload_url(alice),
        reverse("admin:popserver_message_text", args=[message.pk]),
        reverse("admin:popserver_message_download", args=[message.pk]),
    ]:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login")), url


def test_staff_without_popserver_permissions_sees_nothing(staff_client, alice):
    client = staff_client()
    assert client.get(MAILBOX_LIST).status_code == 403
    assert client.get(MESSAGE_LIST).status_code == 403
    assert client.get(upload_url(alice)).status_code == 403


def test_viewing_messages_does_not_allow_reading_them(staff_client, alice):
    message = deliver("alice", simple_message("private matters"))
    client = staff_client("view_message", "view_mailbox")
    response = client.get(MESSAGE_LIST)
    assert response.status_code == 200
    html = response.content.decode()
    assert "private matters" in html
    assert reverse("admin:popserver_message_text", args=[message.pk]) not in html
    page = client.get(reverse("admin:popserver_message_change", args=[message.pk]))
    assert page.status_code == 200
    assert reverse("admin:popserver_message_download", args=[message.pk]) not in page.content.decode()
    assert client.get(reverse("admin:popserver_message_text", args=[message.pk])).status_code == 403
    assert client.get(reverse("admin:popserver_message_download", args=[message.pk])).status_code == 403
    # Nor deleting them.
    assert (
        client.post(
            MESSAGE_LIST, {"action": "delete_selected", "_selected_action": [message.pk], "post": "yes"}
        ).status_code
        == 200
    )
    assert Message.objects.filter(pk=message.pk).exists()


def test_content_permission_alone_is_not_enough(staff_client, alice):
    message = deliver("alice", simple_message("private matters"))
    client = staff_client("view_message_content")
    assert client.get(reverse("admin:popserver_message_text", args=[message.pk])).status_code == 403
    assert client.get(reverse("admin:popserver_message_download", args=[message.pk])).status_code == 403


def test_staff_with_the_content_permission_reads_messages(staff_client, alice):
    message = deliver("alice", simple_message("private matters"))
    client = staff_client("view_message", "view_message_content")
    assert client.get(reverse("admin:popserver_message_text", args=[message.pk])).status_code == 200
    response = client.get(reverse("admin:popserver_message_download", args=[message.pk]))
    assert b"".join(response.streaming_content) == simple_message("private matters")


def test_upload_needs_the_add_message_permission(staff_client, alice):
    viewer = staff_client("view_mailbox", "view_message")
    response = viewer.get(reverse("admin:popserver_mailbox_change", args=[alice.pk]))
    assert response.status_code == 200 and upload_url(alice) not in response.content.decode()
    assert viewer.get(upload_url(alice)).status_code == 403
    assert viewer.post(upload_url(alice), {"files": eml("a.eml", simple_message("x"))}).status_code == 403
    assert not Message.objects.exists()

    uploader = staff_client("view_mailbox", "view_message", "add_message")
    response = uploader.post(upload_url(alice), {"files": eml("a.eml", simple_message("x"))})
    assert response.status_code == 302
    assert Message.objects.filter(mailbox=alice).count() == 1


def test_add_message_without_access_to_mailboxes_cannot_upload(staff_client, alice):
    client = staff_client("add_message")
    assert client.get(upload_url(alice)).status_code == 403


def test_actions_follow_the_permissions(staff_client, alice):
    lock(alice, host="elsewhere.example.org", pid=1, heartbeat_age=3600)
    deliver("alice", simple_message("keep me"))

    def actions(client) -> set[str]:
        response = client.get(MAILBOX_LIST)
        assert response.status_code == 200
        form = response.context["action_form"]  # None when no action is allowed
        return {name for name, _ in form.fields["action"].choices if name} if form else set()

    viewer = staff_client("view_mailbox")
    assert actions(viewer) == set()
    # A forged POST does nothing either.
    viewer.post(MAILBOX_LIST, {"action": "release_stale_locks", "_selected_action": [alice.pk]})
    viewer.post(MAILBOX_LIST, {"action": "empty_mailboxes", "_selected_action": [alice.pk], "post": "yes"})
    viewer.post(MAILBOX_LIST, {"action": "disable_pop3", "_selected_action": [alice.pk]})
    alice.refresh_from_db()
    assert alice.lock_token and alice.pop3_enabled and Message.objects.filter(mailbox=alice).exists()

    changer = staff_client("view_mailbox", "change_mailbox")
    assert actions(changer) == {"release_stale_locks", "enable_pop3", "disable_pop3"}
    emptier = staff_client("view_mailbox", "delete_message")
    assert actions(emptier) == {"empty_mailboxes"}
    assert actions(staff_client("view_mailbox", "delete_mailbox", "delete_message")) == {
        "delete_selected",
        "empty_mailboxes",
    }


def test_deleting_a_mailbox_with_messages_needs_delete_message(staff_client, alice):
    deliver("alice", simple_message("keep me"))
    client = staff_client("view_mailbox", "delete_mailbox")
    url = reverse("admin:popserver_mailbox_delete", args=[alice.pk])
    response = client.get(url)
    assert response.status_code == 200 and response.context["perms_lacking"] == {"message"}
    assert client.post(url, {"post": "yes"}).status_code == 403
    assert Mailbox.objects.filter(pk=alice.pk).exists()


# Static files -----------------------------------------------------------------------------------------
def test_admin_static_files_are_served_with_debug_off(client, settings):
    assert settings.DEBUG is False
    response = client.get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert b"".join(response.streaming_content).startswith(b"/*")


def test_admin_login_page(client):
    response = client.get(reverse("admin:login"))
    assert response.status_code == 200
    assert os.path.basename("/static/admin/css/base.css") in response.content.decode()
