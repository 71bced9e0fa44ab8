"""``importmail``: an mbox file and a Dovecot Maildir (made here, with a ``dovecot-uidlist``) imported in order
with the UIDLs Dovecot showed, checked over POP3 with poplib against a live server; a second run adds
nothing; ids generated later never collide with imported ones; errors, quotas and the progress counter."""

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.core.management.base import OutputWrapper
from django.test import override_settings

from popserver.storage.bodies import get_body_store
from popserver.mailin.delivery import deliver, format_uid
from popserver.mailin.importing import (
    DEFAULT_UIDL_FORMAT,
    MaildirSource,
    SourceError,
    check_uidl_format,
    content_uid,
    open_source,
    parse_uidlist,
    render_uidl,
)
from popserver.management.progress import Progress
from popserver.models import Mailbox, Message
from tests.test_delivery import presented

DOVECOT_VALIDITY = 1700000000  # 0x6553f100


def message(subject: str, body: str = "Hello.\n", extra: str = "") -> bytes:
    """A small message with LF line endings, as files on a Unix server have them."""
    return (
        f"From: Bob <bob@example.net>\nTo: alice@example.org\nSubject: {subject}\n{extra}"
        f"Date: Thu, 26 Nov 2026 10:00:00 +0000\n\n{body}"
    ).encode()


def write_mbox(path: Path, messages: list[bytes]) -> Path:
    with path.open("wb") as out:
        for data in messages:
            out.write(b"From bob@example.net Thu Nov 26 10:00:00 2026\n" + data)
            if not data.endswith(b"\n"):
                out.write(b"\n")
            out.write(b"\n")
    return path


def make_maildir(folder: Path, files: dict[str, bytes], uidlist: str | None = None) -> Path:
    """``files``: "cur/name:2,S" or "new/name" -> bytes; ``uidlist``: the dovecot-uidlist text."""
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if uidlist is not None:
        (folder / "dovecot-uidlist").write_text(uidlist)
    return folder


def dovecot_uidl(uid: int, validity: int = DOVECOT_VALIDITY) -> str:
    return f"{uid:08x}{validity:08x}"  # what Dovecot's %08Xu%08Xv shows: its X is printf's %llx


# A Dovecot Maildir: UIDs not in file-name order, files in cur/ and new/, a UIDL saved by an earlier migration
# (P), a file Dovecot has not listed yet, and a listed file that is gone.
DOVECOT_FILES = {
    "cur/1700000100.M1P100.old-mx,S=200,W=210:2,S": message("third (uid 7)"),
    "new/1700000200.M2P200.old-mx": message("first (uid 2)"),
    "cur/1700000300.M3P300.old-mx:2,RS": message("second (uid 5)", body=">From a Maildir: kept as it is\n"),
    "cur/1700000400.M4P400.old-mx:2,": message("fourth (uid 9, migrated)"),
    "new/1700000500.M5P500.old-mx": message("not listed yet"),
}
DOVECOT_UIDLIST = f"""3 V{DOVECOT_VALIDITY} N12 G8a3c3a2f0b6e5b65b1420000ae2b6fca
2 :1700000200.M2P200.old-mx
5 W180 :1700000300.M3P300.old-mx
6 :1700000350.M9P350.old-mx
7 :1700000100.M1P100.old-mx,S=200,W=210
9 Pmigrated-uidl-42 :1700000400.M4P400.old-mx:2,
"""
DOVECOT_EXPECTED = [  # (subject, UIDL) in POP3 order
    ("first (uid 2)", dovecot_uidl(2)),
    ("second (uid 5)", dovecot_uidl(5)),
    ("third (uid 7)", dovecot_uidl(7)),
    ("fourth (uid 9, migrated)", "migrated-uidl-42"),
    ("not listed yet", None),  # a content hash: Dovecot never showed it
]


