"""The delivery API (``popserver.mailin.delivery``) on a real database: bytes, sizes, unique ids, headers, limits."""

import hashlib
import re
import threading
from datetime import UTC, datetime

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test import override_settings

from popserver import signals
from popserver.storage.bodies import get_body_store
from popserver.mailin.delivery import deliver, parse_display_headers, resolve_mailbox
from popserver.exceptions import EmptyMessage, MessageTooLarge, UnknownRecipient
from popserver.models import Mailbox, Message, MessageChunk
from tests.conftest import CORPUS_SIZES, bodies_held, corpus_files, database_store_only

# The maildrop and delivery suites run against both body stores (issue 21).
pytestmark = pytest.mark.usefixtures("body_store")

CORPUS = corpus_files()
UID_RE = re.compile(r"[\x21-\x7e]{1,70}")
NOV_26 = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
ALICE = "Alice <alice@example.org>"
# name -> (subject, sender, date) as shown for display
CORPUS_HEADERS = {
    "01-plain-crlf.eml": ("plain", ALICE, NOV_26),
    "02-dot-lines.eml": ("dots", ALICE, NOV_26),
    "03-bare-lf.eml": ("bare lf", ALICE, NOV_26),
    "04-no-final-newline.eml": ("no final newline", ALICE, NOV_26),
    "05-8bit-utf8.eml": ("zażółć gęślą jaźń", ALICE, NOV_26),
    "06-latin1-bytes.eml": ("latin1", ALICE, NOV_26),
    "07-long-line.eml": ("long line", ALICE, NOV_26),
    "08-headers-only.eml": ("headers only", ALICE, NOV_26),
    "09-empty-body.eml": ("empty body", ALICE, NOV_26),
    "10-mixed-endings.eml": ("mixed", ALICE, NOV_26),
    "11-multipart-attachment.eml": ("attachment", "carol@example.org", None),
    "12-from-line.eml": ("mbox from line", ALICE, NOV_26),
    "13-nul-byte.eml": ("nul", ALICE, NOV_26),
    "14-top-lines.eml": ("top", ALICE, NOV_26),
}


def presented(raw: bytes) -> bytes:
    """What the corpus README says is stored: without a leading ``From `` line, bare LF as CRLF."""
    if raw.startswith(b"From "):
        raw = raw[raw.index(b"\n") + 1 :]
    return re.sub(rb"(?<!\r)\n", b"\r\n", raw)


def stored_bytes(message: Message) -> bytes:
    return b"".join(get_body_store().read_chunks(message))


def check_stored(message: Message, path) -> None:
    """Bytes, size, headers and unique id of a delivered corpus message, read back from the database."""
    message = Message.objects.get(pk=message.pk)
    raw = path.read_bytes()
    assert len(raw) == CORPUS_SIZES[path.name][0]
    assert stored_bytes(message) == presented(raw)
    assert message.size == CORPUS_SIZES[path.name][1]
    assert (message.subject, message.sender, message.date) == CORPUS_HEADERS[path.name]
    assert UID_RE.fullmatch(message.uid)


def test_the_corpus_is_all_here():
    assert [path.name for path in CORPUS] == sorted(CORPUS_SIZES) == sorted(CORPUS_HEADERS)


@pytest.mark.django_db
@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.name)
def test_corpus_message_is_stored_as_presented(make_mailbox, path):
    mailbox = make_mailbox("alice")
    message = deliver("alice", path.read_bytes())
    assert message.mailbox == mailbox
    check_stored(message, path)


@pytest.mark.django_db
def test_unique_ids_are_dovecot_style_unique_and_stable(make_mailbox):
    mailbox = make_mailbox("alice")
    delivered = [deliver("alice", path.read_bytes()) for path in CORPUS]
    mailbox.refresh_from_db()
    expected = [f"{n:08X}{mailbox.uid_validity:08X}" for n in range(1, len(CORPUS) + 1)]
    assert [message.uid for message in delivered] == expected
    assert list(Message.objects.filter(mailbox=mailbox).values_list("uid", flat=True)) == expected
    assert mailbox.next_uid == len(CORPUS) + 1
    # arrival order is the numbering order
    numbering = list(Message.objects.filter(mailbox=mailbox).values_list("pk", flat=True))
    assert numbering == [message.pk for message in delivered]


