"""The admin's POP3 overview: who may see it, what it shows (from seeded audit rows, messages and locks), the
links of its lists, its charts as inline SVG with data, and a fixed number of queries whatever the data."""

import re
from datetime import UTC, timedelta

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from popserver.admin import charts, overview
from popserver.mailin.delivery import count_delivery, deliver
from popserver.models import LoginEvent, LoginThrottle, Mailbox, Message, SessionRecord

pytestmark = pytest.mark.django_db

OVERVIEW = reverse("admin:popserver_overview_changelist")
EVENTS = reverse("admin:popserver_loginevent_changelist")


@pytest.fixture
def superuser_client(db):
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.org", "pw"))
    return client


def staff_client(*codenames: str) -> Client:
    user = get_user_model().objects.create_user(f"staff{len(codenames)}", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="popserver", codename__in=codenames)
    )
    client = Client()
    client.force_login(user)
    return client


def event(username: str, ip: str, outcome: str, ago: timedelta, reason: str = "") -> None:
    row = LoginEvent.objects.create(
        username=username, peer_ip=ip, mechanism="USER", outcome=outcome, reason=reason
    )
    LoginEvent.objects.filter(pk=row.pk).update(time=timezone.now() - ago)


def session(username: str, ago: timedelta, retrieved=(0, 0), deleted=0) -> None:
    SessionRecord.objects.create(
        username=username,
        peer_ip="192.0.2.1",
        started_at=timezone.now() - ago,
        duration=1.0,
        end_reason="logged out",
        retrieved_count=retrieved[0],
        retrieved_bytes=retrieved[1],
        deleted_count=deleted,
    )


def lock(mailbox: Mailbox, node: str, heartbeat_age: float = 0) -> None:
    now = timezone.now()
    Mailbox.objects.filter(pk=mailbox.pk).update(
        lock_token=f"{mailbox.pk:032d}",
        lock_host=node,
        lock_pid=1,
        lock_instance="i" * 32,
        locked_at=now,
        lock_heartbeat=now - timedelta(seconds=heartbeat_age),
    )


@pytest.fixture
def seeded(make_mailbox):
    """Three mailboxes (one near its quota, two locked on node pop1 and one stale on pop2), login events and
    sessions in the last hours and days, deliveries counted, an active lock-out."""
    alice = make_mailbox("alice", email="alice@example.org", quota_bytes=4096)
    bob = make_mailbox("bob")
    carol = make_mailbox("carol")
    for _ in range(3):
        deliver("alice", b"Subject: a\r\n\r\n" + b"a" * 1000 + b"\r\n")
    deliver("bob", b"Subject: b\r\n\r\n" + b"b" * 9000 + b"\r\n")
    lock(alice, "pop1")
    lock(bob, "pop1")
    lock(carol, "pop2", heartbeat_age=3600)
    hour = timedelta(hours=1)
    for n in range(3):
        event("alice", "127.0.0.1", LoginEvent.SUCCESS, hour * 2)
    for n in range(4):
        event("mallory", "203.0.113.9", LoginEvent.FAILED, hour * 3, "credentials")
    event("alice", "203.0.113.9", LoginEvent.FAILED, hour * 3, "credentials")
    event("bob", "198.51.100.4", LoginEvent.LOCKED_OUT, hour * 5, "account")
    event("bob", "198.51.100.4", LoginEvent.FAILED, timedelta(days=3), "credentials")  # not in the last day
    session("alice", hour * 2, retrieved=(2, 3000), deleted=1)
    session("alice", hour * 2, retrieved=(1, 1000))
    session("bob", timedelta(days=3))
    count_delivery(5000, now=timezone.now() - hour * 4)
    LoginThrottle.objects.create(
        scope=LoginThrottle.ACCOUNT_IP,
        key="mallory|203.0.113.9",
        failures=10,
        window_started=timezone.now(),
        locked_until=timezone.now() + timedelta(minutes=10),
    )
    return {"alice": alice, "bob": bob, "carol": carol}


# Who sees it --------------------------------------------------------------------------------------------------
def test_linked_from_the_admin_index(superuser_client):
    html = superuser_client.get(reverse("admin:index")).content.decode()
    assert f'<a href="{OVERVIEW}">POP3 overview</a>' in html


