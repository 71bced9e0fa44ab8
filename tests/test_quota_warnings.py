"""Quota warnings: a delivery that takes a mailbox across a share of a limit (POPSERVER_QUOTA_WARNINGS) puts one
warning into it, once per upward crossing, race-free; the warning never counts against the quota and never
causes a refusal; the quota_warning signal fires. Run on SQLite, PostgreSQL and MariaDB (DATABASE_URL)."""

import threading
from email import message_from_bytes, policy

import pytest
from django.db import connections
from django.dispatch import receiver

from popserver import signals
from popserver.exceptions import QuotaExceeded
from popserver.mailin import quota
from popserver.mailin.delivery import count_delivery, deliver, prepare_message, store_prepared
from popserver.models import DeliveryCount, Message
from popserver.storage.bodies import get_body_store
from popserver.storage.deletion import delete_messages

KIB = 1024


def message(size: int, subject: str = "m") -> bytes:
    """A message of exactly ``size`` octets as stored."""
    head = f"Subject: {subject}\r\n\r\n".encode()
    return head + b"x" * (size - len(head) - 2) + b"\r\n"


def warnings_in(mailbox) -> list[Message]:
    return list(Message.objects.filter(mailbox=mailbox, server_notice=True).order_by("id"))


def parsed(stored: Message):
    return message_from_bytes(b"".join(get_body_store().read_chunks(stored.pk)), policy=policy.default)


@pytest.fixture
def caught():
    """The quota_warning signals sent during the test, as dicts of their arguments."""
    sent = []

    @receiver(signals.quota_warning, weak=False)
    def record(sender, **kwargs):
        sent.append(kwargs)

    yield sent
    signals.quota_warning.disconnect(record)


# What crossing means ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "before,size,limits,expected",
    [
        ((0, 700), 100, (1000, 0), (80, "octets")),  # 70 % -> 80 %: crosses 80 exactly at it
        ((0, 800), 100, (1000, 0), None),  # already at 80 %: no new crossing
        ((0, 700), 260, (1000, 0), (95, "octets")),  # 70 % -> 96 %: both at once, the highest only
        ((0, 700), 10, (1000, 0), None),  # 70 % -> 71 %
        ((7, 0), 10, (0, 10), (80, "messages")),  # 7 -> 8 of 10 messages
        ((7, 790), 10, (1000, 10), (80, "octets")),  # both units cross 80: the size is named
        ((0, 0), 100, (0, 0), None),  # unlimited
    ],
)
def test_crossing(before, size, limits, expected):
    found = quota.crossing(quota.Usage(*before), size, quota.Limits(*limits), thresholds=[80, 95])
    assert (found and (found.threshold, found.unit)) == expected


# Delivered into the mailbox --------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)  # the signal is sent on commit
def test_crossing_80_percent_delivers_one_warning_after_the_message(make_mailbox, caught):
    mailbox = make_mailbox("alice", email="alice@example.org", quota_bytes=10 * KIB)
    deliver("alice", message(7 * KIB))
    assert warnings_in(mailbox) == [] and caught == []
    crossing = deliver("alice", message(KIB + 200))  # 70 % -> 81.95 %
    [warning] = warnings_in(mailbox)
    assert warning.pk > crossing.pk and warning.uid > crossing.uid  # the next unique id, listed after it
    assert warning.subject == "Your mailbox is 81 % full"
    mail = parsed(warning)
    assert mail["To"] == "alice@example.org" and mail["Auto-Submitted"] == "auto-generated"
    body = mail.get_content()
    assert "has reached 81 % of its quota: it holds 8.2 KiB of at most 10 KiB" in body
    assert "delete messages from the server once it has downloaded them" in body  # what to do
    assert "keep trying for a few days" in body  # over quota mail waits (QUOTA_EXCEEDED_PERMANENT off)
    assert warning.size == len(b"".join(get_body_store().read_chunks(warning.pk)))
    assert caught == [
        {
            "signal": signals.quota_warning,
            "mailbox": mailbox,
            "unit": "octets",
            "threshold": 80,
            "used": 7 * KIB + KIB + 200,
            "limit": 10 * KIB,
            "message": warning,
        }
    ]