def importmail(*args, **options) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("importmail", *map(str, args), stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def listing(mailbox: Mailbox) -> list[tuple[str, str]]:
    return list(Message.objects.filter(mailbox=mailbox).order_by("id").values_list("subject", "uid"))


def stored(message: Message) -> bytes:
    return b"".join(get_body_store().read_chunks(message.pk))


def pop3_messages(server, username: str) -> list[tuple[str, bytes]]:
    """(UIDL, message as RETR sends it) for every message, in POP3 order, read with poplib."""
    client = server.poplib()
    try:
        client.user(username)
        client.pass_("secret")
        _, lines, _ = client.uidl()
        result = []
        for line in lines:
            number, uidl = line.decode().split()
            _, body, _ = client.retr(int(number))
            result.append((uidl, b"\r\n".join(body) + b"\r\n"))
        return result
    finally:
        client.quit()


# UIDL formats ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template,expected",
    [
        (DEFAULT_UIDL_FORMAT, "0000002a6553f100"),
        ("%08XUu%08XUv", "0000002A6553F100"),
        ("%u.%v", "42.1700000000"),
        ("%{uidvalidity}-%{uid}", "1700000000-42"),
        ("%Xu", "2a"),
        ("%4v", "1700"),
        ("%f", "1700000000.M1P1.host"),
        ("uid%%%u", "uid%42"),
    ],
)
def test_render_uidl_as_dovecot(template, expected):
    assert (
        render_uidl(template, uid=42, uidvalidity=DOVECOT_VALIDITY, filename="1700000000.M1P1.host")
        == expected
    )


@pytest.mark.parametrize("template", ["%m", "%{guid}", "100%", "%08X", "%u %v", "%" + "u" * 40 + "%v" * 30])
def test_unusable_uidl_formats_are_refused_before_anything_is_read(template, tmp_path):
    with pytest.raises(ValueError):
        check_uidl_format(template)
    with pytest.raises(SourceError):
        open_source(tmp_path, uidl_format=template)


# dovecot-uidlist -------------------------------------------------------------------------------------------------
def test_parse_uidlist_version_3():
    parsed = parse_uidlist(DOVECOT_UIDLIST.encode())
    assert (parsed.version, parsed.uid_validity, parsed.next_uid) == (3, DOVECOT_VALIDITY, 12)
    assert [(r.uid, r.filename) for r in parsed.records] == [
        (2, "1700000200.M2P200.old-mx"),
        (5, "1700000300.M3P300.old-mx"),
        (6, "1700000350.M9P350.old-mx"),
        (7, "1700000100.M1P100.old-mx,S=200,W=210"),
        (9, "1700000400.M4P400.old-mx"),
    ]
    assert parsed.records[1].extensions == {"W": "180"}
    assert parsed.records[4].extensions == {"P": "migrated-uidl-42"}


def test_parse_uidlist_version_1_and_bad_lines():
    parsed = parse_uidlist(b"1 1234 5\n3 1700000200.M2P200.host:2,S\nnot a record\n4 1700000300.M3.host\n")
    assert (parsed.version, parsed.uid_validity, parsed.next_uid) == (1, 1234, 5)
    assert [(r.uid, r.filename) for r in parsed.records] == [
        (3, "1700000200.M2P200.host"),
        (4, "1700000300.M3.host"),
    ]
    assert parsed.skipped_lines == 1


@pytest.mark.parametrize("header", [b"", b"3 N5\n", b"x y z\n", b"1 abc 5\n"])
def test_unreadable_uidlist_header(header):
    with pytest.raises(SourceError, match="header"):
        parse_uidlist(header)


def test_pop3_order_numbers_come_first(tmp_path):
    folder = make_maildir(
        tmp_path / "Maildir",
        {f"cur/17000000{n}0.M{n}.host:2,S": message(f"m{n}") for n in range(1, 5)},
        f"3 V{DOVECOT_VALIDITY} N9\n1 :1700000010.M1.host\n2 O2 :1700000020.M2.host\n"
        f"3 :1700000030.M3.host\n4 O1 :1700000040.M4.host\n",
    )
    source = MaildirSource(folder)
    assert [uidl for _, uidl in source.items] == [
        dovecot_uidl(4),
        dovecot_uidl(2),
        dovecot_uidl(1),
        dovecot_uidl(3),
    ]
    source.close()


def test_an_empty_p_extension_means_the_file_name(tmp_path):
    folder = make_maildir(
        tmp_path / "Maildir",
        {"cur/1700000010.M1.host,S=9:2,S": message("m")},
        f"3 V{DOVECOT_VALIDITY} N2\n1 P :1700000010.M1.host,S=9\n",
    )
    source = MaildirSource(folder)
    assert source.items == [("1700000010.M1.host,S=9", "1700000010.M1.host,S=9")]
    source.close()