def test_staff_with_the_view_permissions_see_it(db):
    client = staff_client("view_mailbox", "view_loginevent", "view_sessionrecord", "view_loginthrottle")
    assert client.get(OVERVIEW).status_code == 200
    assert OVERVIEW in client.get(reverse("admin:index")).content.decode()


def test_staff_without_them_do_not(db):
    client = staff_client("view_mailbox", "view_loginevent")
    assert client.get(OVERVIEW).status_code == 403
    assert OVERVIEW not in client.get(reverse("admin:index")).content.decode()


def test_anonymous_users_are_sent_to_the_login_page(client):
    response = client.get(OVERVIEW)
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


# What it shows ----------------------------------------------------------------------------------------------------
def test_sessions_open_now_per_node(superuser_client, seeded):
    data = superuser_client.get(OVERVIEW).context["data"]
    assert [(n.node, n.live, n.overdue) for n in data.nodes] == [("pop1", 2, 0), ("pop2", 0, 1)]
    assert data.open_sessions == 3


def test_hourly_figures_of_the_last_day(superuser_client, seeded):
    response = superuser_client.get(OVERVIEW)
    data = response.context["data"]
    assert len(data.hours) == 24 and data.hours[-1] <= timezone.now() < data.hours[-1] + timedelta(hours=1)
    logins = overview.login_chart(data.hours)
    totals = {series.label: series.total for series in logins}
    assert totals["successful"] == 3
    assert totals["wrong name or password"] == 5  # the one three days ago is not in the last day
    assert totals["refused: locked out"] == 1
    # each series in the column of its hour: successes 2 hours ago, failures 3 hours ago
    successful = next(s for s in logins if s.label == "successful")
    assert successful.values[-3] == 3 and sum(successful.values) == 3
    html = response.content.decode()
    assert 'sessions <span class="total">2</span>' in html
    assert 'retrieved (RETR) <span class="total">3</span>' in html
    assert 'deleted at QUIT <span class="total">1</span>' in html
    assert 'sent by RETR <span class="total">3.9 KiB</span>' in html
    # deliveries are counted after their commit, which this test's transaction never reaches: the one
    # counted by hand shows (test_quota_warnings.py counts real ones)
    assert 'delivered <span class="total">1</span>' in html


def test_the_last_7_days(superuser_client, seeded):
    response = superuser_client.get(OVERVIEW, {"days": "7"})
    data = response.context["data"]
    assert len(data.hours) == 168
    assert {s.label: s.total for s in overview.login_chart(data.hours)}["wrong name or password"] == 6
    assert superuser_client.get(OVERVIEW, {"days": "1000"}).context["data"].days == "1"  # unknown: a day


def test_largest_and_fullest_mailboxes(superuser_client, seeded):
    data = superuser_client.get(OVERVIEW).context["data"]
    assert [(str(row.mailbox), row.messages) for row in data.largest] == [("bob", 1), ("alice", 3)]
    assert [(str(row.mailbox), row.usage) for row in data.fullest] == [("alice", "3 KiB of 4 KiB, 74 %")]
    html = superuser_client.get(OVERVIEW).content.decode()
    assert f'href="{reverse("admin:popserver_mailbox_change", args=[seeded["alice"].pk])}"' in html


def test_most_failed_logins_link_to_the_login_events_they_count(superuser_client, seeded):
    data = superuser_client.get(OVERVIEW).context["data"]
    assert [(row.value, row.failures) for row in data.failing_ips] == [
        ("203.0.113.9", 5),
        ("198.51.100.4", 1),
    ]
    assert [(row.value, row.failures) for row in data.failing_accounts] == [
        ("mallory", 4),
        ("alice", 1),
        ("bob", 1),
    ]
    listed = superuser_client.get(data.failing_ips[0].url).context["cl"].result_list
    assert len(listed) == 5 and {row.peer_ip for row in listed} == {"203.0.113.9"}
    listed = superuser_client.get(data.failing_accounts[2].url).context["cl"].result_list
    assert [(row.username, row.outcome) for row in listed] == [("bob", "locked_out")]  # not the old one


def test_active_lockouts(superuser_client, seeded):
    LoginThrottle.objects.create(
        scope=LoginThrottle.IP,
        key="192.0.2.50",
        failures=30,
        window_started=timezone.now(),
        locked_until=None,
    )
    data = superuser_client.get(OVERVIEW).context["data"]
    assert [row.key for row in data.lockouts] == ["mallory|203.0.113.9"]


