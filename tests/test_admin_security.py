"""The admin of lock-outs, app passwords and the audit trail (popserver.admin.security), with the Django test
client; lock-outs and audit rows are made by real logins at the authenticator."""

import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from popserver.logins import audit
from popserver.logins.app_passwords import check_app_password, create_app_password, revoke_app_password
from popserver.logins.authenticator import DjangoAuthenticator
from popserver.exceptions import AuthenticationFailed, LoginLockedOut
from popserver.models import AppPassword, LoginEvent, LoginThrottle, SessionRecord

pytestmark = pytest.mark.django_db

LOCKOUTS = reverse("admin:popserver_loginthrottle_changelist")
APP_PASSWORDS = reverse("admin:popserver_apppassword_changelist")
APP_PASSWORD_ADD = reverse("admin:popserver_apppassword_add")
EVENTS = reverse("admin:popserver_loginevent_changelist")
SESSIONS = reverse("admin:popserver_sessionrecord_changelist")
GUESSER = "203.0.113.5"


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
    mailbox = make_mailbox("alice", "right", email="alice@example.org")
    mailbox.user.email = "alice.smith@example.com"
    mailbox.user.save()
    return mailbox


def login(username: str, password: str, *, ip: str = GUESSER, mechanism: str = "USER"):
    return DjangoAuthenticator(ip, 4000, trusted=False)(username, password, mechanism=mechanism)


def fail(username: str, password: str = "wrong", **kwargs) -> type[Exception]:
    with pytest.raises((AuthenticationFailed, LoginLockedOut)) as info:
        login(username, password, **kwargs)
    return info.type