@pytest.mark.django_db(transaction=True)
def test_once_per_crossing_then_again_at_95_and_after_dropping_below(make_mailbox, caught):
    mailbox = make_mailbox("alice", quota_messages=20)
    for n in range(1, 21):  # 16 of 20 is 80 %, 19 of 20 is 95 %
        deliver("alice", message(100, f"m{n}"))
    assert [(w["threshold"], w["used"]) for w in caught] == [(80, 16), (95, 19)]
    assert [w.subject for w in warnings_in(mailbox)] == [
        "Your mailbox is 80 % full",
        "Your mailbox is 95 % full",
    ]
    # The user downloads and deletes (as QUIT does) down to 10 messages: crossing 80 % again warns again.
    ordinary = Message.objects.filter(mailbox=mailbox, server_notice=False).order_by("id")
    delete_messages(list(ordinary.values_list("pk", flat=True)[:10]))
    caught.clear()
    for n in range(6):
        deliver("alice", message(100, f"again{n}"))
    assert [(w["threshold"], w["used"]) for w in caught] == [(80, 16)]


@pytest.mark.django_db
def test_the_warning_does_not_count_against_the_quota(make_mailbox):
    mailbox = make_mailbox("alice", quota_messages=5, quota_bytes=100 * KIB)
    for n in range(4):
        deliver("alice", message(100, f"m{n}"))  # the 4th is 80 % of 5 messages
    assert len(warnings_in(mailbox)) == 1
    assert quota.usage(mailbox.pk) == quota.Usage(4, 400)
    deliver("alice", message(100, "fifth"))  # the warning takes no place: the 5th fits (95 % crossed)
    assert len(warnings_in(mailbox)) == 2
    with pytest.raises(QuotaExceeded, match="holds 5 of at most 5 messages"):
        deliver("alice", message(100, "sixth"))
    assert Message.objects.filter(mailbox=mailbox).count() == 7  # five messages, two warnings


@pytest.mark.django_db
def test_a_warning_never_causes_a_refusal(make_mailbox):
    """Filling the mailbox to the last octet is accepted, and its warning stored beside it."""
    mailbox = make_mailbox("alice", quota_bytes=2 * KIB)
    deliver("alice", message(KIB))
    deliver("alice", message(KIB))  # 100 %: crosses 80 and 95 at once
    [warning] = warnings_in(mailbox)
    assert warning.subject == "Your mailbox is 100 % full"
    assert "it holds 2 KiB of at most 2 KiB" in parsed(warning).get_content()
    with pytest.raises(QuotaExceeded):
        deliver("alice", message(100))
    assert len(warnings_in(mailbox)) == 1  # a refused delivery crosses nothing


@pytest.mark.django_db
def test_no_warnings_without_a_limit_or_when_turned_off(make_mailbox, settings, caught):
    make_mailbox("alice")
    bob = make_mailbox("bob", quota_messages=2)
    for _ in range(3):
        deliver("alice", message(100))
    settings.POPSERVER_QUOTA_WARNINGS = []
    deliver("bob", message(100))
    deliver("bob", message(100))
    assert caught == [] and not Message.objects.filter(server_notice=True).exists()
    assert Message.objects.filter(mailbox=bob).count() == 2


@pytest.mark.django_db(transaction=True)
def test_signal_only_when_the_message_is_turned_off(make_mailbox, settings, caught):
    settings.POPSERVER_QUOTA_WARNING_MESSAGE = False
    mailbox = make_mailbox("alice", quota_messages=5)
    for _ in range(4):
        deliver("alice", message(100))
    assert warnings_in(mailbox) == []
    assert [(w["threshold"], w["unit"], w["used"], w["limit"], w["message"]) for w in caught] == [
        (80, "messages", 4, 5, None)
    ]


@pytest.mark.django_db
def test_the_site_overrides_the_templates(make_mailbox, settings, tmp_path):
    folder = tmp_path / "popserver"
    folder.mkdir()
    (folder / "quota_warning_subject.txt").write_text("Postfach zu {{ percent }} % voll\n")
    (folder / "quota_warning.txt").write_text("{{ used_text }} von {{ limit_text }} ({{ unit }}).\n")
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path, *settings.TEMPLATES[0]["DIRS"]]}]
    mailbox = make_mailbox("alice", quota_messages=5)
    for _ in range(4):
        deliver("alice", message(100))
    [warning] = warnings_in(mailbox)
    assert warning.subject == "Postfach zu 80 % voll"
    assert parsed(warning).get_content() == "4 messages von 5 messages (messages).\r\n"  # as stored: CRLF