# A Dovecot Maildir, end to end over POP3 ---------------------------------------------------------------------------
@pytest.mark.live
def test_dovecot_maildir_keeps_order_and_uidls_over_pop3(pop3_server, make_mailbox, tmp_path):
    mailbox = make_mailbox("alice", email="alice@example.org")
    deliver("alice", message("already here"))  # an import adds to what the mailbox holds
    folder = make_maildir(tmp_path / "Maildir", DOVECOT_FILES, DOVECOT_UIDLIST)

    out, err = importmail("alice@example.org", folder)
    assert out == "imported 5, skipped 0 duplicates, 0 errors\n"
    assert "1 messages are not in dovecot-uidlist yet" in err

    rows = listing(mailbox)[1:]
    assert [subject for subject, _ in rows] == [subject for subject, _ in DOVECOT_EXPECTED]
    unlisted = DOVECOT_FILES["new/1700000500.M5P500.old-mx"]
    expected_uidls = [uidl or content_uid(presented(unlisted)) for _, uidl in DOVECOT_EXPECTED]
    assert [uid for _, uid in rows] == expected_uidls

    by_subject = {
        data.split(b"Subject: ")[1].split(b"\n")[0].decode(): data for data in DOVECOT_FILES.values()
    }
    seen = pop3_messages(pop3_server, "alice")
    assert [uidl for uidl, _ in seen[1:]] == expected_uidls
    for (uidl, data), (subject, _) in zip(seen[1:], DOVECOT_EXPECTED, strict=True):
        assert data == presented(by_subject[subject]), subject

    # Again: nothing new, and the files are not even read for the UIDLs Dovecot gave.
    out, _ = importmail("alice", folder)
    assert out == "imported 0, skipped 5 duplicates, 0 errors\n"
    assert Message.objects.filter(mailbox=mailbox).count() == 6

    # Later deliveries get the server's own ids, none of them an imported one.
    mailbox.refresh_from_db()
    later = [deliver("alice", message(f"later {n}")) for n in range(3)]
    assert [m.uid for m in later] == [format_uid(n, mailbox.uid_validity) for n in range(2, 5)]
    assert not {m.uid for m in later} & set(expected_uidls)
    assert [uidl for uidl, _ in pop3_messages(pop3_server, "alice")][1:6] == expected_uidls