@pytest.mark.django_db
def test_unique_ids_are_never_reused(make_mailbox):
    make_mailbox("alice")
    first = deliver("alice", b"Subject: one\r\n\r\n1\r\n")
    second = deliver("alice", b"Subject: two\r\n\r\n2\r\n")
    second.delete()  # as a QUIT would
    third = deliver("alice", b"Subject: three\r\n\r\n3\r\n")
    assert len({first.uid, second.uid, third.uid}) == 3


@pytest.mark.django_db
def test_mailboxes_count_their_own_unique_ids(make_mailbox):
    make_mailbox("alice")
    make_mailbox("bob")
    assert deliver("alice", b"a\r\n").uid[:8] == "00000001"
    assert deliver("alice", b"a\r\n").uid[:8] == "00000002"
    assert deliver("bob", b"b\r\n").uid[:8] == "00000001"


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_get_distinct_unique_ids(make_mailbox):
    mailbox = make_mailbox("alice")
    threads, per_thread, errors = 4, 5, []
    start = threading.Barrier(threads)

    def run(n: int) -> None:
        try:
            start.wait(timeout=30)
            for i in range(per_thread):
                deliver("alice", f"Subject: {n}/{i}\r\n\r\nbody\r\n".encode())
        except Exception as exc:  # noqa: BLE001  (asserted below, in the test's thread)
            errors.append(exc)
        finally:
            connection.close()

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors
    uids = list(Message.objects.filter(mailbox=mailbox).values_list("uid", flat=True))
    assert len(uids) == len(set(uids)) == threads * per_thread
    mailbox.refresh_from_db()
    assert mailbox.next_uid == threads * per_thread + 1


@database_store_only
# Storage ---------------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_small_message_is_read_back_in_one_query(make_mailbox, django_assert_num_queries):
    make_mailbox("alice")
    message = deliver("alice", b"Subject: small\r\n\r\nsmall\r\n")
    assert MessageChunk.objects.filter(message=message).count() == 1
    with django_assert_num_queries(1):
        assert stored_bytes(message) == b"Subject: small\r\n\r\nsmall\r\n"


