"""Quotas: per-mailbox limits on octets and messages with site-wide defaults; the API raises QuotaExceeded,
race-free under concurrent deliveries; ``deliver`` exits 75 (or 69 when told it is permanent); the admin shows
usage without a query per row and edits the limits."""

import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connections
from django.test import Client, override_settings
from django.urls import reverse

from popserver.mailin import quota
from popserver.mailin.delivery import deliver
from popserver.exceptions import QuotaExceeded
from popserver.models import Message
from tests.conftest import subprocess_env
from tests.test_admin import changelist_queries
from tests.test_deliver_command import EX_OK, EX_TEMPFAIL, EX_UNAVAILABLE, assert_refused, deliver_command

MAILBOX_LIST = reverse("admin:popserver_mailbox_changelist")


@pytest.fixture
def superuser_client(db):
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.org", "root-password"))
    return client


@pytest.fixture(autouse=True)
def no_quota_warnings(settings):
    """Quota warnings would add messages to the mailboxes these tests count: test_quota_warnings.py has them."""
    settings.POPSERVER_QUOTA_WARNINGS = []


def message(n: int, size: int = 0) -> bytes:
    data = f"Subject: {n}\r\n\r\n".encode()
    return data + b"x" * max(0, size - len(data) - 2) + b"\r\n"


# Limits ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "own,defaults,expected",
    [
        ((None, None), (0, 0), quota.Limits(0, 0)),
        ((None, None), (1000, 10), quota.Limits(1000, 10)),
        ((500, None), (1000, 10), quota.Limits(500, 10)),
        ((0, 0), (1000, 10), quota.Limits(0, 0)),  # a mailbox's 0: unlimited, whatever the default
        ((None, 3), (0, 0), quota.Limits(0, 3)),
    ],
)
def test_a_mailboxs_own_limits_win_over_the_defaults(own, defaults, expected):
    with override_settings(POPSERVER_QUOTA_BYTES=defaults[0], POPSERVER_QUOTA_MESSAGES=defaults[1]):
        assert quota.limits(*own) == expected


# The API -----------------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_message_count_quota(make_mailbox):
    mailbox = make_mailbox("alice", quota_messages=2)
    deliver("alice", message(1))
    second = deliver("alice", message(2))
    with pytest.raises(QuotaExceeded, match="holds 2 of at most 2 messages") as refused:
        deliver("alice", message(3))
    assert (refused.value.unit, refused.value.limit, refused.value.used) == ("messages", 2, 2)
    mailbox.refresh_from_db()
    assert Message.objects.filter(mailbox=mailbox).count() == 2
    assert mailbox.next_uid == 3  # a refused delivery takes no unique id
    second.delete()  # as a QUIT would
    deliver("alice", message(3))


@pytest.mark.django_db
def test_size_quota_counts_the_stored_octets(make_mailbox):
    make_mailbox("alice", quota_bytes=1000)
    deliver("alice", message(1, 600))
    deliver("alice", message(2, 400))  # exactly at the quota
    with pytest.raises(QuotaExceeded, match="quota of 1000 octets") as refused:
        deliver("alice", message(3, 1))  # the smallest message is still too much
    assert (refused.value.unit, refused.value.limit, refused.value.used) == ("octets", 1000, 1000)


@pytest.mark.django_db
def test_a_bare_lf_message_counts_in_its_crlf_form(make_mailbox):
    make_mailbox("alice", quota_bytes=20)
    with pytest.raises(QuotaExceeded):
        deliver("alice", b"Subject: x\n\n" + b"a\n" * 4)  # 20 octets here, 26 as stored


@pytest.mark.django_db
def test_site_defaults_and_an_unlimited_mailbox(make_mailbox):
    make_mailbox("alice")
    make_mailbox("bob", quota_messages=0, quota_bytes=0)
    with override_settings(POPSERVER_QUOTA_MESSAGES=1, POPSERVER_QUOTA_BYTES=10_000):
        deliver("alice", message(1))
        with pytest.raises(QuotaExceeded):
            deliver("alice", message(2))
        for n in range(3):
            deliver("bob", message(n))
    deliver("alice", message(2))  # the default is read at call time


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_never_pass_the_quota(make_mailbox):
    mailbox = make_mailbox("alice", quota_messages=5)
    threads, per_thread = 4, 3
    start = threading.Barrier(threads)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        try:
            start.wait(timeout=30)
            for i in range(per_thread):
                try:
                    deliver("alice", message(n * 10 + i))
                    result = "stored"
                except QuotaExceeded:
                    result = "refused"
                except Exception as exc:  # noqa: BLE001  (reported below)
                    result = f"error: {exc!r}"
                with lock:
                    outcomes.append(result)
        finally:
            connections.close_all()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=100)
    assert sorted(outcomes) == ["refused"] * 7 + ["stored"] * 5, outcomes
    assert Message.objects.filter(mailbox=mailbox).count() == 5