def test_an_empty_site(superuser_client):
    response = superuser_client.get(OVERVIEW)
    html = response.content.decode()
    assert response.status_code == 200
    assert html.count("nothing in this period") == 5
    assert "No failed logins." in html and "None: no account or address is locked out now." in html


# The charts -------------------------------------------------------------------------------------------------------
def test_charts_are_inline_svg_with_axes_units_and_hover_titles(superuser_client, seeded):
    html = superuser_client.get(OVERVIEW).content.decode()
    assert "<script" not in html.split('id="content-main"')[1]  # the page itself needs none
    svgs = re.findall(r"<svg class=\"chart\".*?</svg>", html, re.S)
    assert len(svgs) == 5
    logins = svgs[0]
    assert '<title id="chart-logins-title">Logins per hour by outcome</title>' in logins
    assert re.search(r'<rect class="bar c-ok" [^>]*data-value="3"', logins)
    assert '<text class="unit"' in logins and ">per hour<" in logins
    assert logins.count('<g class="hour">') == 24
    assert "successful: 3" in logins and "wrong name or password: 5" in logins  # the hover text
    assert ">MiB per hour<" not in svgs[4] and ">KiB per hour<" in svgs[4]  # octets in a binary unit


def test_hover_titles_and_labels_are_in_the_local_time_zone(superuser_client, seeded, settings):
    settings.TIME_ZONE = "Asia/Kolkata"  # UTC+5:30: hours start at half past
    html = superuser_client.get(OVERVIEW).content.decode()
    start = timezone.localtime(overview.hour_starts(timezone.now(), 24)[0])
    assert start.minute == 30
    assert re.search(r"<title>[^<]*, [^<]*\d:30[^<]*–", html)


def test_y_scale_is_round():
    assert charts.y_scale(0, charts.COUNT)[0] == 1
    top, ticks, unit = charts.y_scale(23, charts.COUNT)
    assert (top, [text for _, text in ticks], unit) == (30, ["0", "10", "20", "30"], "per hour")
    top, ticks, unit = charts.y_scale(3, charts.COUNT)
    assert (top, [text for _, text in ticks]) == (3, ["0", "1", "2", "3"])  # whole numbers only
    top, ticks, unit = charts.y_scale(3 * 1024**2, charts.OCTETS)
    assert unit == "MiB per hour" and top == 3 * 1024**2 and ticks[-1][1] == "3"


# Cost -------------------------------------------------------------------------------------------------------------
def page_queries(client: Client, **params) -> int:
    with CaptureQueriesContext(connection) as captured:
        assert client.get(OVERVIEW, params).status_code == 200
    return len(captured)


def test_a_fixed_number_of_queries_whatever_the_data(superuser_client, make_mailbox):
    def seed(first: int, count: int) -> None:
        for n in range(first, first + count):
            mailbox = make_mailbox(f"user{n}", quota_messages=5)
            for _ in range(n % 4 + 1):
                deliver(f"user{n}", b"Subject: x\r\n\r\nx\r\n")
            lock(mailbox, f"node{n % 3}")
            for k in range(5):
                event(f"user{n}", f"192.0.2.{n}", LoginEvent.FAILED, timedelta(hours=k), "credentials")
                session(f"user{n}", timedelta(hours=k, minutes=5))
            LoginThrottle.objects.create(
                scope=LoginThrottle.IP,
                key=f"192.0.2.{n}",
                failures=30,
                window_started=timezone.now(),
                locked_until=timezone.now() + timedelta(minutes=5),
            )

    seed(0, 1)
    superuser_client.get(OVERVIEW)
    one = page_queries(superuser_client)
    seed(1, 20)
    assert page_queries(superuser_client) == one
    assert page_queries(superuser_client, days="7") == one
    # the admin's session and user, then one query per figure (the owners of the listed mailboxes in one)
    assert one == 12, one
    assert Message.objects.filter(server_notice=True).count() > 0  # the fullest mailboxes were warned


def test_counted_hours_are_utc_hours():
    assert overview.hour_starts(timezone.now(), 3)[-1].tzinfo == UTC


def test_lockouts_of_the_cache_throttle_are_not_listed_but_explained(superuser_client, settings):
    settings.POPSERVER_THROTTLE = "popserver.logins.throttle.CacheThrottle"
    html = superuser_client.get(OVERVIEW).content.decode()
    assert "POPSERVER_THROTTLE is not the database throttle" in html