def results(response) -> list:
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def texts(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def action(client: Client, url: str, name: str, rows, **extra):
    return client.post(
        url, {"action": name, "_selected_action": [row.pk for row in rows], **extra}, follow=True
    )


def has_save_button(response) -> bool:
    return bool(re.search(r'name="_save"', response.content.decode()))


# Lock-outs ----------------------------------------------------------------------------------------------------
@pytest.fixture
def locked_out(alice, settings):
    """alice locked out from GUESSER after three wrong passwords (the IP itself is only counting)."""
    settings.POPSERVER_THROTTLE_ACCOUNT_FAILURES = 3
    for _ in range(3):
        assert fail("alice") is AuthenticationFailed
    assert fail("alice", "right") is LoginLockedOut
    return LoginThrottle.objects.get(scope=LoginThrottle.ACCOUNT_IP)


def test_lockout_list_shows_the_counters_and_who_is_locked_out_now(superuser_client, locked_out):
    response = superuser_client.get(LOCKOUTS)
    rows = results(response)
    assert [(row.scope, row.key, row.locked_now) for row in rows] == [
        ("account", f"alice|{GUESSER}", True),  # current lock-outs first
        ("ip", GUESSER, False),
    ]
    html = response.content.decode()
    for heading in ("Key", "Scope", "Failures", "Since", "Until", "Locked"):
        assert heading in html
    assert 'alt="True"' in html and 'alt="False"' in html
    assert "Add login lock-out" not in html


@pytest.mark.parametrize(
    ("query", "keys"),
    [
        ({"locked": "yes"}, [f"alice|{GUESSER}"]),
        ({"locked": "no"}, [GUESSER]),
        ({"scope__exact": "ip"}, [GUESSER]),
        ({"scope__exact": "account"}, [f"alice|{GUESSER}"]),
        ({"q": "alice"}, [f"alice|{GUESSER}"]),
        ({"q": "203.0.113"}, [f"alice|{GUESSER}", GUESSER]),
        ({"q": "198.51.100"}, []),
    ],
)
def test_lockout_filters_and_search(superuser_client, locked_out, query, keys):
    assert sorted(row.key for row in results(superuser_client.get(LOCKOUTS, query))) == sorted(keys)


def test_an_expired_lockout_is_not_locked_now(superuser_client, locked_out):
    LoginThrottle.objects.filter(pk=locked_out.pk).update(locked_until=timezone.now() - timedelta(seconds=1))
    assert results(superuser_client.get(LOCKOUTS, {"locked": "yes"})) == []
    assert not results(superuser_client.get(LOCKOUTS))[0].locked_now


def test_clear_selected_lockouts_lets_the_right_password_in(superuser_client, locked_out):
    response = action(superuser_client, LOCKOUTS, "clear_lockouts", [locked_out])
    assert texts(response) == ["Cleared 1 lock-out: those logins are no longer refused."]
    assert list(LoginThrottle.objects.values_list("scope", flat=True)) == ["ip"]
    assert LogEntry.objects.get().object_repr == f"account and IP alice|{GUESSER}"
    login("alice", "right").release()


def test_lockout_pages_are_read_only_and_the_normal_delete_works(superuser_client, locked_out):
    change = reverse("admin:popserver_loginthrottle_change", args=[locked_out.pk])
    response = superuser_client.get(change)
    assert response.status_code == 200 and not has_save_button(response)
    assert f"alice|{GUESSER}" in response.content.decode()
    assert superuser_client.post(change, {"failures": 0}).status_code == 403
    assert superuser_client.get(reverse("admin:popserver_loginthrottle_add")).status_code == 403
    response = action(superuser_client, LOCKOUTS, "delete_selected", [locked_out], post="yes")
    assert response.status_code == 200 and not LoginThrottle.objects.filter(pk=locked_out.pk).exists()
    login("alice", "right").release()


def test_clearing_lockouts_needs_the_delete_permission(staff_client, locked_out):
    viewer = staff_client("view_loginthrottle")
    response = viewer.get(LOCKOUTS)
    assert len(results(response)) == 2
    assert "clear_lockouts" not in response.content.decode()
    action(viewer, LOCKOUTS, "clear_lockouts", [locked_out])
    assert LoginThrottle.objects.filter(pk=locked_out.pk).exists()
    clearer = staff_client("view_loginthrottle", "delete_loginthrottle")
    assert "clear_lockouts" in clearer.get(LOCKOUTS).content.decode()
    action(clearer, LOCKOUTS, "clear_lockouts", [locked_out])
    assert not LoginThrottle.objects.filter(pk=locked_out.pk).exists()


def test_the_cache_throttle_is_not_listed_and_the_page_says_so(superuser_client, settings):
    settings.POPSERVER_THROTTLE = "popserver.logins.throttle.CacheThrottle"
    message = texts(superuser_client.get(LOCKOUTS))
    assert len(message) == 1 and "poplockouts --clear" in message[0]


# App passwords ------------------------------------------------------------------------------------------------
def add_app_password(client: Client, mailbox, name: str):
    return client.post(APP_PASSWORD_ADD, {"mailbox": mailbox.pk, "name": name})


def shown_secret(response) -> str:
    match = re.search(r'<code id="secret"[^>]*>([^<]+)</code>', response.content.decode())
    assert match, response.content.decode()
    return match.group(1)


def test_add_page_asks_for_mailbox_and_name_only(superuser_client, alice):
    response = superuser_client.get(APP_PASSWORD_ADD, {"mailbox": alice.pk})
    assert response.status_code == 200
    form = response.context["adminform"].form
    assert list(form.fields) == ["mailbox", "name"] and form.initial["mailbox"] == str(alice.pk)
    html = response.content.decode()
    assert "digest" not in html.lower()
    assert "_addanother" not in html and "_continue" not in html  # the one answer is the secret page


def test_adding_shows_the_secret_once_and_it_works_for_pop3(superuser_client, alice):
    response = add_app_password(superuser_client, alice, "Phone")
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    secret = shown_secret(response)
    app_password = AppPassword.objects.get()
    assert (app_password.mailbox, app_password.name) == (alice, "Phone")
    assert app_password.digest and app_password.digest not in response.content.decode()
    assert check_app_password(alice, secret, "192.0.2.1:1") == app_password
    login("alice", secret).release()
    assert LoginEvent.objects.get().outcome == "success"
    # Nowhere else: not in the list, the change page, the admin's log or a pending message.
    change = reverse("admin:popserver_apppassword_change", args=[app_password.pk])
    for url in (APP_PASSWORDS, change):
        page = superuser_client.get(url)
        assert page.status_code == 200 and secret not in page.content.decode()
        assert app_password.digest not in page.content.decode()
        assert texts(page) == []
    entry = LogEntry.objects.get()
    assert entry.is_addition() and secret not in f"{entry.object_repr}{entry.change_message}"


def test_adding_needs_a_mailbox_and_a_name(superuser_client, alice):
    response = superuser_client.post(APP_PASSWORD_ADD, {"mailbox": alice.pk, "name": ""})
    assert response.status_code == 200 and response.context["adminform"].form.errors
    assert not AppPassword.objects.exists()


def test_adding_needs_the_add_permission(staff_client, alice):
    viewer = staff_client("view_apppassword")
    assert viewer.get(APP_PASSWORD_ADD).status_code == 403
    assert add_app_password(viewer, alice, "Phone").status_code == 403
    adder = staff_client("view_apppassword", "add_apppassword")
    assert shown_secret(add_app_password(adder, alice, "Phone"))


@pytest.fixture
def app_passwords(alice, make_mailbox):
    bob = make_mailbox("bob", email="bob@example.org")
    phone, _ = create_app_password(alice, "Phone")
    laptop, _ = create_app_password(alice, "Laptop")
    tablet, _ = create_app_password(bob, "Tablet")
    revoke_app_password(laptop)
    AppPassword.objects.filter(pk=phone.pk).update(
        last_used_at=timezone.now(), last_used_peer="192.0.2.9:5000"
    )
    return {"phone": phone, "laptop": laptop, "tablet": tablet}


def test_app_password_list_columns_and_no_digest(superuser_client, app_passwords):
    response = superuser_client.get(APP_PASSWORDS)
    assert [(str(row.mailbox), row.name) for row in results(response)] == [
        ("alice", "Laptop"),
        ("alice", "Phone"),
        ("bob", "Tablet"),
    ]
    html = response.content.decode()
    for heading in ("Mailbox", "Created", "Last used", "Active"):
        assert heading in html
    assert " from 192.0.2.9:5000" in html and "never" in html
    assert all(app_password.digest not in html for app_password in AppPassword.objects.all())


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ({"state": "active"}, ["Phone", "Tablet"]),
        ({"state": "revoked"}, ["Laptop"]),
        ({"q": "phone"}, ["Phone"]),
        ({"q": "alice"}, ["Laptop", "Phone"]),  # the owner's login name
        ({"q": "alice.smith@example.com"}, ["Laptop", "Phone"]),  # the owner's e-mail
        ({"q": "bob", "state": "active"}, ["Tablet"]),
    ],
)
def test_app_password_search_and_filter(superuser_client, app_passwords, query, names):
    assert sorted(row.name for row in results(superuser_client.get(APP_PASSWORDS, query))) == names