@database_store_only
@pytest.mark.django_db
@override_settings(POPSERVER_BODY_CHUNK_SIZE=1000)
def test_a_large_message_is_stored_in_chunks_and_read_one_query_each(make_mailbox, django_assert_num_queries):
    make_mailbox("alice")
    path = next(path for path in CORPUS if path.name.startswith("11-"))
    message = deliver("alice", path.read_bytes())
    chunks = list(MessageChunk.objects.filter(message=message).values_list("seq", "data"))
    expected_count = -(-CORPUS_SIZES[path.name][1] // 1000)
    assert [seq for seq, _ in chunks] == list(range(expected_count))
    assert all(len(data) <= 1000 for _, data in chunks)
    with django_assert_num_queries(expected_count):
        assert stored_bytes(message) == presented(path.read_bytes())


@pytest.mark.django_db
@pytest.mark.slow
def test_a_50_mb_message_with_bare_lf_is_accepted_by_default(make_mailbox):
    make_mailbox("alice")
    line = b"x" * 99 + b"\n"
    data = b"Subject: big\n\n" + line * 500_000  # 50 MB, bare LF
    lines = data.count(b"\n")
    expected = hashlib.sha256(data.replace(b"\n", b"\r\n")).hexdigest()
    message = deliver("alice", data)
    del data
    assert message.size == 50_000_014 + lines
    digest, total = hashlib.sha256(), 0
    for chunk in get_body_store().read_chunks(message.pk):
        assert len(chunk) <= 1024 * 1024
        digest.update(chunk)
        total += len(chunk)
    assert (total, digest.hexdigest()) == (message.size, expected)


# The envelope line, empty and large messages ---------------------------------------------------------------
@pytest.mark.django_db
def test_only_a_leading_from_line_is_dropped(make_mailbox):
    make_mailbox("alice")
    message = deliver("alice", b"From bob@example.org Thu Nov 26 10:00:00 2026\nSubject: x\n\nFrom here\n")
    assert stored_bytes(message) == b"Subject: x\r\n\r\nFrom here\r\n"
    kept = deliver("alice", b">From bob\r\nSubject: y\r\n\r\nbody\r\n")
    assert stored_bytes(kept).startswith(b">From bob\r\n")
    header = deliver("alice", b"From: bob@example.org\r\n\r\nbody\r\n")
    assert stored_bytes(header).startswith(b"From: bob@example.org\r\n")
    assert header.sender == "bob@example.org"


@pytest.mark.django_db
@pytest.mark.parametrize("data", [b"", b"From bob@example.org Thu Nov 26 10:00:00 2026\n", b"From no LF"])
def test_empty_messages_are_refused(make_mailbox, data):
    make_mailbox("alice")
    with pytest.raises(EmptyMessage):
        deliver("alice", data)
    assert not Message.objects.exists()


@pytest.mark.django_db
def test_the_size_limit_is_on_the_message_as_stored(make_mailbox):
    make_mailbox("alice")
    with override_settings(POPSERVER_MAX_MESSAGE_SIZE=10):
        assert deliver("alice", b"0123456789").size == 10  # exactly at the limit
        # the envelope line is not part of the message
        assert deliver("alice", b"From x@y Thu Nov 26 10:00:00 2026\n0123456789").size == 10
        with pytest.raises(MessageTooLarge):
            deliver("alice", b"0123456789A")
        with pytest.raises(MessageTooLarge):
            deliver("alice", b"012345678\n")  # 11 octets once the bare LF is CRLF
    assert Message.objects.count() == 2


@pytest.mark.django_db
def test_unknown_recipient_is_refused_and_stores_nothing(make_mailbox):
    make_mailbox("alice")
    for recipient in ("carol", "carol@example.org", "", "   "):
        with pytest.raises(UnknownRecipient):
            deliver(recipient, b"Subject: x\r\n\r\n")
    assert not Message.objects.exists() and not bodies_held()


# Recipients ------------------------------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize(
    "recipient",
    [
        "alice",
        "ALICE",
        " Alice ",
        "alice+lists",
        "alice@example.org",
        "Alice@EXAMPLE.org",
        "alice+x@example.org",
        "ALICE+Lists@Example.Org",
        "alias@example.net",
    ],
)
def test_recipients_resolve_case_insensitively_and_without_detail(make_mailbox, recipient):
    from popserver.models import Address

    mailbox = make_mailbox("alice", email="alice@example.org")
    Address.objects.create(mailbox=mailbox, address="Alias@Example.NET")
    assert resolve_mailbox(recipient) == mailbox
    assert deliver(recipient, b"Subject: x\r\n\r\n").mailbox == mailbox


@pytest.mark.django_db
def test_a_login_with_a_plus_is_taken_as_is_before_its_detail_is_dropped(make_mailbox):
    plain = make_mailbox("bob")
    plus = make_mailbox("bob+work")
    assert resolve_mailbox("bob+work") == plus
    assert resolve_mailbox("bob+home") == plain


@pytest.mark.django_db
def test_login_names_that_differ_only_in_case_resolve_exactly(make_mailbox):
    if connection.vendor == "mysql":
        pytest.skip("MariaDB's default collation makes auth_user.username unique whatever the case")
    lower = make_mailbox("alice")
    upper = make_mailbox("Alice")
    assert resolve_mailbox("alice") == lower
    assert resolve_mailbox("Alice") == upper
    with pytest.raises(UnknownRecipient):
        resolve_mailbox("ALICE")  # ambiguous


