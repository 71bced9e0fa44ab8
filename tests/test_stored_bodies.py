"""Bodies in a Django storage, once per content (issue 21): references, removal, errors, popgc, popmovebodies,
the system checks, and S3 through django-storages against moto's server.

The maildrop and delivery suites also run against this store (the ``body_store`` fixture); crash tests with
kill -9 are in test_stored_bodies_crash.py.
"""

import hashlib
import logging
import os
import time
from io import StringIO
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from popserver.mailin.delivery import deliver
from popserver.models import Message, MessageChunk, StoredBody
from popserver.storage.bodies import body_storage, get_body_store, object_name, read_message
from popserver.storage.deletion import delete_messages, empty_mailbox
from popserver.storage.maildrop import open_maildrop
from tests.conftest import STORAGE_STORE

BODY = b"From: a@example.org\r\nSubject: shared\r\n\r\n" + b"the same bytes for everyone\r\n" * 100


@pytest.fixture
def storage_store(settings, tmp_path):
    """New bodies go to a FileSystemStorage in a temporary folder; returns that folder."""
    settings.POPSERVER_BODY_STORE = STORAGE_STORE
    settings.STORAGES = {
        **settings.STORAGES,
        "popserver": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "bodies")},
        },
    }
    return tmp_path / "bodies"


def objects_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def object_path(folder: Path, data: bytes) -> Path:
    return folder / object_name(hashlib.sha256(data).hexdigest())


def body_of(message) -> bytes:
    return b"".join(read_message(message))


def session_on(maildrop):
    from popserver.protocol.session import Pop3Session

    session = Pop3Session(lambda username, password, *, mechanism: maildrop)
    assert b"".join(session.receive(b"USER alice\r\nPASS x\r\n")).endswith(b"+OK Logged in.\r\n")
    return session


# Content addressing and references ---------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_body_is_an_object_named_by_its_hash_with_no_chunks(storage_store, make_mailbox):
    make_mailbox("alice")
    message = deliver("alice", BODY)
    path = object_path(storage_store, BODY)
    assert path.read_bytes() == BODY
    assert path.relative_to(storage_store).parts[:2] == (path.name[:2], path.name[2:4])  # sharded
    assert message.chunk_count == 0 and not MessageChunk.objects.exists()
    assert StoredBody.objects.get().refs == 1 and message.stored_body.size == len(BODY)
    assert body_of(message) == BODY
    assert not list(storage_store.rglob(".incoming-*"))  # the temporary file was renamed into place


@pytest.mark.django_db(transaction=True)
def test_one_object_for_100_recipients_through_the_email_backend(storage_store, settings, make_mailbox):
    from django.core.mail import send_mail

    settings.EMAIL_BACKEND = "popserver.mailin.email_backend.LocalDeliveryBackend"
    mailboxes = [make_mailbox(f"user{n}", email=f"user{n}@example.org") for n in range(100)]
    send_mail(
        "To everyone",
        "One body, a hundred mailboxes.",
        "site@example.org",
        [f"user{n}@example.org" for n in range(100)],
    )
    assert Message.objects.count() == 100
    assert StoredBody.objects.count() == 1 and StoredBody.objects.get().refs == 100
    assert len(objects_in(storage_store)) == 1
    for mailbox in mailboxes[:99]:  # each deletes it at QUIT
        maildrop = open_maildrop(mailbox.pk)
        maildrop.mark_deleted(1)
        maildrop.commit()
    assert StoredBody.objects.get().refs == 1 and len(objects_in(storage_store)) == 1
    last = Message.objects.get()
    assert b"One body, a hundred mailboxes." in body_of(last)
    empty_mailbox(last.mailbox_id)
    assert not StoredBody.objects.exists() and objects_in(storage_store) == []


@pytest.mark.django_db
def test_other_bytes_are_another_object_and_the_same_bytes_again_are_not(storage_store, make_mailbox):
    make_mailbox("alice")
    make_mailbox("bob")
    first, again = deliver("alice", BODY), deliver("bob", BODY)
    other = deliver("alice", BODY + b"one more line\r\n")
    assert first.stored_body_id == again.stored_body_id != other.stored_body_id
    assert sorted(StoredBody.objects.values_list("refs", flat=True)) == [1, 2]
    assert len(objects_in(storage_store)) == 2