def test_app_password_list_costs_the_same_queries_for_3_and_30(superuser_client, app_passwords, alice):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert superuser_client.get(APP_PASSWORDS).status_code == 200
        return len(captured)

    few = queries()
    for n in range(27):
        create_app_password(alice, f"device {n}")
    assert queries() == few


def test_revoke_selected_app_passwords(superuser_client, app_passwords, alice):
    secret = create_app_password(alice, "Car")[1]
    car = AppPassword.objects.get(name="Car")
    response = action(
        superuser_client,
        APP_PASSWORDS,
        "revoke_selected",
        [car, app_passwords["phone"], app_passwords["laptop"]],
    )
    assert texts(response) == ["Revoked 2 app passwords."]  # the laptop's was revoked already
    assert set(AppPassword.objects.filter(revoked_at=None).values_list("name", flat=True)) == {"Tablet"}
    assert check_app_password(alice, secret) is None
    assert fail("alice", secret) is AuthenticationFailed
    assert LogEntry.objects.filter(change_message="Revoked.").count() == 2


def test_revoking_needs_the_change_permission(staff_client, app_passwords):
    viewer = staff_client("view_apppassword")
    assert "revoke_selected" not in viewer.get(APP_PASSWORDS).content.decode()
    action(viewer, APP_PASSWORDS, "revoke_selected", [app_passwords["phone"]])
    assert AppPassword.objects.get(pk=app_passwords["phone"].pk).is_active


def test_change_page_renames_and_revokes_but_never_moves_or_reactivates(
    superuser_client, app_passwords, alice
):
    phone = app_passwords["phone"]
    change = reverse("admin:popserver_apppassword_change", args=[phone.pk])
    response = superuser_client.get(change)
    assert response.status_code == 200 and has_save_button(response)
    assert list(response.context["adminform"].form.fields) == ["name", "revoke"]
    assert phone.digest not in response.content.decode()
    tablet_owner = app_passwords["tablet"].mailbox
    response = superuser_client.post(change, {"name": "Old phone", "mailbox": tablet_owner.pk})
    assert response.status_code == 302
    phone.refresh_from_db()
    assert (phone.name, phone.mailbox, phone.is_active) == ("Old phone", alice, True)
    superuser_client.post(change, {"name": "Old phone", "revoke": "on"})
    phone.refresh_from_db()
    assert not phone.is_active
    revoked_at = phone.revoked_at
    response = superuser_client.get(change)
    assert response.context["adminform"].form.fields["revoke"].disabled
    superuser_client.post(change, {"name": "Old phone"})  # an unticked, disabled box changes nothing
    phone.refresh_from_db()
    assert phone.revoked_at == revoked_at


