"""``exportmail``: a mailbox as mboxrd, in order, streamed from the body store; ``importmail`` reads it back."""

import io
import mailbox as stdlib_mailbox
import os
import subprocess

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from popserver.storage.bodies import get_body_store
from popserver.mailin.delivery import deliver
from popserver.mailin.exporting import write_quoted
from popserver.models import Message
from tests.conftest import corpus_files, manage_py_command, subprocess_env


def stored(message: Message) -> bytes:
    return b"".join(get_body_store().read_chunks(message.pk))


def contents(mailbox) -> list[bytes]:
    return [stored(m) for m in Message.objects.filter(mailbox=mailbox).order_by("id")]


def command(name: str, *args) -> str:
    out = io.StringIO()
    call_command(name, *map(str, args), stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.mark.django_db
def test_the_corpus_round_trips_through_exportmail_and_importmail(make_mailbox, tmp_path):
    alice, bob = make_mailbox("alice"), make_mailbox("bob")
    for path in corpus_files():
        deliver("alice", path.read_bytes())
    deliver("alice", b"Subject: quoting\r\n\r\nFrom the top\r\n>From once\r\n>>From twice\r\nFrom\r\n")
    with override_settings(POPSERVER_BODY_CHUNK_SIZE=7):  # lines split across chunks
        deliver("alice", b"Subject: chunks\r\n\r\nFrom a chunk boundary\r\n" + b">From " * 9 + b"\r\nFrom x")
    target = tmp_path / "alice.mbox"
    count = Message.objects.filter(mailbox=alice).count()
    assert command("exportmail", "alice", target) == f"exported {count} messages to {target}\n"
    assert os.stat(target).st_mode & 0o777 == 0o600

    assert command("importmail", "bob", target) == f"imported {count}, skipped 0 duplicates, 0 errors\n"
    expected = [
        data if data.endswith(b"\r\n") else data + b"\r\n" for data in contents(alice)
    ]  # mbox ends lines
    assert contents(bob) == expected
    assert command("importmail", "bob", target) == f"imported 0, skipped {count} duplicates, 0 errors\n"


@pytest.mark.django_db
def test_the_file_is_mboxrd_that_pythons_mailbox_reads(make_mailbox, tmp_path):
    make_mailbox("alice")
    deliver("alice", b"Subject: one\r\n\r\nFrom here\r\n")
    deliver("alice", b"Subject: two\r\n\r\nno newline")
    command("exportmail", "alice", tmp_path / "a.mbox")
    data = (tmp_path / "a.mbox").read_bytes()
    lines = data.split(b"\n")
    assert lines[0].startswith(b"From MAILER-DAEMON ") and len(lines[0].split()) == 7
    assert b"\r\n>From here\r\n\n" in data and data.endswith(b"no newline\r\n\n")
    box = stdlib_mailbox.mbox(str(tmp_path / "a.mbox"), create=False)
    assert [m["Subject"] for m in box] == ["one", "two"]
    box.close()


@pytest.mark.django_db
def test_x_uidl_carries_the_unique_ids_to_another_mailbox(make_mailbox, tmp_path):
    alice, bob = make_mailbox("alice"), make_mailbox("bob")
    for n in range(3):
        deliver("alice", f"Subject: {n}\r\n\r\nbody\r\n".encode())
    command("exportmail", "alice", tmp_path / "a.mbox", "--x-uidl")
    command("importmail", "bob", tmp_path / "a.mbox", "--x-uidl")
    alice_ids = list(Message.objects.filter(mailbox=alice).values_list("uid", flat=True))
    assert list(Message.objects.filter(mailbox=bob).values_list("uid", flat=True)) == alice_ids
    assert contents(bob) == [
        f"X-UIDL: {uid}\r\n".encode() + data for uid, data in zip(alice_ids, contents(alice), strict=True)
    ]
    # back into alice: every one is already there
    assert command("importmail", "alice", tmp_path / "a.mbox", "--x-uidl").startswith("imported 0, skipped 3")


@pytest.mark.django_db
def test_an_existing_file_is_kept_unless_forced(make_mailbox, tmp_path):
    make_mailbox("alice")
    deliver("alice", b"Subject: one\r\n\r\nbody\r\n")
    target = tmp_path / "a.mbox"
    target.write_bytes(b"precious")
    with pytest.raises(CommandError, match="exists"):
        command("exportmail", "alice", target)
    assert target.read_bytes() == b"precious"
    command("exportmail", "alice", target, "--force")
    assert target.read_bytes().startswith(b"From MAILER-DAEMON ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mbox"]  # no temporary file left


@pytest.mark.django_db
def test_an_empty_mailbox_is_an_empty_file(make_mailbox, tmp_path):
    make_mailbox("alice")
    assert (
        command("exportmail", "alice", tmp_path / "a.mbox")
        == f"exported 0 messages to {tmp_path / 'a.mbox'}\n"
    )
    assert (tmp_path / "a.mbox").read_bytes() == b""


@pytest.mark.django_db
def test_an_unwritable_path_is_a_clear_error(make_mailbox, tmp_path):
    make_mailbox("alice")
    with pytest.raises(CommandError, match="cannot write .*No such file or directory"):
        command("exportmail", "alice", tmp_path / "missing" / "a.mbox")


@pytest.mark.django_db
def test_unknown_recipient(tmp_path):
    with pytest.raises(CommandError, match="no mailbox"):
        command("exportmail", "nobody", tmp_path / "a.mbox")


@pytest.mark.django_db(transaction=True)
def test_standard_output(make_mailbox, tmp_path):
    make_mailbox("alice")
    deliver("alice", b"Subject: one\r\n\r\nbody\r\n")
    result = subprocess.run(
        manage_py_command("exportmail", "alice", "-"),
        env=subprocess_env(),
        cwd=tmp_path,
        capture_output=True,
        check=False,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(b"\n", 1)[1] == b"Subject: one\r\n\r\nbody\r\n\n"


@pytest.mark.parametrize(
    "chunks,expected",
    [
        ([b"From a\r\nb\r\n"], b">From a\r\nb\r\n"),
        ([b"x\r\nFr", b"om y\r\n"], b"x\r\n>From y\r\n"),
        ([b"x\r\n>>Fro", b"m y\r\n"], b"x\r\n>>>From y\r\n"),
        ([b"a", b"b", b"c"], b"abc\r\n"),
        ([b"x From y\r\n"], b"x From y\r\n"),
        ([b"end\r\n", b"From"], b"end\r\nFrom\r\n"),  # "From" without the space is no separator
    ],
)
def test_write_quoted(chunks, expected):
    out = io.BytesIO()
    write_quoted(out, chunks)
    assert out.getvalue() == expected