@pytest.mark.django_db
@pytest.mark.parametrize(
    "recipient",
    ["alice", "alice@example.org", "Alice@Example.ORG", "alias@example.net", "alice+x@example.org"],
)
def test_a_login_or_an_address_resolves_in_one_query_per_form(
    make_mailbox, recipient, django_assert_num_queries
):
    """The quick look-up (``mailboxes._quick_look_up``): one query for a login name as spelled or an address
    in any case; a ``+detail`` form costs two more (the full form is found unknown: is there a login name in
    another case? Then the name without it)."""
    from popserver.models import Address

    mailbox = make_mailbox("alice", email="alice@example.org")
    Address.objects.create(mailbox=mailbox, address="alias@example.net")
    with django_assert_num_queries(3 if "+" in recipient else 1):
        found = resolve_mailbox(recipient)
    assert found == mailbox and found.user.username == "alice"


@pytest.mark.django_db
def test_a_login_in_another_case_wins_over_an_address_of_another_mailbox(make_mailbox):
    """Login names before addresses, in any case, as before the quick look-up; an exact login before all."""
    from popserver.models import Address

    login = make_mailbox("bob@example.org")
    other = make_mailbox("carol")
    Address.objects.create(mailbox=other, address="BOB@example.org")
    assert resolve_mailbox("BOB@EXAMPLE.ORG") == login  # the login in another case, not the address
    assert resolve_mailbox("bob@example.org") == login
    Address.objects.create(mailbox=other, address="dave@example.org")
    assert resolve_mailbox("dave@example.org") == other
    assert resolve_mailbox("dave+x@example.org") == other
    with pytest.raises(UnknownRecipient):
        resolve_mailbox("nobody@example.org")


@pytest.mark.django_db
def test_a_login_without_a_mailbox_falls_back_to_an_address_or_auto_create(make_mailbox):
    from popserver.models import Address

    user = get_user_model().objects.create_user(username="erin@example.org", password="x")
    other = make_mailbox("frank")
    Address.objects.create(mailbox=other, address="erin@example.org")
    assert resolve_mailbox("erin@example.org") == other  # the login has no mailbox: the address takes it
    with override_settings(POPSERVER_AUTO_CREATE_MAILBOX=True):
        created = resolve_mailbox("Erin@example.org")
    assert created.user == user and created != other


@pytest.mark.django_db
def test_a_user_without_a_mailbox_gets_one_only_with_auto_create():
    user = get_user_model().objects.create_user(username="dave", password="x")
    with pytest.raises(UnknownRecipient):
        deliver("dave", b"Subject: x\r\n\r\n")
    assert not Mailbox.objects.exists()
    with override_settings(POPSERVER_AUTO_CREATE_MAILBOX=True):
        message = deliver("Dave", b"Subject: x\r\n\r\n")
    assert message.mailbox.user == user
    assert Mailbox.objects.get(user=user) == message.mailbox
    with pytest.raises(UnknownRecipient), override_settings(POPSERVER_AUTO_CREATE_MAILBOX=True):
        deliver("nobody-at-all", b"Subject: x\r\n\r\n")


# Signals ---------------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_message_delivered_is_sent_after_commit(make_mailbox, django_capture_on_commit_callbacks):
    mailbox = make_mailbox("alice")
    received = []

    def receiver(sender, **kwargs):
        received.append(kwargs)

    signals.message_delivered.connect(receiver)
    try:
        with django_capture_on_commit_callbacks(execute=True):
            message = deliver("alice", b"Subject: x\r\n\r\n")
            assert received == []  # not before the commit
    finally:
        signals.message_delivered.disconnect(receiver)
    assert len(received) == 1
    assert received[0]["mailbox"] == mailbox and received[0]["message"] == message


