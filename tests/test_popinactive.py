"""``manage.py popinactive --days N [--disable-pop3]``: mailboxes without a successful login for N days."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from popserver.mailin.delivery import deliver
from popserver.models import Mailbox

pytestmark = pytest.mark.django_db


def popinactive(*args: str) -> str:
    out = StringIO()
    call_command("popinactive", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def mailboxes(make_mailbox):
    """alice logged in yesterday, bob 40 days ago, carol never (her mailbox is 60 days old), dave never (new)."""
    now = timezone.now()
    for name, last_login, age in (
        ("alice", 1, 100),
        ("bob", 40, 100),
        ("carol", None, 60),
        ("dave", None, 2),
    ):
        mailbox = make_mailbox(name)
        Mailbox.objects.filter(pk=mailbox.pk).update(
            last_login=None if last_login is None else now - timedelta(days=last_login),
            created_at=now - timedelta(days=age),
        )
    deliver("bob", b"Subject: x\r\n\r\n" + b"x" * 3000 + b"\r\n")
    deliver("bob", b"Subject: y\r\n\r\ny\r\n")
    return {m.user.username: m for m in Mailbox.objects.select_related("user")}


def test_lists_the_mailboxes_without_a_login_for_n_days(mailboxes):
    lines = popinactive("--days", "30").splitlines()
    assert lines[0].split() == ["mailbox", "messages", "size", "last", "login", "POP3"]
    assert [line.split()[0] for line in lines[1:-1]] == ["carol", "bob"]  # never first, then the oldest
    carol, bob = lines[1].split(), lines[2].split()
    assert carol[1:] == ["0", "0", "octets", "never", "on"]
    assert bob[1:4] == ["2", "3", "KiB"] and bob[-1] == "on"
    assert bob[4] == (timezone.localtime() - timedelta(days=40)).strftime("%Y-%m-%d")
    assert lines[-1] == "2 mailboxes without a login for 30 days"
    assert "dave" not in popinactive("--days", "30")  # new: not inactive yet
    assert [line.split()[0] for line in popinactive("--days", "1").splitlines()[1:-1]] == [
        "carol",
        "dave",
        "bob",
        "alice",
    ]


def test_disable_pop3_turns_it_off_for_them_only(mailboxes):
    out = popinactive("--days", "30", "--disable-pop3")
    assert "POP3 turned off for 2 of them" in out
    enabled = dict(Mailbox.objects.values_list("user__username", "pop3_enabled"))
    assert enabled == {"alice": True, "bob": False, "carol": False, "dave": True}
    # Run again: listed as off, nothing more to turn off.
    out = popinactive("--days", "30", "--disable-pop3")
    assert out.splitlines()[1].split()[-1] == "off" and "POP3 turned off for 0 of them" in out


def test_nothing_to_list(make_mailbox):
    make_mailbox("alice")
    assert popinactive("--days", "5") == "no mailbox without a login for 5 days\n"


@pytest.mark.parametrize("args", [(), ("--days", "0"), ("--days", "x")])
def test_usage_errors(args):
    with pytest.raises(CommandError):
        call_command("popinactive", *args)
