"""Logins at the authenticator: throttling, app passwords, LOGIN-DELAY, audit and signals (no sockets)."""

from datetime import UTC, datetime, timedelta

import os

import pytest
from django.contrib.auth import authenticate
from django.core.management import call_command
from django.test import override_settings
from django.urls import reverse

from popserver.logins.app_passwords import create_app_password, revoke_app_password
from popserver.logins.authenticator import DjangoAuthenticator, password_check_slots
from popserver.conf import get_setting
from popserver.exceptions import (
    AuthenticationFailed,
    LoginLockedOut,
    LoginTooSoon,
    MailboxInUse,
    TemporaryLoginFailure,
)
from popserver.models import LoginEvent, LoginThrottle, Mailbox
from popserver.signals import login_failed, login_locked_out
from popserver.logins.throttle import CacheThrottle, DatabaseThrottle
from tests import backends
from tests.conftest import (
    failing_insert,
    failing_insert_losing_its_savepoint,
    raising_after_losing_its_savepoint,
)

COUNTING = ["tests.backends.CountingBackend"]


class Clock:
    def __init__(self):
        self.now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def alice(make_mailbox):
    return make_mailbox("alice", "right", email="alice@example.com")


def login(username, password, *, ip="203.0.113.5", trusted=False, throttle=None, mechanism="USER"):
    auth = DjangoAuthenticator(ip, 4000, trusted=trusted, throttle=throttle)
    return auth(username, password, mechanism=mechanism)


@pytest.fixture
def counting_backend(settings):
    settings.AUTHENTICATION_BACKENDS = COUNTING
    backends.calls.clear()
    return backends.calls


def test_login_opens_the_maildrop_and_audits(alice):
    maildrop = login("alice", "right")
    assert Mailbox.objects.get(pk=alice.pk).lock_token == maildrop.token
    maildrop.release()
    event = LoginEvent.objects.get()
    assert (event.username, event.outcome, event.peer_ip, event.mechanism, event.tls) == (
        "alice",
        "success",
        "203.0.113.5",
        "USER",
        False,
    )


def test_login_by_address(alice, make_mailbox):
    bob = make_mailbox("bob", "right", email="bob@example.com")
    maildrop = login("ALICE@Example.com", "right")
    assert maildrop.mailbox_id == alice.pk
    maildrop.release()
    maildrop = login("bob@EXAMPLE.com", "right")
    assert maildrop.mailbox_id == bob.pk
    maildrop.release()


def test_failures_are_audited_and_signalled_without_the_password(alice):
    received = []

    def handler(**kw):
        received.append(kw)

    login_failed.connect(handler)
    try:
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong-secret", mechanism="PLAIN")
    finally:
        login_failed.disconnect(handler)
    assert received[0]["username"] == "alice" and received[0]["mechanism"] == "PLAIN"
    assert received[0]["reason"] == "credentials" and "wrong-secret" not in repr(received)
    event = LoginEvent.objects.get()
    assert event.outcome == "failed" and "wrong-secret" not in repr(event.__dict__)


def test_a_raising_receiver_changes_nothing_for_the_client(alice):
    def broken(**kwargs):
        raise RuntimeError("receiver bug")

    login_failed.connect(broken)
    try:
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong")
    finally:
        login_failed.disconnect(broken)


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=3, POPSERVER_THROTTLE_LOCKOUT=600)
def test_lockout_refuses_the_right_password_without_checking_it(alice, clock, counting_backend):
    throttle = DatabaseThrottle(clock)
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong", throttle=throttle)
    assert len(counting_backend) == 3
    with pytest.raises(LoginLockedOut) as info:
        login("alice", "right", throttle=throttle)
    assert info.value.reply.startswith("[SYS/TEMP]")
    assert len(counting_backend) == 3  # the password was not checked
    assert LoginEvent.objects.filter(outcome="locked_out").count() == 1
    # another IP is not locked out for this account
    login("alice", "right", ip="198.51.100.7", throttle=throttle).release()
    clock.advance(601)
    login("alice", "right", throttle=throttle).release()


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=3)
def test_credentials_the_engine_rejected_are_a_failed_login_without_a_check(alice, clock, counting_backend):
    """password None (undecodable bytes, a malformed SASL message): throttled and audited like a wrong one."""
    throttle = DatabaseThrottle(clock)
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            login("alice", None, throttle=throttle, mechanism="PLAIN")
    assert counting_backend == []
    assert LoginEvent.objects.filter(outcome="failed", mechanism="PLAIN").count() == 3
    with pytest.raises(LoginLockedOut):
        login("alice", "right", throttle=throttle)


