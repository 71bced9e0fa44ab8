"""What becomes of deleted and retrieved mail (keep-deleted, expiry after retrieval, EXPIRE in CAPA, popexpire),
UTF8 (RFC 6856) and Dovecot's client workarounds."""

import io
import poplib
import socket
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from popserver.mailin.delivery import deliver
from popserver.models import Mailbox, Message
from popserver.protocol.session import Pop3Session
from popserver.storage.maildrop import open_maildrop
from popserver.storage.retention import apply_policies, forget_expire_before_login, restore_messages
from popserver.testing import MemoryAuthenticator, MemoryMaildrop
from tests.conftest import corpus_files


def msg(subject: str) -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n".encode()


@pytest.fixture
def alice(make_mailbox):
    mailbox = make_mailbox("alice", "secret")
    for n in (1, 2, 3):
        deliver("alice", msg(f"m{n}"))
    return mailbox


def uids(mailbox) -> list[str]:
    maildrop = open_maildrop(mailbox.pk)
    try:
        return [info.uid for info in maildrop.messages]
    finally:
        maildrop.release()


def quit_after(mailbox, *, delete=(), retrieve=()):
    """A session: RETR and DELE these numbers, then QUIT."""
    maildrop = open_maildrop(mailbox.pk)
    for number in retrieve:
        list(maildrop.read(number))
        maildrop.mark_retrieved(number)
    for number in delete:
        maildrop.mark_deleted(number)
    maildrop.commit()


# Keep deleted ------------------------------------------------------------------------------------------
def test_keep_deleted_hides_then_restores_with_the_same_uidl(alice):
    Mailbox.objects.filter(pk=alice.pk).update(keep_deleted_days=7)
    before = uids(alice)
    quit_after(alice, delete=[2])
    assert uids(alice) == [before[0], before[2]]  # gone for POP3 at once
    hidden = Message.objects.recently_deleted().get(mailbox=alice)
    assert hidden.uid == before[1] and hidden.deleted_at is not None
    assert restore_messages([hidden.pk]) == 1
    assert uids(alice) == before  # back in its place, same unique id: a client that kept it won't refetch


def test_kept_deleted_messages_do_not_count_against_the_quota(alice):
    from popserver.mailin.quota import usage

    Mailbox.objects.filter(pk=alice.pk).update(keep_deleted_days=7)
    quit_after(alice, delete=[1, 2])
    assert usage(alice.pk).messages == 1


def test_popexpire_purges_kept_messages_after_their_days(alice):
    Mailbox.objects.filter(pk=alice.pk).update(keep_deleted_days=7)
    quit_after(alice, delete=[1])
    now = timezone.now()
    assert apply_policies(now=now + timedelta(days=6)).purged == 0
    assert Message.objects.filter(mailbox=alice).count() == 3
    report = apply_policies(now=now + timedelta(days=7, seconds=1))
    assert (report.purged, report.expired) == (1, 0)
    assert Message.objects.filter(mailbox=alice).count() == 2
    assert apply_policies(now=now + timedelta(days=8)).purged == 0  # idempotent


def test_site_default_keep_deleted(alice, settings):
    settings.POPSERVER_KEEP_DELETED_DAYS = 3
    quit_after(alice, delete=[3])
    assert Message.objects.recently_deleted().filter(mailbox=alice).count() == 1
    Mailbox.objects.filter(pk=alice.pk).update(keep_deleted_days=0)  # the mailbox's own: delete at once
    quit_after(alice, delete=[1])
    assert Message.objects.filter(mailbox=alice).count() == 2


# Expiry after the first retrieval ------------------------------------------------------------------------
def test_first_retrieval_is_recorded_at_quit_and_at_a_drop(alice):
    quit_after(alice, retrieve=[1])
    stamped = dict(Message.objects.filter(mailbox=alice).values_list("uid", "first_retrieved_at"))
    assert sum(value is not None for value in stamped.values()) == 1
    first = Message.objects.exclude(first_retrieved_at=None).get()
    maildrop = open_maildrop(alice.pk)  # a session that retrieves 1 and 2, then drops (no QUIT)
    for number in (1, 2):
        list(maildrop.read(number))
        maildrop.mark_retrieved(number)
    maildrop.release()
    assert Message.objects.exclude(first_retrieved_at=None).count() == 2
    assert Message.objects.get(pk=first.pk).first_retrieved_at == first.first_retrieved_at  # the FIRST one