# Audit --------------------------------------------------------------------------------------------------------
@pytest.fixture
def logins(alice, make_mailbox):
    """Login events: alice from GUESSER (USER, success; PLAIN, failed), from 198.51.100.7 (LOGIN, success), a
    name that does not exist, and one over TLS."""
    login("alice", "right").release()
    fail("alice", mechanism="PLAIN")
    login("alice", "right", ip="198.51.100.7", mechanism="LOGIN").release()
    fail("nobody", ip="198.51.100.7")
    authenticator = DjangoAuthenticator("2001:db8::5", 4000, trusted=False)
    authenticator.tls = True
    authenticator("alice", "right", mechanism="PLAIN").release()
    return LoginEvent.objects.all()


def test_login_events_list_the_logins(superuser_client, logins):
    response = superuser_client.get(EVENTS)
    rows = results(response)
    assert len(rows) == 5
    html = response.content.decode()
    for heading in ("Time", "Username", "Peer IP", "Mechanism", "TLS", "Outcome"):
        assert heading in html
    assert f'href="{EVENTS}?peer_ip=198.51.100.7"' in html and f'href="{EVENTS}?username=nobody"' in html
    assert "failed (credentials)" in html and "wrong" not in html
    # TLS: a tick for the one over TLS, a cross for the four without it from networks that are not trusted
    assert html.count('<td class="field-tls_display"><img src="/static/admin/img/icon-yes.svg"') == 1
    assert html.count('<td class="field-tls_display"><img src="/static/admin/img/icon-no.svg"') == 4


def test_login_events_from_trusted_networks_show_local_instead_of_a_missing_tls(superuser_client, alice):
    """Loopback (POPSERVER_TRUSTED_NETWORKS) expects no TLS: "local", not an error mark."""
    DjangoAuthenticator("127.0.0.1", 4000)("alice", "right").release()
    html = superuser_client.get(EVENTS).content.decode()
    assert '<td class="field-tls_display">local</td>' in html
    assert "icon-no.svg" not in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"outcome": "failed"}, {("alice", GUESSER), ("nobody", "198.51.100.7")}),
        ({"outcome": "failures"}, {("alice", GUESSER), ("nobody", "198.51.100.7")}),
        ({"outcome__exact": "failed"}, {("alice", GUESSER), ("nobody", "198.51.100.7")}),  # older links
        ({"mechanism": "LOGIN"}, {("alice", "198.51.100.7")}),
        ({"tls": "yes"}, {("alice", "2001:db8::5")}),
        ({"username": "nobody"}, {("nobody", "198.51.100.7")}),
        ({"peer_ip": "198.51.100.7", "outcome": "success"}, {("alice", "198.51.100.7")}),
        ({"peer_ip": "2001:DB8:0::5"}, {("alice", "2001:db8::5")}),  # compared as an address
        ({"peer_ip": "not-an-ip"}, set()),
        ({"q": "nobody"}, {("nobody", "198.51.100.7")}),
        ({"q": "198.51"}, {("alice", "198.51.100.7"), ("nobody", "198.51.100.7")}),
        ({"q": "51.100"}, set()),  # an IP is searched from its start
    ],
)
def test_login_event_filters_and_search(superuser_client, logins, query, expected):
    rows = results(superuser_client.get(EVENTS, query))
    assert {(row.username, row.peer_ip) for row in rows} == expected


def test_login_event_filters_offer_the_busiest_users_and_ips_and_the_selected_one(superuser_client, logins):
    LoginEvent.objects.create(username="old", peer_ip="192.0.2.200", mechanism="USER", outcome="failed")
    LoginEvent.objects.filter(username="old").update(time=timezone.now() - timedelta(days=3))
    response = superuser_client.get(EVENTS)
    choices = {
        spec.title: [choice["display"] for choice in spec.choices(response.context["cl"])]
        for spec in response.context["cl"].filter_specs
    }
    assert choices["username (busiest of the last day)"] == ["All", "alice", "nobody"]
    assert choices["peer IP (busiest of the last day)"] == ["All", "198.51.100.7", GUESSER, "2001:db8::5"]
    assert choices["mechanism"] == ["All", "USER", "PLAIN", "LOGIN"]
    response = superuser_client.get(EVENTS, {"username": "old"})
    assert [row.username for row in results(response)] == ["old"]
    assert "old" in [
        choice["display"]
        for spec in response.context["cl"].filter_specs
        for choice in spec.choices(response.context["cl"])
    ]


def test_login_event_date_hierarchy(superuser_client, logins):
    today = timezone.localdate()
    query = {"time__year": today.year, "time__month": today.month, "time__day": today.day}
    assert len(results(superuser_client.get(EVENTS, query))) == 5
    assert results(superuser_client.get(EVENTS, {"time__year": today.year - 1})) == []