@override_settings(POPSERVER_THROTTLE_IP_FAILURES=3)
def test_a_login_queued_for_a_password_slot_looks_at_the_lockout_again(alice, clock, counting_backend):
    """A burst of guesses from its IP can lock the IP out while a login waits for a password-check slot (the
    per-account count needs no second look: each attempt reserved its check before queueing)."""

    class LockedWhileQueued(DatabaseThrottle):
        checks = 0

        def locked_out(self, login_name, group, *, trusted, ip_only=False):
            self.checks += 1
            if self.checks == 1:  # the first look passes; then the other guesses of the burst land
                answer = super().locked_out(login_name, group, trusted=trusted, ip_only=ip_only)
                for n in range(3):
                    self.failed(f"guess{n}", group, trusted=trusted)
                return answer
            return super().locked_out(login_name, group, trusted=trusted, ip_only=ip_only)

    throttle = LockedWhileQueued(clock)
    auth = DjangoAuthenticator("203.0.113.5", 4000, trusted=False, throttle=throttle)
    free_slots_at_the_delay = []

    def count_free_slots():
        slots, taken = password_check_slots(), 0
        while slots.acquire(blocking=False):
            taken += 1
        for _ in range(taken):
            slots.release()
        free_slots_at_the_delay.append(taken)

    auth.before_failure_delay = count_free_slots
    with pytest.raises(LoginLockedOut):
        auth("alice", "right")
    assert throttle.checks == 2 and counting_backend == []  # no password was checked
    assert free_slots_at_the_delay == [get_setting("MAX_PASSWORD_CHECKS")]  # the slot was given back first


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=3)
def test_unknown_names_are_throttled_exactly_like_real_ones(alice, clock, counting_backend):
    throttle = DatabaseThrottle(clock)
    replies = {}
    for name in ("alice", "nobody"):
        for _ in range(3):
            with pytest.raises(AuthenticationFailed) as info:
                login(name, "wrong", throttle=throttle)
            replies.setdefault(name, set()).add(info.value.reply)
        with pytest.raises(LoginLockedOut) as info:
            login(name, "wrong", throttle=throttle)
        replies[name].add(info.value.reply)
    assert replies["alice"] == replies["nobody"]
    assert counting_backend.count("nobody") == 3


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=3)
def test_success_resets_the_account_counter(alice, clock):
    """The right password comes as the attempt that reaches the limit: its reservation began a lock-out,
    which the release in the login's transaction lifts with the count."""
    throttle = DatabaseThrottle(clock)
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong", throttle=throttle)
    assert LoginThrottle.objects.get(scope=LoginThrottle.ACCOUNT_IP).failures == 2
    login("alice", "right", throttle=throttle).release()
    assert not LoginThrottle.objects.filter(scope=LoginThrottle.ACCOUNT_IP).exists()
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong", throttle=throttle)
    login("alice", "right", throttle=throttle).release()
    for _ in range(3):  # a fresh count: the third guess starts the lock-out
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong", throttle=throttle)
    with pytest.raises(LoginLockedOut):
        login("alice", "right", throttle=throttle)


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=3, POPSERVER_THROTTLE_WINDOW=60)
def test_failures_outside_the_window_do_not_add_up(alice, clock):
    throttle = DatabaseThrottle(clock)
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong", throttle=throttle)
    clock.advance(61)
    with pytest.raises(AuthenticationFailed):
        login("alice", "wrong", throttle=throttle)
    login("alice", "right", throttle=throttle).release()


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=100, POPSERVER_THROTTLE_IP_FAILURES=5)
def test_whole_ip_lockout_and_trusted_networks_are_exempt(alice, clock):
    throttle = DatabaseThrottle(clock)
    received = []

    def handler(**kw):
        received.append(kw)

    login_locked_out.connect(handler)
    try:
        for n in range(5):
            with pytest.raises(AuthenticationFailed):
                login(f"guess{n}", "wrong", throttle=throttle)
        with pytest.raises(LoginLockedOut):
            login("alice", "right", throttle=throttle)
        for n in range(10):  # the same from a trusted network: only the per-account count applies
            with pytest.raises(AuthenticationFailed):
                login(f"guess{n}", "wrong", ip="127.0.0.1", trusted=True, throttle=throttle)
        login("alice", "right", ip="127.0.0.1", trusted=True, throttle=throttle).release()
    finally:
        login_locked_out.disconnect(handler)
    assert {r["scope"] for r in received} == {"ip"}


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=2)
def test_in_use_is_not_a_failure(alice, clock):
    throttle = DatabaseThrottle(clock)
    holder = login("alice", "right", throttle=throttle)
    for _ in range(3):
        with pytest.raises(MailboxInUse):
            login("alice", "right", throttle=throttle)
    holder.release()
    assert not LoginThrottle.objects.exists()
    login("alice", "right", throttle=throttle).release()