def test_retrieved_messages_expire_after_their_days_and_others_stay(alice):
    Mailbox.objects.filter(pk=alice.pk).update(expire_policy="days", expire_days=30)
    quit_after(alice, retrieve=[1, 2])
    now = timezone.now()
    assert apply_policies(now=now + timedelta(days=29)).expired == 0
    report = apply_policies(now=now + timedelta(days=30, seconds=1))
    assert report.expired == 2
    assert [m.subject for m in Message.objects.filter(mailbox=alice)] == ["m3"]


def test_expire_zero_deletes_what_the_session_retrieved_at_quit(alice):
    Mailbox.objects.filter(pk=alice.pk).update(expire_policy="days", expire_days=0)
    quit_after(alice, retrieve=[2])
    assert [m.subject for m in Message.objects.filter(mailbox=alice)] == ["m1", "m3"]


def test_never_expire_keeps_everything(alice, settings):
    settings.POPSERVER_EXPIRE_RETRIEVED_DAYS = 1
    Mailbox.objects.filter(pk=alice.pk).update(expire_policy="never")
    quit_after(alice, retrieve=[1, 2, 3])
    assert apply_policies(now=timezone.now() + timedelta(days=100)).expired == 0
    assert Message.objects.filter(mailbox=alice).count() == 3


def test_popexpire_skips_a_locked_mailbox(alice, make_mailbox, settings):
    settings.POPSERVER_EXPIRE_RETRIEVED_DAYS = 0
    bob = make_mailbox("bob")
    deliver("bob", msg("b1"))
    quit_after(bob, retrieve=[1])  # EXPIRE 0 at QUIT already deleted it...
    deliver("bob", msg("b2"))
    maildrop = open_maildrop(bob.pk)  # ...and this one is retrieved in a session that drops
    list(maildrop.read(1))
    maildrop.mark_retrieved(1)
    maildrop.release()
    # Under EXPIRE 0, what a dropped session retrieved goes after a day's grace (the client may not have it all).
    assert apply_policies().expired == 0
    Message.objects.filter(mailbox=bob).update(first_retrieved_at=timezone.now() - timedelta(days=2))
    maildrop = open_maildrop(alice.pk)  # alice's own session is reading: popexpire must not touch her
    Message.objects.filter(mailbox=alice).update(first_retrieved_at=timezone.now() - timedelta(days=2))
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command("popexpire", stdout=out, stderr=err)
    finally:
        maildrop.release()
    assert "1 retrieved messages expired, 1 locked mailboxes skipped" in out.getvalue()
    assert "skipped alice: locked" in err.getvalue()
    assert Message.objects.filter(mailbox=alice).count() == 3
    assert not Message.objects.filter(mailbox=bob).exists()
    assert Mailbox.objects.get(pk=bob.pk).lock_token == ""  # popexpire released what it locked
    assert Mailbox.objects.get(pk=bob.pk).last_login is not None  # from the sessions, not from popexpire


# EXPIRE in CAPA (RFC 2449 s.6.7), on a live server -------------------------------------------------------
def capa(client: poplib.POP3) -> list[str]:
    return [line.decode() for line in client._longcmd("CAPA")[1]]


def expire_line(lines: list[str]) -> str | None:
    return next((line for line in lines if line.startswith("EXPIRE")), None)


def test_expire_before_and_after_login(pop3_server, alice, make_mailbox):
    forget_expire_before_login()
    client = pop3_server.poplib()
    assert expire_line(capa(client)) == "EXPIRE NEVER"
    client.quit()
    bob = make_mailbox("bob", "secret")
    Mailbox.objects.filter(pk=bob.pk).update(expire_policy="days", expire_days=5)
    forget_expire_before_login()
    client = pop3_server.poplib()
    assert expire_line(capa(client)) == "EXPIRE 5 USER"  # the strictest, and it varies by user
    client.user("bob")
    client.pass_("secret")
    assert expire_line(capa(client)) == "EXPIRE 5"
    client.quit()
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    assert expire_line(capa(client)) == "EXPIRE NEVER"
    client.quit()


@override_settings(POPSERVER_EXPIRE_RETRIEVED_DAYS=0)
def test_expire_zero_is_announced_and_enforced_live(pop3_server, alice):
    forget_expire_before_login()
    client = pop3_server.poplib()
    assert expire_line(capa(client)) == "EXPIRE 0"
    client.user("alice")
    client.pass_("secret")
    client.retr(1)
    client.top(2, 0)  # TOP is not a retrieval
    client.quit()
    assert [m.subject for m in Message.objects.filter(mailbox=alice)] == ["m2", "m3"]


