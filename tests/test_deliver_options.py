"""``deliver`` parity with dovecot-lda and Postfix's pipe flags: ``-f SENDER`` adds ``Return-Path``,
``--delivered-to`` adds ``Delivered-To``, each only when asked; ``user+detail`` delivers to ``user``. Every
case byte for byte, through the Python API and through the command as an MTA runs it."""

import pytest

from popserver.storage.bodies import get_body_store
from popserver.mailin.delivery import deliver, trace_fields
from popserver.models import Message
from tests.conftest import corpus_files
from tests.test_deliver_command import EX_OK, EX_USAGE, assert_refused, deliver_command
from tests.test_delivery import presented

MESSAGE = b"From: carol@example.org\nSubject: hello\n\nbody\n"
STORED = b"From: carol@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
ENVELOPE = b"From carol@example.org Thu Nov 26 10:00:00 2026\n"


def stored(message: Message) -> bytes:
    return b"".join(get_body_store().read_chunks(message.pk))


# The API -----------------------------------------------------------------------------------------------------
@pytest.mark.django_db
@pytest.mark.parametrize(
    "options,prefix",
    [
        ({}, b""),
        ({"return_path": "carol@example.org"}, b"Return-Path: <carol@example.org>\r\n"),
        ({"return_path": "<carol@example.org>"}, b"Return-Path: <carol@example.org>\r\n"),
        ({"return_path": ""}, b"Return-Path: <>\r\n"),
        ({"return_path": "<>"}, b"Return-Path: <>\r\n"),
        ({"delivered_to": "alice@example.org"}, b"Delivered-To: alice@example.org\r\n"),
        (
            {"return_path": "carol@example.org", "delivered_to": "alice+lists@example.org"},
            b"Return-Path: <carol@example.org>\r\nDelivered-To: alice+lists@example.org\r\n",
        ),
    ],
    ids=[
        "nothing",
        "return path",
        "bracketed",
        "null sender",
        "null sender bracketed",
        "delivered-to",
        "both",
    ],
)
def test_trace_fields_through_the_api(make_mailbox, options, prefix):
    make_mailbox("alice", email="alice@example.org")
    message = deliver("alice@example.org", ENVELOPE + MESSAGE, **options)
    assert stored(message) == prefix + STORED
    assert message.size == len(prefix + STORED)
    assert message.subject == "hello"


@pytest.mark.django_db
@pytest.mark.parametrize("path", corpus_files(), ids=lambda path: path.name)
def test_without_options_the_corpus_is_stored_as_given(make_mailbox, path):
    make_mailbox("alice")
    assert stored(deliver("alice", path.read_bytes())) == presented(path.read_bytes())


@pytest.mark.parametrize(
    "options",
    [
        {"return_path": "a@b\r\nBcc: x@y"},
        {"delivered_to": "a@b\nX: y"},
        {"return_path": "a\x00b"},
        {"delivered_to": ""},
        {"delivered_to": "  "},
    ],
)
def test_header_breaking_values_are_refused(options):
    with pytest.raises(ValueError):
        trace_fields(**options)


def test_non_utf8_command_line_bytes_are_written_back_as_they_came():
    sender = b"j\xf6rg@example.org".decode("utf-8", "surrogateescape")  # as sys.argv holds it
    assert trace_fields(return_path=sender) == b"Return-Path: <j\xf6rg@example.org>\r\n"


@pytest.mark.django_db
@pytest.mark.parametrize("recipient", ["alice+lists", "alice+lists@example.org", "ALICE+x@Example.org"])
def test_user_plus_detail_delivers_to_user(make_mailbox, recipient):
    mailbox = make_mailbox("alice", email="alice@example.org")
    assert deliver(recipient, MESSAGE).mailbox == mailbox


# The command --------------------------------------------------------------------------------------------------
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "args,prefix",
    [
        ((), b""),
        (("-f", "carol@example.org"), b"Return-Path: <carol@example.org>\r\n"),
        (("--from=<carol@example.org>",), b"Return-Path: <carol@example.org>\r\n"),
        (("-f", ""), b"Return-Path: <>\r\n"),
        (("--delivered-to", "alice+lists@example.org"), b"Delivered-To: alice+lists@example.org\r\n"),
        (
            ("--delivered-to", "alice+lists@example.org", "-f", "carol@example.org"),
            b"Return-Path: <carol@example.org>\r\nDelivered-To: alice+lists@example.org\r\n",
        ),
    ],
    ids=["nothing", "-f", "--from bracketed", "-f null sender", "--delivered-to", "both"],
)
def test_deliver_options_byte_exact(make_mailbox, tmp_path, args, prefix):
    mailbox = make_mailbox("alice", email="alice@example.org")
    result = deliver_command(*args, "alice+lists@example.org", data=ENVELOPE + MESSAGE, cwd=tmp_path)
    assert (result.returncode, result.stderr, result.stdout) == (EX_OK, b"", b"")
    message = Message.objects.get(mailbox=mailbox)
    assert stored(message) == prefix + STORED
    assert message.size == len(prefix + STORED)


@pytest.mark.django_db(transaction=True)
def test_every_corpus_message_with_both_options(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    prefix = b"Return-Path: <bounce@example.net>\r\nDelivered-To: alice@example.org\r\n"
    for path in corpus_files():
        result = deliver_command(
            "-f",
            "bounce@example.net",
            "--delivered-to",
            "alice@example.org",
            "alice",
            data=path.read_bytes(),
            cwd=tmp_path,
        )
        assert (result.returncode, result.stderr) == (EX_OK, b""), path.name
    messages = Message.objects.filter(mailbox=mailbox)
    for path, message in zip(corpus_files(), messages, strict=True):
        assert stored(message) == prefix + presented(path.read_bytes()), path.name


@pytest.mark.django_db(transaction=True)
def test_a_header_breaking_option_is_a_usage_error_64(make_mailbox, tmp_path):
    make_mailbox("alice")
    result = deliver_command("--delivered-to", "a@b\nBcc: everyone@example.org", "alice", cwd=tmp_path)
    assert_refused(result, EX_USAGE, "line break")
    assert not Message.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_added_fields_count_toward_the_size_limit(make_mailbox, tmp_path):
    from tests.conftest import subprocess_env
    from tests.test_deliver_command import EX_UNAVAILABLE

    make_mailbox("alice")
    env = subprocess_env(POPSERVER_MAX_MESSAGE_SIZE=str(len(STORED)))
    assert deliver_command("alice", cwd=tmp_path, env=env).returncode == EX_OK
    assert_refused(
        deliver_command("-f", "c@example.org", "alice", cwd=tmp_path, env=env), EX_UNAVAILABLE, "limit"
    )
    assert Message.objects.count() == 1