def test_login_delay(alice, settings):
    settings.POPSERVER_LOGIN_DELAY = 300
    login("alice", "right").release()
    with pytest.raises(LoginTooSoon) as info:
        login("alice", "right")
    assert info.value.reply.startswith("[LOGIN-DELAY]")
    assert not LoginThrottle.objects.exists()
    Mailbox.objects.filter(pk=alice.pk).update(
        last_login=Mailbox.objects.get(pk=alice.pk).last_login - timedelta(seconds=301)
    )
    login("alice", "right").release()


def test_backend_that_needs_a_request(alice, settings):
    settings.AUTHENTICATION_BACKENDS = ["tests.backends.RequestRequiredBackend"]
    maildrop = login("alice", "right")
    assert maildrop.mailbox_id == alice.pk
    maildrop.release()


@pytest.mark.parametrize("ip", ["203.0.113.5", "2001:db8::7", "198.51.100.20"])
def test_the_backend_gets_the_clients_own_address(alice, settings, ip):
    settings.AUTHENTICATION_BACKENDS = ["tests.backends.AddressRecordingBackend"]
    backends.seen_addresses.clear()
    login("alice", "right", ip=ip).release()
    with pytest.raises(AuthenticationFailed):
        login("alice", "wrong", ip=ip)
    assert backends.seen_addresses == [ip, ip]


def test_inactive_user_and_switched_off_mailbox(alice):
    Mailbox.objects.filter(pk=alice.pk).update(pop3_enabled=False)
    with pytest.raises(AuthenticationFailed):
        login("alice", "right")
    Mailbox.objects.filter(pk=alice.pk).update(pop3_enabled=True)
    alice.user.is_active = False
    alice.user.save()
    with pytest.raises(AuthenticationFailed):
        login("alice", "right")


def test_user_without_mailbox(django_user_model, settings):
    django_user_model.objects.create_user(username="carol", password="pw")
    with pytest.raises(AuthenticationFailed):
        login("carol", "pw")
    settings.POPSERVER_AUTO_CREATE_MAILBOX = True
    login("carol", "pw").release()
    assert Mailbox.objects.filter(user__username="carol").exists()