@pytest.mark.django_db
def test_upload_in_the_admin_is_refused_over_quota(superuser_client, make_mailbox):
    from django.core.files.uploadedfile import SimpleUploadedFile

    mailbox = make_mailbox("alice", quota_messages=1)
    deliver("alice", message(1))
    url = reverse("admin:popserver_mailbox_upload", args=[mailbox.pk])
    upload = SimpleUploadedFile("a.eml", message(2), content_type="message/rfc822")
    response = superuser_client.post(url, {"files": upload}, follow=True)
    assert "mailbox is full" in response.content.decode()
    assert Message.objects.filter(mailbox=mailbox).count() == 1


# The deliver command -----------------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
def test_deliver_over_quota_exits_75_so_the_mta_retries(make_mailbox, tmp_path):
    make_mailbox("alice", quota_messages=1)
    env = subprocess_env(POPSERVER_QUOTA_WARNINGS="[]")
    assert deliver_command("alice", cwd=tmp_path, env=env).returncode == EX_OK
    assert_refused(deliver_command("alice", cwd=tmp_path, env=env), EX_TEMPFAIL, "mailbox is full")
    assert Message.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_deliver_over_quota_exits_69_when_permanent(make_mailbox, tmp_path):
    make_mailbox("alice")
    env = subprocess_env(POPSERVER_QUOTA_BYTES="100", POPSERVER_QUOTA_EXCEEDED_PERMANENT="true")
    big = b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n"
    assert_refused(
        deliver_command("alice", data=big, cwd=tmp_path, env=env), EX_UNAVAILABLE, "quota of 100 octets"
    )
    assert not Message.objects.exists()


# The admin ----------------------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_the_mailbox_list_shows_usage_without_a_query_per_row(superuser_client, make_mailbox):
    make_mailbox("alice", quota_bytes=100 * 1024 * 1024, quota_messages=1000)
    deliver("alice", message(1, 1000))
    superuser_client.get(MAILBOX_LIST)
    one = changelist_queries(superuser_client)
    for n in range(10):
        make_mailbox(f"user{n}", quota_messages=n or None)
        deliver(f"user{n}", message(n))
    with override_settings(POPSERVER_QUOTA_BYTES=1024**3):
        assert changelist_queries(superuser_client) == one
        html = superuser_client.get(MAILBOX_LIST).content.decode()
    # Use against the limit: the fuller of the two in the cell, both in its title.
    assert 'title="1000 octets of 100 MiB, 0 %; 1 of 1000 messages, 0 %">1000 octets of 100 MiB, 0 %<' in html
    # user1: the site default size, its own count; full
    assert (
        'title="16 octets of 1 GiB, 0 %; 1 of 1 message, 100 % (full)">1 of 1 message, 100 % (full)<' in html
    )
    assert ">16 octets of 1 GiB, 0 %<" in html  # user0: the site default size, no count limit
    assert ">unlimited<" not in html