@pytest.mark.django_db(transaction=True)
def test_objects_go_after_the_commit_and_stay_if_it_fails(storage_store, make_mailbox, monkeypatch):
    mailbox = make_mailbox("alice")
    message = deliver("alice", BODY)
    path = object_path(storage_store, BODY)
    from popserver.storage import deletion

    original = deletion.Message.objects.filter

    def failing(*args, **kwargs):
        raise RuntimeError("the database failed in the middle")

    monkeypatch.setattr(deletion.Message.objects, "filter", failing)
    with pytest.raises(RuntimeError):
        delete_messages([message.pk], mailbox_id=mailbox.pk)
    monkeypatch.setattr(deletion.Message.objects, "filter", original)
    assert path.exists() and StoredBody.objects.get().refs == 1 and body_of(message) == BODY
    assert delete_messages([message.pk], mailbox_id=mailbox.pk) == 1
    assert not path.exists() and not StoredBody.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_deleting_a_user_counts_its_bodies_down(storage_store, make_mailbox):
    alice, bob = make_mailbox("alice"), make_mailbox("bob")
    deliver("alice", BODY)
    deliver("bob", BODY)
    deliver("alice", b"Subject: only alice\r\n\r\nmine\r\n")
    alice.user.delete()  # the mailbox and its messages go by cascade
    assert StoredBody.objects.get().refs == 1 and len(objects_in(storage_store)) == 1
    assert body_of(Message.objects.get(mailbox=bob)) == BODY


# A body that cannot be read --------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_missing_object_is_sys_temp_for_that_retr_with_one_log_line(storage_store, make_mailbox, caplog):
    mailbox = make_mailbox("alice")
    deliver("alice", b"Subject: one\r\n\r\nfirst\r\n")
    deliver("alice", BODY)
    object_path(storage_store, BODY).unlink()
    maildrop = open_maildrop(mailbox.pk)
    session = session_on(maildrop)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="popserver"):
        out = b"".join(session.receive(b"RETR 2\r\nTOP 2 0\r\nRETR 1\r\n"))
    error = b"-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.\r\n"
    assert out.startswith(error + error + b"+OK 23 octets\r\n")
    lines = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)  # one line per command, no traceback
    assert object_name(hashlib.sha256(BODY).hexdigest()) in lines[0].getMessage()
    assert not session.closed
    maildrop.release()
    assert Message.objects.count() == 2  # nothing deleted or hidden


@pytest.mark.django_db
def test_a_truncated_object_is_sys_temp_or_ends_the_session_without_the_terminator(
    storage_store, make_mailbox
):
    mailbox = make_mailbox("alice")
    deliver("alice", BODY)
    big = b"Subject: big\r\n\r\n" + b"0123456789abcdef\r\n" * 200_000  # 3.6 MB: four pieces
    deliver("alice", big)
    object_path(storage_store, BODY).write_bytes(BODY[:100])  # found short before anything went out
    object_path(storage_store, big).write_bytes(big[: 2 * 1024 * 1024 + 7])  # found short after 2 MiB went
    maildrop = open_maildrop(mailbox.pk)
    session = session_on(maildrop)
    assert b"".join(session.receive(b"RETR 1\r\n")).startswith(b"-ERR [SYS/TEMP]")
    out = b"".join(session.receive(b"RETR 2\r\nNOOP\r\n"))
    assert out.startswith(b"+OK") and not out.endswith(b".\r\n") and session.closed
    maildrop.release()
    assert Message.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_missing_object_through_a_live_server(storage_store, pop3_server, make_mailbox):
    import poplib

    make_mailbox("alice")
    deliver("alice", BODY)
    object_path(storage_store, BODY).unlink()
    client = pop3_server.poplib()
    client.user("alice")
    client.pass_("secret")
    with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
        client.retr(1)
    assert client.stat()[0] == 1
    client.quit()
    assert Message.objects.count() == 1