# App passwords ---------------------------------------------------------------------------------------------
def test_app_password_create_use_revoke(alice, counting_backend):
    app_password, secret = create_app_password(alice, "phone")
    assert app_password.digest != secret and secret not in app_password.digest
    login("alice", secret).release()
    login("alice", secret.upper().replace("-", "")).release()  # typed without dashes, in capitals
    assert counting_backend == []  # no argon2/backend call for an app password
    app_password.refresh_from_db()
    assert app_password.last_used_at and app_password.last_used_peer.startswith("203.0.113.5")
    revoke_app_password(app_password)
    with pytest.raises(AuthenticationFailed):
        login("alice", secret)


def test_app_passwords_never_work_for_the_site_login(alice, client):
    _, secret = create_app_password(alice, "phone")
    assert authenticate(username="alice", password=secret) is None
    assert not client.login(username="alice", password=secret)


def test_accepted_passwords_setting(alice, settings):
    _, secret = create_app_password(alice, "phone")
    settings.POPSERVER_ACCEPTED_PASSWORDS = "app"
    with pytest.raises(AuthenticationFailed):
        login("alice", "right")
    login("alice", secret).release()
    settings.POPSERVER_ACCEPTED_PASSWORDS = "account"
    with pytest.raises(AuthenticationFailed):
        login("alice", secret)
    login("alice", "right").release()


def test_apppassword_command(alice, capsys):
    call_command("apppassword", "alice", "--name", "laptop")
    secret = capsys.readouterr().out.strip()
    login("alice", secret).release()
    call_command("apppassword", "alice", "--list")
    assert "laptop\tactive" in capsys.readouterr().out
    call_command("apppassword", "alice", "--revoke", "laptop")
    with pytest.raises(AuthenticationFailed):
        login("alice", secret)


def test_app_password_views(alice, client, make_mailbox):
    url = reverse("popserver:app-passwords")
    assert client.get(url).status_code == 302  # login required
    client.force_login(alice.user)
    page = client.post(url, {"name": "tablet"})
    assert page.status_code == 200 and page["Cache-Control"] == "no-store"
    secret = page.context["secret"]
    assert secret in page.content.decode()
    login("alice", secret).release()
    assert secret not in client.get(url).content.decode()  # shown once
    app_password = alice.app_passwords.get()
    other = make_mailbox("bob", "pw")
    client.force_login(other.user)
    assert client.post(reverse("popserver:app-password-revoke", args=[app_password.pk])).status_code == 404
    client.force_login(alice.user)
    assert client.post(reverse("popserver:app-password-revoke", args=[app_password.pk])).status_code == 302
    with pytest.raises(AuthenticationFailed):
        login("alice", secret)


# Lock-out administration -----------------------------------------------------------------------------------
@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=2)
def test_poplockouts_command_lists_and_clears(alice, capsys):
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong")
    call_command("poplockouts")
    assert "alice|203.0.113.5" in capsys.readouterr().out
    call_command("poplockouts", "--clear", "alice|203.0.113.5")
    login("alice", "right").release()
    call_command("poplockouts")
    assert "no lock-outs" in capsys.readouterr().out


def test_prune_audit(alice, capsys):
    with pytest.raises(AuthenticationFailed):
        login("alice", "wrong")
    LoginEvent.objects.update(time=LoginEvent.objects.get().time - timedelta(days=100))
    login("alice", "right").release()
    call_command("prunepopaudit")
    assert "deleted 1 login event" in capsys.readouterr().out
    assert LoginEvent.objects.get().outcome == "success"


# The cache throttle on Redis -------------------------------------------------------------------------------
def redis_answers() -> bool:
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
        return True
    except Exception:  # noqa: BLE001 - no Redis, whatever the reason
        return False