@pytest.mark.django_db(transaction=True)
def test_no_signal_after_a_rollback_and_a_failing_receiver_breaks_nothing(make_mailbox, caplog):
    make_mailbox("alice")
    received = []

    def failing(sender, **kwargs):
        received.append(kwargs["message"].pk)
        raise RuntimeError("receiver bug")

    signals.message_delivered.connect(failing)
    try:
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            deliver("alice", b"Subject: rolled back\r\n\r\n")
            1 / 0  # noqa: B018
        assert received == [] and not Message.objects.exists()
        message = deliver("alice", b"Subject: kept\r\n\r\n")
    finally:
        signals.message_delivered.disconnect(failing)
    assert received == [message.pk]
    assert Message.objects.get().subject == "kept"
    assert "receiver" in caplog.text


# Headers for display ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "subject"),
    [
        (b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= aus =?iso-8859-1?b?S/Zsbg==?=", "Grüße aus Köln"),
        (b"Subject: =?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # whitespace between encoded words is dropped
        (b"Subject: folded\r\n  over\r\n\tthree lines", "folded over three lines"),
        (b"SUBJECT : obsolete spacing", "obsolete spacing"),
        (b"Subject: =?no-such-charset?q?caf=E9?=", "caf\ufffd"),
        (b"Subject: =?utf-8?b?!!!not base64?=", "=?utf-8?b?!!!not base64?="),
        (b"Subject: =?rot13?q?abc?=", "abc"),  # not a text encoding: read as UTF-8
        (b"Subject: raw latin-1 caf\xe9", "raw latin-1 caf\ufffd"),
        (b"Subject: nul\x00and\x07bell", "nul and bell"),
        (b"Subject: " + b"y" * 5000, "y" * 1000),
        (b"X-Other: 1", ""),
    ],
)
def test_subjects_are_decoded_for_display_and_never_raise(header, subject):
    assert parse_display_headers(header + b"\r\nFrom: a@b\r\n\r\nbody\r\n").subject == subject


def test_only_the_header_section_is_read():
    headers = parse_display_headers(b"From: a@b\r\n\r\nSubject: in the body\r\n")
    assert (headers.subject, headers.sender) == ("", "a@b")
    assert parse_display_headers(b"\r\nSubject: after a blank line\r\n").subject == ""
    assert parse_display_headers(b"no colon here\r\nSubject: ok\r\n").subject == "ok"
    assert parse_display_headers(b"Subject: first\r\nSubject: second\r\n").subject == "first"


def test_sender_display_names_are_decoded():
    headers = parse_display_headers(b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.org>\r\n\r\n")
    assert headers.sender == "Jörg <jorg@example.org>"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Thu, 26 Nov 2026 10:00:00 +0000", NOV_26),
        (b"Thu, 26 Nov 2026 12:00:00 +0200", NOV_26),
        (b"26 Nov 2026 10:00:00 -0000", NOV_26),  # no zone information: taken as UTC
        (b"Thu, 26 Nov 2026 10:00:00 GMT", NOV_26),
        (b"not a date", None),
        (b"Thu, 26 Nov 2026 25:61:00 +0000", None),
        (b"1 Jan 0999 00:00:00 +0000", None),  # before MariaDB's DATETIME range
        (b"31 Dec 9999 23:30:00 -0100", None),  # past year 9999 in UTC
        (b"", None),
    ],
)
def test_dates_are_aware_or_none(value, expected):
    date = parse_display_headers(b"Date: " + value + b"\r\n\r\n").date
    assert date == expected
    assert date is None or date.tzinfo is not None


@pytest.mark.django_db
def test_garbage_headers_are_stored_safely(make_mailbox):
    make_mailbox("alice")
    data = (
        b"Subject: =?utf-8?q?broken=ZZ?= \x00\xff\xfe =?x-unknown?b?AAAA?=\r\n"
        b"From: \x80\x81 <\xc3\x28@example.org>\r\n"
        b"Date: Feb 30 99999\r\n\r\nbody\r\n"
    )
    message = Message.objects.get(pk=deliver("alice", data).pk)
    assert "\x00" not in message.subject and message.subject.startswith("broken")
    assert message.sender.endswith("@example.org>")
    assert message.date is None
    assert stored_bytes(message) == data