@pytest.mark.django_db
def test_the_change_page_shows_usage_and_edits_the_quota(superuser_client, make_mailbox):
    mailbox = make_mailbox("alice")
    deliver("alice", message(1, 2000))
    url = reverse("admin:popserver_mailbox_change", args=[mailbox.pk])
    html = superuser_client.get(url).content.decode()
    assert ">unlimited<" in html and "Size quota" in html and "Message quota" in html
    assert "1 message, 2 KiB · " in html

    data = {
        "user": mailbox.user.pk,
        "pop3_enabled": "on",
        "quota_bytes": "1.5G",
        "quota_messages": "500",
        "addresses-TOTAL_FORMS": "0",
        "addresses-INITIAL_FORMS": "0",
        "addresses-MIN_NUM_FORMS": "0",
        "addresses-MAX_NUM_FORMS": "1000",
        "_continue": "Save",
    }
    response = superuser_client.post(url, data)
    assert response.status_code == 302
    mailbox.refresh_from_db()
    assert (mailbox.quota_bytes, mailbox.quota_messages) == (1536 * 1024 * 1024, 500)
    html = superuser_client.get(url).content.decode()
    assert 'value="1536M"' in html and "2 KiB of 1.5 GiB, 0 %; 1 of 500 messages, 0 %" in html

    response = superuser_client.post(url, {**data, "quota_bytes": "", "quota_messages": ""})
    mailbox.refresh_from_db()
    assert (mailbox.quota_bytes, mailbox.quota_messages) == (None, None)  # back to the site default

    response = superuser_client.post(url, {**data, "quota_bytes": "lots"})
    assert response.status_code == 200
    assert "Enter a size such as 500M" in response.content.decode()


@pytest.mark.parametrize(
    "text,octets",
    [
        ("0", 0),
        ("1048576", 1048576),
        ("100M", 100 * 1024**2),
        ("100 MB", 100 * 1024**2),
        ("2g", 2 * 1024**3),
        ("1.5G", 1536 * 1024**2),
        ("10KiB", 10240),
        (" 7 ", 7),
    ],
)
def test_parse_size(text, octets):
    assert quota.parse_size(text) == octets


@pytest.mark.parametrize("text", ["", "M", "-1", "1.2.3", "10 apples", "1e9"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        quota.parse_size(text)


@pytest.mark.parametrize(
    "octets,text", [(0, "0"), (1000, "1000"), (1024, "1K"), (3 * 1024**3, "3G"), (1536 * 1024**2, "1536M")]
)
def test_format_size_reads_back(octets, text):
    assert quota.format_size(octets) == text and quota.parse_size(text) == octets


# Checks ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,value",
    [("QUOTA_BYTES", -1), ("QUOTA_MESSAGES", "ten"), ("QUOTA_BYTES", True), ("QUOTA_MESSAGES", 1.5)],
)
def test_bad_quota_settings_are_errors(name, value):
    from django.core.checks import run_checks

    with override_settings(**{f"POPSERVER_{name}": value}):
        assert "popserver.E008" in {m.id for m in run_checks()}


@pytest.mark.parametrize(
    "octets,text",
    [
        (0, "0 octets"),
        (1, "1 octet"),
        (1023, "1023 octets"),
        (1024, "1 KiB"),
        (1741, "1.7 KiB"),
        (64 * 1024**2, "64 MiB"),
        (500 * 1024**2, "500 MiB"),
        (1536 * 1024**2, "1.5 GiB"),
    ],
)
def test_sizes_for_people_are_in_binary_units(octets, text):
    assert quota.format_octets(octets) == text


@pytest.mark.parametrize(
    "used,limits,short,text",
    [
        ((7, 1741), (500 * 1024**2, 0), False, "1.7 KiB of 500 MiB, 0 %"),
        ((7, 1741), (0, 0), False, "unlimited"),
        ((3, 0), (0, 10), False, "3 of 10 messages, 30 %"),
        ((9, 1024), (4096, 10), False, "1 KiB of 4 KiB, 25 %; 9 of 10 messages, 90 %"),
        ((9, 1024), (4096, 10), True, "9 of 10 messages, 90 %"),  # the fuller one
        ((1, 4096), (4096, 0), False, "4 KiB of 4 KiB, 100 % (full)"),
    ],
)
def test_use_against_the_limit(used, limits, short, text):
    assert quota.describe_usage(*used, quota.Limits(*limits), short=short) == text


@pytest.mark.parametrize("value", [[0], [80, 101], "80", [True], ["80"], None])
def test_bad_quota_warning_shares_are_errors(value):
    from django.core.checks import run_checks

    with override_settings(POPSERVER_QUOTA_WARNINGS=value):
        assert "popserver.E016" in {m.id for m in run_checks()}


def test_quota_warning_shares_pass_the_check():
    from django.core.checks import run_checks

    for value in ([80, 95], [], [99.5, 100]):
        with override_settings(POPSERVER_QUOTA_WARNINGS=value):
            assert "popserver.E016" not in {m.id for m in run_checks()}