@pytest.mark.skipif(
    os.environ.get("POPSERVER_REQUIRE_REDIS") != "1" and not redis_answers(),
    reason="no Redis at 127.0.0.1:6379",
)
@override_settings(
    CACHES={
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379/15",
            "KEY_PREFIX": "popserver-tests",
        }
    },
    POPSERVER_THROTTLE="popserver.logins.throttle.CacheThrottle",
    POPSERVER_THROTTLE_ACCOUNT_FAILURES=3,
    POPSERVER_THROTTLE_LOCKOUT=600,
)
def test_cache_throttle_on_redis(alice, clock):
    from django.core.cache import cache

    cache.clear()
    throttle = CacheThrottle(clock)
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong", throttle=throttle)
    with pytest.raises(LoginLockedOut):
        login("alice", "right", throttle=throttle)
    clock.advance(601)
    login("alice", "right", throttle=throttle).release()
    cache.clear()


@pytest.mark.skipif(
    os.environ.get("POPSERVER_REQUIRE_REDIS") != "1" and not redis_answers(),
    reason="no Redis at 127.0.0.1:6379",
)
@override_settings(
    CACHES={
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379/15",
            "KEY_PREFIX": "popserver-tests-cmd",
        }
    },
    POPSERVER_THROTTLE="popserver.logins.throttle.CacheThrottle",
    POPSERVER_THROTTLE_ACCOUNT_FAILURES=2,
)
def test_poplockouts_with_the_cache_throttle(alice, capsys):
    from django.core.cache import cache
    from django.core.management.base import CommandError

    cache.clear()
    for _ in range(2):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong")
    with pytest.raises(LoginLockedOut):
        login("alice", "right")
    with pytest.raises(CommandError, match="cannot be listed"):
        call_command("poplockouts")
    with pytest.raises(CommandError, match="database throttle"):
        call_command("poplockouts", "--clear-all")
    call_command("poplockouts", "--clear", "alice|203.0.113.5")
    assert "cleared 1" in capsys.readouterr().out
    login("alice", "right").release()
    cache.clear()


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=3, POPSERVER_THROTTLE_IP_FAILURES=6)
def test_guessing_at_a_locked_account_still_counts_against_the_ip(alice, clock):
    throttle = DatabaseThrottle(clock)
    for _ in range(3):
        with pytest.raises(AuthenticationFailed):
            login("alice", "wrong", throttle=throttle)
    for _ in range(3):
        with pytest.raises(LoginLockedOut):
            login("alice", "wrong", throttle=throttle)
    assert LoginThrottle.objects.get(scope="ip").locked_until is not None
    with pytest.raises(LoginLockedOut):  # the whole IP now, another account too
        login("bob", "whatever", throttle=throttle)