@pytest.mark.django_db
def test_a_large_body_streams_in_pieces(storage_store, make_mailbox):
    make_mailbox("alice")
    data = b"Subject: big\r\n\r\n" + os.urandom(3 * 1024 * 1024 + 5).hex().encode()[: 3 * 1024 * 1024 + 5]
    message = deliver("alice", data)
    pieces = list(read_message(message))
    assert b"".join(pieces) == data and max(map(len, pieces)) == 1024 * 1024 and len(pieces) == 4


# popgc -------------------------------------------------------------------------------------------------------
def popgc(*args: str) -> str:
    out = StringIO()
    call_command("popgc", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.django_db(transaction=True)
def test_popgc_removes_old_orphans_keeps_young_ones_and_is_idempotent(storage_store, make_mailbox):
    make_mailbox("alice")
    message = deliver("alice", BODY)
    store = get_body_store()
    store.stage(b"orphan one\r\n")  # a delivery that died before its row
    store.stage(b"orphan two\r\n")
    old, young = object_path(storage_store, b"orphan one\r\n"), object_path(storage_store, b"orphan two\r\n")
    age(old, 7200)
    leftover = storage_store / "ab" / ".incoming-x"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half")
    age(leftover, 7200)
    assert "1 object(s) without a row would be removed" in popgc("--dry-run")
    assert old.exists() and leftover.exists()
    report = popgc()
    assert "1 object(s) without a row removed, 1 younger than 3600 s left alone" in report
    assert "1 interrupted write(s) removed" in report
    assert not old.exists() and young.exists() and not leftover.exists()
    assert body_of(message) == BODY and not StoredBody.objects.filter(refs=0).exists()
    assert popgc("--grace", "0").startswith(
        "0 reference count(s) corrected, 0 unreferenced body(ies) removed, 1 "
    )
    assert popgc("--grace", "0").startswith(
        "0 reference count(s) corrected, 0 unreferenced body(ies) removed, 0 "
    )
    assert objects_in(storage_store) == [object_path(storage_store, BODY)]


@pytest.mark.django_db(transaction=True)
def test_popgc_recounts_after_other_code_deleted_messages(storage_store, make_mailbox):
    make_mailbox("alice")
    make_mailbox("bob")
    first, second = deliver("alice", BODY), deliver("bob", BODY)
    Message.objects.filter(pk=first.pk).delete()  # not through popserver's delete path
    assert StoredBody.objects.get().refs == 2
    assert popgc().startswith("1 reference count(s) corrected, 0 unreferenced")
    assert StoredBody.objects.get().refs == 1
    Message.objects.filter(pk=second.pk).delete()
    assert popgc().startswith("1 reference count(s) corrected, 1 unreferenced body(ies) removed")
    assert not StoredBody.objects.exists() and objects_in(storage_store) == []


@pytest.mark.django_db(transaction=True)
def test_a_delivery_after_an_unreferenced_removal_writes_the_object_again(storage_store, make_mailbox):
    make_mailbox("alice")
    message = deliver("alice", BODY)
    # A removal that deleted the object and crashed before deleting the row: refs 0, no object.
    StoredBody.objects.update(refs=0)
    Message.objects.filter(pk=message.pk).update(stored_body=None)
    Message.objects.filter(pk=message.pk).delete()
    object_path(storage_store, BODY).unlink()
    again = deliver("alice", BODY)
    assert object_path(storage_store, BODY).read_bytes() == BODY and body_of(again) == BODY
    assert StoredBody.objects.get().refs == 1


# popmovebodies -----------------------------------------------------------------------------------------------
def corpus_messages() -> list[bytes]:
    from tests.conftest import corpus_files

    return [path.read_bytes() for path in corpus_files()]


@pytest.mark.django_db(transaction=True)
def test_popmovebodies_there_and_back_keeps_every_byte(storage_store, settings, make_mailbox):
    settings.POPSERVER_BODY_STORE = "popserver.storage.bodies.DatabaseBodyStore"
    settings.POPSERVER_BODY_CHUNK_SIZE = 1000
    make_mailbox("alice")
    make_mailbox("bob")
    for data in corpus_messages():
        deliver("alice", data)
        deliver("bob", data)
    before = {m.pk: body_of(m) for m in Message.objects.all()}
    out = StringIO()
    call_command("popmovebodies", "--to", "storage", "--batch", "5", stdout=out, stderr=StringIO())
    assert f"{len(before)} message(s) moved to the storage store" in out.getvalue()
    assert not MessageChunk.objects.exists() and not Message.objects.filter(stored_body=None).exists()
    assert StoredBody.objects.count() == len(before) // 2  # the same bytes for alice and bob: one object
    assert {m.pk: body_of(m) for m in Message.objects.all()} == before
    call_command("popmovebodies", "--to", "database", stdout=StringIO(), stderr=StringIO())
    assert not StoredBody.objects.exists() and objects_in(storage_store) == []
    assert {m.pk: body_of(m) for m in Message.objects.all()} == before
    assert Message.objects.filter(chunk_count__gt=1).exists()


@pytest.mark.django_db(transaction=True)
def test_popmovebodies_skips_a_mailbox_in_use_and_resumes(storage_store, settings, make_mailbox):
    settings.POPSERVER_BODY_STORE = "popserver.storage.bodies.DatabaseBodyStore"
    alice, bob = make_mailbox("alice"), make_mailbox("bob")
    for n in range(3):
        deliver("alice", f"Subject: {n}\r\n\r\nalice\r\n".encode())
        deliver("bob", f"Subject: {n}\r\n\r\nbob\r\n".encode())
    session = open_maildrop(alice.pk)  # a POP3 session holds alice's mailbox
    err = StringIO()
    with pytest.raises(CommandError) as raised:
        call_command("popmovebodies", "--to", "storage", stdout=StringIO(), stderr=err)
    assert raised.value.returncode == 75 and "skipped alice: in use" in err.getvalue()
    assert Message.objects.filter(mailbox=bob, stored_body=None).count() == 0
    assert Message.objects.filter(mailbox=alice, stored_body=None).count() == 3
    assert [b"".join(session.read(n)) for n in (1, 2, 3)] == [
        f"Subject: {n}\r\n\r\nalice\r\n".encode() for n in range(3)
    ]  # the session's snapshot still reads its bodies where it saw them
    session.release()
    call_command("popmovebodies", "--to", "storage", stdout=StringIO(), stderr=StringIO())
    assert not Message.objects.filter(stored_body=None).exists()


@pytest.mark.django_db(transaction=True)
def test_popmovebodies_interrupted_between_batches_resumes(
    storage_store, settings, make_mailbox, monkeypatch
):
    from popserver.storage import body_upkeep

    settings.POPSERVER_BODY_STORE = "popserver.storage.bodies.DatabaseBodyStore"
    make_mailbox("alice")
    for n in range(10):
        deliver("alice", f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
    calls = []
    original = body_upkeep._to_storage

    def interrupted(rows, report):
        calls.append(len(rows))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the second batch
        original(rows, report)

    monkeypatch.setattr(body_upkeep, "_to_storage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        body_upkeep.move_bodies("storage", batch_messages=3)
    assert Message.objects.exclude(stored_body=None).count() == 3  # the first batch, whole
    assert not Message.objects.get(subject="3").stored_body_id and MessageChunk.objects.count() == 7
    monkeypatch.setattr(body_upkeep, "_to_storage", original)
    report = body_upkeep.move_bodies("storage", batch_messages=3)
    assert report.moved == 7 and not Message.objects.filter(stored_body=None).exists()
    assert [body_of(m) for m in Message.objects.order_by("pk")] == [
        f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() for n in range(10)
    ]


# System checks -----------------------------------------------------------------------------------------------
def check_ids(**kwargs) -> set[str]:
    return {message.id for message in run_checks(**kwargs) if message.id.startswith("popserver.")}


def test_the_storage_store_needs_its_own_storage(settings, tmp_path):
    settings.POPSERVER_BODY_STORE = STORAGE_STORE
    settings.STORAGES = {k: v for k, v in settings.STORAGES.items() if k != "popserver"}
    assert "popserver.E040" in check_ids()
    settings.POPSERVER_BODY_STORAGE = "default"
    assert "popserver.E041" in check_ids()
    settings.POPSERVER_BODY_STORAGE = "bodies"
    settings.STORAGES = {**settings.STORAGES, "bodies": dict(settings.STORAGES["default"])}
    assert "popserver.E041" in check_ids()  # the same place as the default storage
    settings.MEDIA_ROOT = str(tmp_path / "media")
    settings.STORAGES = {
        **settings.STORAGES,
        "bodies": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(tmp_path / "media" / "bodies")},
        },
    }
    assert "popserver.E041" in check_ids()  # under MEDIA_ROOT


def test_the_database_store_needs_no_storage(settings):
    settings.POPSERVER_BODY_STORE = "popserver.storage.bodies.DatabaseBodyStore"
    settings.STORAGES = {k: v for k, v in settings.STORAGES.items() if k != "popserver"}
    assert not {"popserver.E040", "popserver.E041"} & check_ids()


@pytest.mark.django_db
def test_stored_bodies_without_their_storage_are_an_error_with_the_database_tag(
    storage_store, settings, make_mailbox
):
    make_mailbox("alice")
    deliver("alice", BODY)
    settings.POPSERVER_BODY_STORE = "popserver.storage.bodies.DatabaseBodyStore"  # moved back, forgot some
    settings.STORAGES = {k: v for k, v in settings.STORAGES.items() if k != "popserver"}
    assert "popserver.E040" in check_ids(databases=["default"])


def test_an_unwritable_storage_fails_the_deploy_check_and_runpop3(storage_store, tmp_path):
    from popserver.management.commands.runpop3 import Command

    storage_store.parent.mkdir(exist_ok=True)
    storage_store.write_text("a file where the folder should be")
    assert "popserver.E042" in check_ids(include_deployment_checks=True)
    with pytest.raises(CommandError, match="body storage cannot be used"):
        Command.check_body_storage()
    storage_store.unlink()
    assert "popserver.E042" not in check_ids(include_deployment_checks=True)
    Command.check_body_storage()


# S3 through django-storages, against moto's server -----------------------------------------------------------
@pytest.fixture
def s3_store(settings):
    """The S3 storage of django-storages on a moto server at a free port; skipped (with the reason printed)
    when moto or django-storages is missing or the server cannot start."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        print(f"S3 tests skipped: {exc}")
        pytest.skip(f"moto or boto3 not installed: {exc}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    try:
        server.start()
        host, port = server.get_host_and_port()
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip, said aloud
        print(f"S3 tests skipped: moto's server did not start: {exc!r}")
        pytest.skip(f"moto's server did not start: {exc!r}")
    endpoint = f"http://{host}:{port}"
    credentials = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}
    boto3.client("s3", endpoint_url=endpoint, **credentials).create_bucket(Bucket="popserver-bodies")
    settings.POPSERVER_BODY_STORE = STORAGE_STORE
    settings.STORAGES = {
        **settings.STORAGES,
        "popserver": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": "popserver-bodies",
                "endpoint_url": endpoint,
                "access_key": "test",
                "secret_key": "test",
                "region_name": "us-east-1",
                "location": "mail",
                "file_overwrite": True,
            },
        },
    }
    yield boto3.client("s3", endpoint_url=endpoint, **credentials)
    server.stop()


def s3_keys(client) -> list[str]:
    return sorted(
        item["Key"] for item in client.list_objects_v2(Bucket="popserver-bodies").get("Contents", [])
    )


@pytest.mark.django_db(transaction=True)
def test_s3_deliver_retr_in_ranges_dedup_delete(s3_store, make_mailbox, monkeypatch):
    from popserver.storage.bodies import DjangoStorageBodyStore

    monkeypatch.setattr(DjangoStorageBodyStore, "READ_SIZE", 1000)  # several range requests
    alice, bob = make_mailbox("alice"), make_mailbox("bob")
    deliver("alice", BODY)
    deliver("bob", BODY)
    key = "mail/" + object_name(hashlib.sha256(BODY).hexdigest())
    assert s3_keys(s3_store) == [key]
    maildrop = open_maildrop(alice.pk)
    pieces = list(maildrop.read(1))
    assert b"".join(pieces) == BODY and len(pieces) == -(-len(BODY) // 1000)
    maildrop.mark_deleted(1)
    maildrop.commit()
    assert s3_keys(s3_store) == [key]
    empty_mailbox(bob.pk)
    assert s3_keys(s3_store) == [] and not StoredBody.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_s3_missing_object_popgc_and_probe(s3_store, make_mailbox):
    from popserver.storage.bodies import probe_body_storage

    assert probe_body_storage() == ""
    mailbox = make_mailbox("alice")
    deliver("alice", BODY)
    get_body_store().stage(b"an orphan\r\n")
    s3_store.delete_object(
        Bucket="popserver-bodies", Key="mail/" + object_name(hashlib.sha256(BODY).hexdigest())
    )
    session = session_on(open_maildrop(mailbox.pk))
    assert b"".join(session.receive(b"RETR 1\r\n")).startswith(b"-ERR [SYS/TEMP]")
    session.abandon()
    assert "1 object(s) without a row removed" in popgc("--grace", "0")
    assert s3_keys(s3_store) == []
    assert connection.vendor  # the database is untouched by the S3 errors
    assert isinstance(body_storage().__class__.__name__, str)


@pytest.mark.django_db
def test_the_admin_says_503_for_a_missing_object(storage_store, make_mailbox, admin_client):
    make_mailbox("alice")
    message = deliver("alice", BODY)
    object_path(storage_store, BODY).unlink()
    from django.urls import reverse

    for view in ("download", "text"):
        response = admin_client.get(reverse(f"admin:popserver_message_{view}", args=[message.pk]))
        assert response.status_code == 503, view


@pytest.mark.django_db(transaction=True)
def test_concurrent_deliveries_of_the_same_new_content_share_one_object(storage_store, make_mailbox):
    import threading

    from django.db import connections

    for n in range(8):
        make_mailbox(f"user{n}")
    start = threading.Barrier(8)
    errors = []

    def deliver_one(n: int) -> None:
        try:
            start.wait(timeout=30)
            deliver(f"user{n}", BODY)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=deliver_one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == [] and Message.objects.count() == 8
    assert list(StoredBody.objects.values_list("refs", flat=True)) == [8]
    assert objects_in(storage_store) == [object_path(storage_store, BODY)]


@pytest.mark.django_db
def test_pipelined_small_stored_bodies_are_named_in_one_query(
    storage_store, make_mailbox, django_assert_num_queries
):
    mailbox = make_mailbox("alice")
    bodies = [f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() for n in range(5)]
    for data in bodies:
        deliver("alice", data)
    object_path(storage_store, bodies[3]).unlink()
    maildrop = open_maildrop(mailbox.pk)
    session = session_on(maildrop)
    with django_assert_num_queries(2):  # the read-ahead; then message 4's own read, which finds it missing
        out = b"".join(session.receive(b"".join(b"RETR %d\r\n" % n for n in range(1, 6))))
    replies = [f"+OK {len(d)} octets\r\n".encode() + d + b".\r\n" for d in bodies]
    replies[3] = b"-ERR [SYS/TEMP] Internal error occurred. Refer to server log for more information.\r\n"
    assert out == b"".join(replies)
    maildrop.release()


@pytest.mark.django_db(transaction=True)
def test_one_object_for_100_recipients_through_lmtp(storage_store, settings, make_mailbox):
    """RFC 2033 with several recipients: one transaction, the same bytes for every copy (no Delivered-To,
    as Dovecot), so one object and 100 references."""
    from tests.test_lmtp_live import MESSAGE, LiveLmtp

    settings.POPSERVER_LMTP_MAX_RECIPIENTS = 100
    for n in range(100):
        make_mailbox(f"user{n}", email=f"user{n}@example.org")
    server = LiveLmtp()
    try:
        with server.client() as client:
            client.mail("sender@example.net")
            for n in range(100):
                assert client.rcpt(f"user{n}@example.org")[0] == 250
            replies = [client.data(MESSAGE)] + [client.getreply() for _ in range(99)]
    finally:
        server.stop()
    assert {code for code, _ in replies} == {250}
    assert Message.objects.count() == 100
    assert StoredBody.objects.count() == 1 and StoredBody.objects.get().refs == 100
    assert len(objects_in(storage_store)) == 1
    assert body_of(Message.objects.first()) == b"Return-Path: <sender@example.net>\r\n" + MESSAGE