@pytest.mark.django_db(transaction=True)
def test_imports_neither_warn_nor_count(make_mailbox, caught):
    mailbox = make_mailbox("alice", quota_messages=5)
    for n in range(5):
        store_prepared(mailbox, prepare_message(message(100)), uid=f"imported-{n}", send_signal=False)
    assert caught == [] and warnings_in(mailbox) == []
    assert not DeliveryCount.objects.exists()


@pytest.mark.django_db(transaction=True)  # counted after the commit
def test_deliveries_are_counted_per_hour(make_mailbox):
    from datetime import UTC, datetime

    make_mailbox("alice")
    deliver("alice", message(100))
    deliver("alice", message(300))
    [row] = DeliveryCount.objects.all()
    assert (row.messages, row.octets) == (2, 400)
    assert row.hour.minute == row.hour.second == row.hour.microsecond == 0
    count_delivery(50, now=datetime(2026, 1, 2, 3, 45, tzinfo=UTC))
    assert DeliveryCount.objects.get(hour=datetime(2026, 1, 2, 3, tzinfo=UTC)).messages == 1


# Races ----------------------------------------------------------------------------------------------------------
def deliver_at_once(recipient: str, count: int) -> list[str]:
    """``count`` deliveries to ``recipient`` started together in threads; what became of each."""
    start = threading.Barrier(count)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        try:
            start.wait(timeout=30)
            try:
                deliver(recipient, message(100, f"racer {n}"))
                result = "stored"
            except QuotaExceeded:
                result = "refused"
            except Exception as exc:  # noqa: BLE001  (reported in the assertion)
                result = f"error: {exc!r}"
            with lock:
                outcomes.append(result)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=100)
    return outcomes


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("round_", range(3))
def test_two_deliveries_racing_across_the_threshold_warn_once(make_mailbox, caught, round_):
    mailbox = make_mailbox(f"racer{round_}", quota_messages=10)
    for _ in range(7):
        deliver(f"racer{round_}", message(100))
    assert deliver_at_once(f"racer{round_}", 2) == ["stored", "stored"]  # 7 -> 9 of 10: across 80 %
    assert len(warnings_in(mailbox)) == 1
    assert [(w["threshold"], w["used"]) for w in caught] == [(80, 8)]


@pytest.mark.django_db(transaction=True)
def test_many_racing_deliveries_warn_once_per_share_and_never_pass_the_quota(make_mailbox, caught):
    mailbox = make_mailbox("crowd", quota_messages=20)
    for _ in range(14):
        deliver("crowd", message(100))
    outcomes = deliver_at_once("crowd", 8)  # 14 + 8 = 22 tries for 6 free places: 16 (80 %), 19 (95 %)
    assert sorted(outcomes) == ["refused"] * 2 + ["stored"] * 6, outcomes
    assert [(w["threshold"], w["used"]) for w in caught] == [(80, 16), (95, 19)]
    assert len(warnings_in(mailbox)) == 2
    assert Message.objects.filter(mailbox=mailbox, server_notice=False).count() == 20


@pytest.mark.django_db(transaction=True)
def test_a_broken_warning_template_never_refuses_mail(make_mailbox, settings, tmp_path, caught, caplog):
    folder = tmp_path / "popserver"
    folder.mkdir()
    (folder / "quota_warning.txt").write_text("{% if %}broken\n")
    settings.TEMPLATES = [{**settings.TEMPLATES[0], "DIRS": [tmp_path, *settings.TEMPLATES[0]["DIRS"]]}]
    mailbox = make_mailbox("alice", quota_messages=5)
    for _ in range(4):
        deliver("alice", message(100))
    assert Message.objects.filter(mailbox=mailbox).count() == 4 and warnings_in(mailbox) == []
    assert "could not write the quota warning" in caplog.text
    assert [(w["threshold"], w["message"]) for w in caught] == [(80, None)]  # the signal still says so