def test_a_name_typed_in_another_unicode_form_finds_the_account(make_mailbox):
    """NFD "jose\u0301" finds the account created as NFC "jos\u00e9" (AbstractBaseUser.normalize_username)."""
    make_mailbox("jos\u00e9", "right")
    maildrop = login("jose\u0301", "right")
    assert maildrop.mailbox_id
    maildrop.release()


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=4, POPSERVER_MAX_PASSWORD_CHECKS=8)
@pytest.mark.django_db(transaction=True)
def test_parallel_guesses_get_exactly_the_limit_of_checks(make_mailbox, counting_backend):
    """Guesses that arrive together are each reserved before their check: 4 checks, however many guess."""
    import threading

    make_mailbox("carol", "right")
    outcomes, start = [], threading.Barrier(20)

    def guess():
        start.wait(30)
        try:
            login("carol", "wrong")
        except (AuthenticationFailed, LoginLockedOut) as exc:
            outcomes.append(type(exc))
        finally:
            from django.db import connection

            connection.close()

    threads = [threading.Thread(target=guess) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes.count(AuthenticationFailed) == 4 and outcomes.count(LoginLockedOut) == 16
    assert counting_backend.count("carol") == 4


def test_a_login_commits_its_release_and_audit_with_the_lock(alice):
    """After a right password, the reservation's release and the LoginEvent are in the lock's transaction:
    all three are there afterwards, and an audit row that cannot be written breaks none of the others."""
    from django.db.models.signals import pre_save

    maildrop = login("alice", "right")
    assert Mailbox.objects.get(pk=alice.pk).lock_token == maildrop.token
    assert not LoginThrottle.objects.exists()
    assert list(LoginEvent.objects.values_list("outcome", flat=True)) == [LoginEvent.SUCCESS]
    maildrop.release()
    pre_save.connect(failing_insert, sender=LoginEvent)
    try:
        maildrop = login("alice", "right")
    finally:
        pre_save.disconnect(failing_insert, sender=LoginEvent)
    assert Mailbox.objects.get(pk=alice.pk).lock_token == maildrop.token  # the login stands
    assert not LoginThrottle.objects.exists()
    assert LoginEvent.objects.count() == 1  # the second one could not be written
    maildrop.release()


def test_a_login_whose_lock_transaction_is_lost_in_the_audit_row_fails(alice):
    """The LoginEvent's savepoint cannot be rolled back (the transaction is lost, as after a deadlock): Django's
    atomic() would then roll the lock back without raising, and two sessions could hold one mailbox. The login
    fails with [SYS/TEMP], holds nothing, and its right password's reservation is given back."""
    from django.db.models.signals import pre_save

    from popserver.storage.lock import _live

    def once(sender, **kwargs):  # the lock's audit row only: the ERROR row after it is written
        pre_save.disconnect(once, sender=LoginEvent)
        failing_insert_losing_its_savepoint(sender, **kwargs)

    live_before = set(_live)
    pre_save.connect(once, sender=LoginEvent)
    try:
        with pytest.raises(TemporaryLoginFailure) as refused:
            login("alice", "right")
    finally:
        pre_save.disconnect(once, sender=LoginEvent)
    assert refused.value.reply.startswith("[SYS/TEMP]")
    assert Mailbox.objects.get(pk=alice.pk).lock_token == "" and set(_live) == live_before
    assert not LoginThrottle.objects.exists()
    assert list(LoginEvent.objects.values_list("outcome", "reason")) == [(LoginEvent.ERROR, "database")]
    login("alice", "right").release()


@override_settings(POPSERVER_THROTTLE_ACCOUNT_FAILURES=3)
def test_any_failure_of_the_lock_transaction_gives_the_reservation_back(alice):
    """Not only a database error: whatever escapes the lock's transaction, a right password's reservation
    does not count towards a lock-out."""
    from django.db.models.signals import pre_save

    pre_save.connect(raising_after_losing_its_savepoint, sender=LoginEvent)
    try:
        for _ in range(3):
            with pytest.raises(RuntimeError):
                login("alice", "right")
    finally:
        pre_save.disconnect(raising_after_losing_its_savepoint, sender=LoginEvent)
    assert Mailbox.objects.get(pk=alice.pk).lock_token == ""
    assert not LoginThrottle.objects.exists()
    login("alice", "right").release()  # not locked out


def test_pop3_switched_off_during_the_password_check_is_honoured(alice):
    """The login read the mailbox (POP3 on), then an admin switched POP3 off before the lock was taken: the
    lock's transaction sees it, and the login fails without taking the lock."""
    from popserver.storage.maildrop import open_maildrop

    read_by_the_login = Mailbox.objects.get(pk=alice.pk)
    Mailbox.objects.filter(pk=alice.pk).update(pop3_enabled=False)
    written = []
    with pytest.raises(AuthenticationFailed):
        open_maildrop(alice.pk, mailbox=read_by_the_login, in_lock_transaction=lambda: written.append(1))
    assert written == [] and Mailbox.objects.get(pk=alice.pk).lock_token == ""
    Mailbox.objects.filter(pk=alice.pk).update(pop3_enabled=True)
    open_maildrop(alice.pk, mailbox=read_by_the_login).release()