@pytest.mark.django_db
def test_a_mailbox_with_dovecots_uidvalidity_gets_another(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice", uid_validity=DOVECOT_VALIDITY)
    first = deliver("alice", message("before"))
    assert first.uid == format_uid(1, DOVECOT_VALIDITY)
    folder = make_maildir(tmp_path / "Maildir", DOVECOT_FILES, DOVECOT_UIDLIST)
    importmail("alice", folder, "--uidl-format", "%08XUu%08XUv")  # the server's own form, upper case
    mailbox.refresh_from_db()
    assert mailbox.uid_validity != DOVECOT_VALIDITY
    imported = set(Message.objects.filter(mailbox=mailbox).values_list("uid", flat=True))
    assert f"{7:08X}{DOVECOT_VALIDITY:08X}" in imported
    # Dovecot's own next ids (12, 13, ...) with its UIDVALIDITY are not what the server hands out now
    later = deliver("alice", message("after"))
    assert later.uid == format_uid(2, mailbox.uid_validity)
    assert not later.uid.endswith(f"{DOVECOT_VALIDITY:08X}")
    assert Message.objects.get(pk=first.pk).uid == first.uid  # stored ids never change


@pytest.mark.django_db
def test_a_plain_maildir_is_imported_in_file_name_order_with_content_ids(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    files = {
        "new/1700000300.M3.host": message("c"),
        "cur/1700000100.M1.host:2,S": message("a"),
        "cur/1700000200.M2.host:2,": message("b"),
    }
    folder = make_maildir(tmp_path / "Maildir", files)
    assert importmail("alice", folder)[0] == "imported 3, skipped 0 duplicates, 0 errors\n"
    assert [s for s, _ in listing(mailbox)] == ["a", "b", "c"]
    assert importmail("alice", folder)[0] == "imported 0, skipped 3 duplicates, 0 errors\n"


# mbox ----------------------------------------------------------------------------------------------------------
@pytest.mark.live
def test_mbox_over_pop3_and_again(pop3_server, make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    messages = [
        message("one"),
        message("two", body="A line\n>From quoted by mboxo\n>>From quoted twice\nFrom-not-a-separator\n"),
        message("three", body="no final newline"),
        message("four", extra="X-UIDL: kept-only-with-the-option\n"),
    ]
    path = write_mbox(tmp_path / "inbox.mbox", messages)
    out, err = importmail("alice", path)
    assert (out, err) == ("imported 4, skipped 0 duplicates, 0 errors\n", "")

    expected = [
        presented(messages[0]),
        presented(
            message("two", body="A line\nFrom quoted by mboxo\n>From quoted twice\nFrom-not-a-separator\n")
        ),
        presented(message("three", body="no final newline\n")),  # mbox cannot tell: the line ends
        presented(messages[3]),
    ]
    rows = Message.objects.filter(mailbox=mailbox).order_by("id")
    assert [stored(m) for m in rows] == expected
    assert [m.uid for m in rows] == [content_uid(data) for data in expected]
    assert pop3_messages(pop3_server, "alice") == [(content_uid(data), data) for data in expected]

    assert importmail("alice", path)[0] == "imported 0, skipped 4 duplicates, 0 errors\n"
    later = deliver("alice", message("later"))
    assert later.uid == format_uid(1, Mailbox.objects.get(pk=mailbox.pk).uid_validity)


@pytest.mark.django_db
def test_keep_from_quoting(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    data = message("quoted", body=">From me\n")
    importmail("alice", write_mbox(tmp_path / "a.mbox", [data]), "--keep-from-quoting")
    assert stored(Message.objects.get(mailbox=mailbox)) == presented(data)


@pytest.mark.django_db
def test_x_uidl_headers_and_the_counter(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    validity = mailbox.uid_validity
    messages = [
        message("plain uidl", extra="X-UIDL: 1f3e-aa01\n"),
        message("server form", extra=f"X-UIDL: {format_uid(40, validity)}\n"),  # as this server would make
        message("no header"),
        message("folded", extra="X-UIDL:\n  folded-uidl\n"),
    ]
    path = write_mbox(tmp_path / "x.mbox", messages)
    assert importmail("alice", path, "--x-uidl")[0] == "imported 4, skipped 0 duplicates, 0 errors\n"
    uids = [uid for _, uid in listing(mailbox)]
    assert uids == ["1f3e-aa01", format_uid(40, validity), content_uid(presented(messages[2])), "folded-uidl"]
    mailbox.refresh_from_db()
    assert mailbox.next_uid == 41  # moved past the imported id of the generated form
    assert deliver("alice", message("later")).uid == format_uid(41, validity)
    assert importmail("alice", path, "--x-uidl")[0] == "imported 0, skipped 4 duplicates, 0 errors\n"


@pytest.mark.django_db
def test_an_imported_id_too_far_ahead_gets_the_mailbox_a_new_uidvalidity(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    old_validity = mailbox.uid_validity
    huge = f"{2**60:X}{old_validity:08X}"
    importmail(
        "alice", write_mbox(tmp_path / "x.mbox", [message("far", extra=f"X-UIDL: {huge}\n")]), "--x-uidl"
    )
    mailbox.refresh_from_db()
    assert mailbox.uid_validity != old_validity and mailbox.next_uid == 1
    assert deliver("alice", message("later")).uid == format_uid(1, mailbox.uid_validity)


@pytest.mark.django_db
def test_invalid_ids_are_refused_with_a_clear_message(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    messages = [
        message("space", extra="X-UIDL: has a space\n"),
        message("long", extra=f"X-UIDL: {'x' * 71}\n"),
        message("eight bit", extra="X-UIDL: caf\u00e9\n"),
        message("fine", extra="X-UIDL: fine\n"),
    ]
    with pytest.raises(CommandError, match="3 messages not imported"):
        call_command(
            "importmail",
            "alice",
            str(write_mbox(tmp_path / "x.mbox", messages)),
            "--x-uidl",
            stdout=(out := io.StringIO()),
            stderr=(err := io.StringIO()),
        )
    assert out.getvalue() == "imported 1, skipped 0 duplicates, 3 errors\n"
    errors = err.getvalue().splitlines()
    assert len(errors) == 3 and all("RFC 1939" in line for line in errors)
    assert errors[0].startswith("error: message 1: unique id 'has a space' is not allowed")
    assert [uid for _, uid in listing(mailbox)] == ["fine"]


@pytest.mark.django_db
def test_errors_do_not_stop_an_import(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    files = {
        "cur/1700000100.M1.host:2,S": message("one"),
        "cur/1700000200.M2.host:2,S": b"",
        "cur/1700000300.M3.host:2,S": message("three", body="x" * 2000),
    }
    folder = make_maildir(tmp_path / "Maildir", files)
    with override_settings(POPSERVER_MAX_MESSAGE_SIZE=1000), pytest.raises(CommandError):
        call_command(
            "importmail", "alice", str(folder), stdout=(out := io.StringIO()), stderr=(err := io.StringIO())
        )
    assert out.getvalue() == "imported 1, skipped 0 duplicates, 2 errors\n"
    assert "error: 1700000200.M2.host: empty message" in err.getvalue()
    assert "error: 1700000300.M3.host: message of" in err.getvalue()
    assert [s for s, _ in listing(mailbox)] == ["one"]


@pytest.mark.django_db
def test_imports_send_no_delivery_signal(make_mailbox, tmp_path):
    from popserver import signals

    make_mailbox("alice")
    received = []
    signals.message_delivered.connect(receiver := lambda **kwargs: received.append(kwargs), weak=False)
    try:
        importmail("alice", write_mbox(tmp_path / "a.mbox", [message("one")]))
    finally:
        signals.message_delivered.disconnect(receiver)
    assert received == []


def a_folder(path: Path) -> Path:
    (path / "folder").mkdir()
    return path / "folder"


def an_eml_file(path: Path) -> Path:
    (path / "a.eml").write_bytes(b"Subject: x\n\nbody\n")
    return path / "a.eml"


@pytest.mark.django_db
@pytest.mark.parametrize(
    "setup,reason",
    [
        (lambda path: path / "missing.mbox", "no such file"),
        (a_folder, "not a Maildir"),
        (an_eml_file, "no messages found"),
        (lambda path: make_maildir(path / "M", {}, "garbage\n"), "cannot read its header"),
    ],
)
def test_unreadable_sources(make_mailbox, tmp_path, setup, reason):
    make_mailbox("alice")
    with pytest.raises(CommandError, match=reason):
        importmail("alice", setup(tmp_path))


@pytest.mark.django_db
def test_unknown_recipient(tmp_path):
    with pytest.raises(CommandError, match="no mailbox"):
        importmail("nobody", write_mbox(tmp_path / "a.mbox", [message("one")]))


@pytest.mark.django_db
def test_an_empty_mbox_file_imports_nothing(make_mailbox, tmp_path):
    make_mailbox("alice")
    (tmp_path / "empty.mbox").write_bytes(b"")
    assert importmail("alice", tmp_path / "empty.mbox")[0] == "imported 0, skipped 0 duplicates, 0 errors\n"


# Quotas ---------------------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_quotas_do_not_apply_to_imports_unless_asked(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice", quota_messages=2)
    path = write_mbox(tmp_path / "a.mbox", [message(f"m{n}") for n in range(4)])
    assert importmail("alice", path)[0] == "imported 4, skipped 0 duplicates, 0 errors\n"

    Message.objects.filter(mailbox=mailbox).delete()
    with pytest.raises(CommandError, match="1 messages not imported"):
        call_command(
            "importmail",
            "alice",
            str(path),
            "--enforce-quota",
            stdout=(out := io.StringIO()),
            stderr=(err := io.StringIO()),
        )
    assert out.getvalue() == "imported 2, skipped 0 duplicates, 1 errors\n"
    assert "stopped: the mailbox is full" in err.getvalue()
    assert [s for s, _ in listing(mailbox)] == ["m0", "m1"]


# The progress counter ---------------------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_only():
    now = [0.0]
    terminal = Terminal()
    progress = Progress(OutputWrapper(terminal), 3, "importing", clock=lambda: now[0])
    progress(1)
    progress(2)  # too soon after the last one
    now[0] = 1.0
    progress(2)
    progress(3)  # the last one is always shown
    progress.finish()
    assert terminal.getvalue() == "\rimporting 1/3\rimporting 2/3\rimporting 3/3\n"

    pipe = io.StringIO()
    progress = Progress(OutputWrapper(pipe), 3, "importing")
    progress(3)
    progress.finish()
    assert pipe.getvalue() == ""


@pytest.mark.django_db
def test_the_summary_goes_to_stdout_and_nothing_else_without_a_terminal(make_mailbox, tmp_path):
    make_mailbox("alice")
    out, err = importmail("alice", write_mbox(tmp_path / "a.mbox", [message("one")]))
    assert (out, err) == ("imported 1, skipped 0 duplicates, 0 errors\n", "")