# UTF8 (RFC 6856), raw sockets ----------------------------------------------------------------------------
def lines(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[:count]


def read_multiline(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n.\r\n"):
        chunk = sock.recv(65536)
        assert chunk
        data += chunk
    return data


def test_utf8_command_and_utf8_credentials(pop3_server, make_mailbox):
    make_mailbox("jörg", "pässwörd")
    deliver("jörg", "From: a@example.com\r\nSubject: Grüße\r\n\r\nÄ\r\n".encode())
    sock = pop3_server.socket()
    assert lines(sock, 1)[0].startswith(b"+OK")
    sock.sendall(b"CAPA\r\n")
    assert b"\r\nUTF8 USER\r\n" in read_multiline(sock)
    sock.sendall("UTF8\r\nUSER jörg\r\nPASS pässwörd\r\n".encode())
    assert lines(sock, 3) == [b"+OK UTF8 enabled", b"+OK", b"+OK Logged in."]
    sock.sendall(b"RETR 1\r\n")
    body = read_multiline(sock)
    assert "Subject: Grüße\r\n\r\nÄ\r\n".encode() in body  # served as stored, not downgraded
    sock.sendall(b"UTF8\r\nQUIT\r\n")
    assert lines(sock, 2) == [b"-ERR UTF8 is not valid after login.", b"+OK Logging out."]
    sock.close()


def test_utf8_credentials_work_without_the_utf8_command(pop3_server, make_mailbox):
    make_mailbox("jörg", "pässwörd")
    sock = pop3_server.socket()
    lines(sock, 1)
    sock.sendall("USER jörg\r\nPASS pässwörd\r\nQUIT\r\n".encode())
    assert lines(sock, 3) == [b"+OK", b"+OK Logged in.", b"+OK Logging out."]
    sock.close()


# Client workarounds, byte for byte -----------------------------------------------------------------------
def corpus(name: str) -> bytes:
    return next(path for path in corpus_files() if path.name == name).read_bytes()


def engine(*messages: bytes, workarounds=()) -> tuple[Pop3Session, MemoryMaildrop]:
    maildrop = MemoryMaildrop(list(messages), chunk_size=7)
    session = Pop3Session(
        MemoryAuthenticator({"alice": ("secret", maildrop)}), client_workarounds=frozenset(workarounds)
    )
    b"".join(session.receive(b"USER alice\r\nPASS secret\r\n"))
    return session, maildrop


def retr(session: Pop3Session, number: int) -> bytes:
    return b"".join(session.receive(b"RETR %d\r\n" % number))


def test_outlook_no_nuls_sends_0x80_with_the_same_size():
    data = corpus("13-nul-byte.eml")
    assert b"\0" in data
    plain, _ = engine(data)
    patched, _ = engine(data, workarounds=["outlook-no-nuls"])
    assert b"".join(patched.receive(b"LIST 1\r\n")) == b"+OK 1 %d\r\n" % len(data)
    expected = retr(plain, 1).replace(b"\0", b"\x80")
    assert retr(patched, 1) == expected and b"\0" not in expected


def test_oe_ns_eoh_adds_the_blank_line_and_lists_it():
    headers_only = corpus("08-headers-only.eml")
    ordinary = corpus("01-plain-crlf.eml")
    assert b"\r\n\r\n" not in headers_only
    session, _ = engine(headers_only, ordinary, workarounds=["oe-ns-eoh"])
    listing = b"".join(session.receive(b"LIST\r\n"))
    assert listing == b"+OK 2 messages:\r\n1 %d\r\n2 %d\r\n.\r\n" % (len(headers_only) + 2, len(ordinary))
    reply = retr(session, 1)
    assert reply == b"+OK %d octets\r\n" % (len(headers_only) + 2) + headers_only + b"\r\n.\r\n"
    sent = reply.split(b"\r\n", 1)[1][: -len(b".\r\n")]
    assert len(sent) == len(headers_only) + 2  # what RETR sends is what LIST said
    assert retr(session, 2) == b"+OK %d octets\r\n" % len(ordinary) + ordinary + b".\r\n"
    top = b"".join(session.receive(b"TOP 1 0\r\n"))
    assert top == b"+OK\r\n" + headers_only + b"\r\n.\r\n"


def test_oe_ns_eoh_live_from_stored_flags(pop3_server, make_mailbox, settings):
    settings.POPSERVER_CLIENT_WORKAROUNDS = ["oe-ns-eoh", "outlook-no-nuls"]
    make_mailbox("carol", "secret")
    headers_only, with_nul = corpus("08-headers-only.eml"), corpus("13-nul-byte.eml")
    deliver("carol", headers_only)
    deliver("carol", with_nul)
    assert list(Message.objects.order_by("id").values_list("has_header_end", flat=True)) == [False, True]
    client = pop3_server.poplib()
    client.user("carol")
    client.pass_("secret")
    assert client.list()[1] == [b"1 %d" % (len(headers_only) + 2), b"2 %d" % len(with_nul)]
    assert client.retr(1)[1][-1] == b""  # the added blank line
    assert b"\x80" in b"\r\n".join(client.retr(2)[1])
    client.quit()


def test_unknown_workarounds_are_refused():
    with pytest.raises(ValueError):
        Pop3Session(MemoryAuthenticator({}), client_workarounds=frozenset({"delay-newmail"}))


def test_checks_for_the_new_settings(settings):
    from django.core.checks import run_checks

    def ids(**values):
        with override_settings(**values):
            return {m.id for m in run_checks()}

    assert "popserver.E011" in ids(POPSERVER_CLIENT_WORKAROUNDS=["nope"])
    assert "popserver.E010" in ids(POPSERVER_KEEP_DELETED_DAYS=-1)
    assert "popserver.E010" in ids(POPSERVER_EXPIRE_RETRIEVED_DAYS="soon")
    assert not {"popserver.E010", "popserver.E011"} & ids(
        POPSERVER_CLIENT_WORKAROUNDS=["oe-ns-eoh"],
        POPSERVER_EXPIRE_RETRIEVED_DAYS=30,
        POPSERVER_KEEP_DELETED_DAYS=7,
    )


def test_popexpire_locks_only_mailboxes_with_something_due(alice, settings):
    settings.POPSERVER_EXPIRE_RETRIEVED_DAYS = 30
    quit_after(alice, retrieve=[1])
    maildrop = open_maildrop(alice.pk)  # a session holds the mailbox, but nothing is due in it
    try:
        report = apply_policies()
    finally:
        maildrop.release()
    assert (report.mailboxes, report.skipped_locked, report.expired) == (1, [], 0)


def test_quit_under_expire_zero_counts_what_it_deleted(make_mailbox):
    from popserver.protocol.session import Pop3Session

    maildrop = MemoryMaildrop([msg("m1"), msg("m2"), msg("m3")])
    maildrop.expire_days = 0
    session = Pop3Session(MemoryAuthenticator({"alice": ("secret", maildrop)}), expire="0")
    out = b"".join(session.receive(b"USER alice\r\nPASS secret\r\nCAPA\r\nRETR 1\r\nDELE 3\r\nQUIT\r\n"))
    assert b"\r\nEXPIRE 0\r\n" in out and out.endswith(b"+OK Logging out, messages deleted.\r\n")
    assert maildrop.committed == (1, 3) and session.stats.deleted_count == 2


def test_a_failed_quit_is_not_logged_as_a_logout():
    from popserver.protocol.session import Pop3Session, State

    maildrop = MemoryMaildrop([msg("m1")], commit_error=RuntimeError("disk full"))
    session = Pop3Session(MemoryAuthenticator({"alice": ("secret", maildrop)}))
    out = b"".join(session.receive(b"USER alice\r\nPASS secret\r\nDELE 1\r\nQUIT\r\n"))
    assert out.endswith(b"-ERR [SYS/TEMP] Deleting the marked messages failed; none were deleted.\r\n")
    assert session.state is State.TRANSACTION and session.closed and session.quit_received


def test_the_admin_saves_only_what_its_form_changed(alice, admin_client):
    from django.urls import reverse

    url = reverse("admin:popserver_mailbox_change", args=[alice.pk])
    page = admin_client.get(url)
    assert page.status_code == 200
    deliver("alice", msg("arrived while the page was open"))  # moves next_uid on
    next_uid = Mailbox.objects.get(pk=alice.pk).next_uid
    data = {
        "user": alice.user.pk,
        "pop3_enabled": "on",
        "expire_policy": "days",
        "expire_days": "",
        "addresses-TOTAL_FORMS": "0",
        "addresses-INITIAL_FORMS": "0",
        "addresses-MIN_NUM_FORMS": "0",
        "addresses-MAX_NUM_FORMS": "1000",
        "_save": "Save",
    }
    refused = admin_client.post(url, data)
    assert refused.status_code == 200 and "Give the number of days" in refused.content.decode()
    data["expire_days"] = "14"
    assert admin_client.post(url, data).status_code == 302
    mailbox = Mailbox.objects.get(pk=alice.pk)
    assert (mailbox.expire_policy, mailbox.expire_days, mailbox.next_uid) == ("days", 14, next_uid)