def test_login_events_are_read_only(superuser_client, logins):
    event = logins.filter(outcome="failed").first()
    change = reverse("admin:popserver_loginevent_change", args=[event.pk])
    response = superuser_client.get(change)
    assert response.status_code == 200 and not has_save_button(response)
    assert event.username in response.content.decode()
    assert superuser_client.post(change, {"username": "someone else"}).status_code == 403
    assert superuser_client.get(reverse("admin:popserver_loginevent_add")).status_code == 403
    assert LoginEvent.objects.get(pk=event.pk).username == event.username


def test_only_superusers_delete_audit_rows(superuser_client, staff_client, logins):
    staff = staff_client("view_loginevent", "delete_loginevent")
    event = logins.first()
    delete = reverse("admin:popserver_loginevent_delete", args=[event.pk])
    assert len(results(staff.get(EVENTS))) == 5
    assert "delete_selected" not in staff.get(EVENTS).content.decode()
    assert staff.post(delete, {"post": "yes"}).status_code == 403
    assert superuser_client.post(delete, {"post": "yes"}).status_code == 302
    assert not LoginEvent.objects.filter(pk=event.pk).exists()


@pytest.fixture
def sessions(alice, make_mailbox):
    bob = make_mailbox("bob")
    now = timezone.now()

    def record(mailbox, ip, retrieved=(0, 0), deleted=(0, 0), reason="Logged out", ago=0):
        stats = SimpleNamespace(
            retr_count=retrieved[0],
            retr_bytes=retrieved[1],
            deleted_count=deleted[0],
            deleted_bytes=deleted[1],
        )
        audit.record_session(
            audit.session_record(
                mailbox=mailbox,
                username=str(mailbox),
                peer_ip=ip,
                started_at=now - timedelta(minutes=ago),
                duration=12.34,
                end_reason=reason,
                stats=stats,
            )
        )

    record(alice, GUESSER, retrieved=(3, 4096), deleted=(2, 2048))
    record(alice, "198.51.100.7", retrieved=(1, 100), ago=5)
    record(bob, "198.51.100.7", reason="Connection closed", ago=10)
    return SessionRecord.objects.all()


def test_session_records_list(superuser_client, sessions):
    response = superuser_client.get(SESSIONS)
    rows = results(response)
    assert [(row.username, row.retrieved_count) for row in rows] == [("alice", 3), ("alice", 1), ("bob", 0)]
    html = response.content.decode()
    for text in (
        "Started",
        "Duration",
        "Messages",
        "End reason",
        "12.3 s",
        "3 retrieved, 4 KiB; 2 deleted",
        "1 retrieved, 100 octets<",
        ">none<",
        "Connection closed",
    ):
        assert text in html


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"activity": "retrieved"}, [("alice", GUESSER), ("alice", "198.51.100.7")]),
        ({"activity": "deleted"}, [("alice", GUESSER)]),
        ({"activity": "none"}, [("bob", "198.51.100.7")]),
        ({"username": "bob"}, [("bob", "198.51.100.7")]),
        ({"peer_ip": "198.51.100.7"}, [("alice", "198.51.100.7"), ("bob", "198.51.100.7")]),
        ({"q": "203.0"}, [("alice", GUESSER)]),
        ({"q": "bob"}, [("bob", "198.51.100.7")]),
    ],
)
def test_session_record_filters_and_search(superuser_client, sessions, query, expected):
    assert [(row.username, row.peer_ip) for row in results(superuser_client.get(SESSIONS, query))] == expected


def test_session_records_are_read_only(superuser_client, staff_client, sessions):
    record = sessions.first()
    change = reverse("admin:popserver_sessionrecord_change", args=[record.pk])
    response = superuser_client.get(change)
    assert response.status_code == 200 and not has_save_button(response)
    assert "4096" in response.content.decode()
    assert superuser_client.post(change, {"end_reason": "x"}).status_code == 403
    assert superuser_client.get(reverse("admin:popserver_sessionrecord_add")).status_code == 403
    viewer = staff_client("view_sessionrecord")
    assert len(results(viewer.get(SESSIONS))) == 3
    assert viewer.get(change).status_code == 200


def test_audit_pages_need_the_view_permission(staff_client, logins, sessions):
    other = staff_client("view_apppassword")
    assert other.get(EVENTS).status_code == 403
    assert other.get(SESSIONS).status_code == 403
    assert other.get(LOCKOUTS).status_code == 403
