"""The POP3 clients users run (fetchmail, mpop, getmail6) against a live server, each as a subprocess.

Each client delivers into a folder under ``tmp_path``, and the files are compared byte for byte with what
was delivered, after the client's own known changes:

- fetchmail (``no rewrite no stripcr``) puts a ``Received:`` field on top;
- mpop (``received_header off``) writes a maildir with LF line endings, and changes nothing else;
- getmail puts ``Return-Path:``, ``Delivered-To:`` and ``Received:`` on top, writes LF, and re-serialises
  through Python's ``email`` package, which takes a lone CR for a line break;
- fetchmail and getmail end a header section that had no empty line after it (corpus 08) with one.

The database is checked after each run: deletions only when asked, and committed by QUIT, which answers only
after the commit, so the client's exit is the synchronisation.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from popserver.mailin.delivery import deliver, strip_envelope_line
from popserver.models import Mailbox, Message
from popserver.protocol.wire import normalize_line_endings
from popserver.server.tls import TlsContextHolder
from tests.conftest import CORPUS_SIZES, corpus_files

pytestmark = pytest.mark.live

CLIENT_TIMEOUT = 60  # seconds for one client run; each client's own network timeout is shorter
VENV_BIN = Path(sys.executable).parent
GETMAIL = shutil.which("getmail", path=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
needs_fetchmail = pytest.mark.skipif(shutil.which("fetchmail") is None, reason="fetchmail is not installed")
needs_mpop = pytest.mark.skipif(shutil.which("mpop") is None, reason="mpop is not installed")
needs_getmail = pytest.mark.skipif(GETMAIL is None, reason="getmail6 is not installed")

# An MDA for fetchmail and getmail: standard input into OUT/NNN.eml, numbered in arrival order.
MDA_SOURCE = """\
import pathlib, sys
out = pathlib.Path(sys.argv[1])
(out / f"{len(list(out.iterdir())):03d}.eml").write_bytes(sys.stdin.buffer.read())
"""


def msg(subject: str, body: str = "hello") -> bytes:
    return f"From: a@example.com\r\nSubject: {subject}\r\n\r\n{body}\r\n".encode()


def served(raw: bytes) -> bytes:
    """What RETR sends for ``raw`` once unstuffed: no mbox From line, bare LF as CRLF, a final CRLF."""
    data = normalize_line_endings(strip_envelope_line(raw))
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def with_separator(data: bytes) -> bytes:
    """fetchmail and getmail end a header section with the empty line even when the message had none
    (corpus 08, headers only): what they write for the served bytes ``data``."""
    return data if b"\r\n\r\n" in data or data.startswith(b"\r\n") else data + b"\r\n"


def corpus() -> list[bytes]:
    files = corpus_files()
    assert [path.name for path in files] == sorted(CORPUS_SIZES)
    return [path.read_bytes() for path in files]


@pytest.fixture
def alice_with(make_mailbox):
    """``alice_with(messages)``: the mailbox of alice (password "secret") with these messages delivered."""

    def make(messages: list[bytes]) -> Mailbox:
        mailbox = make_mailbox("alice", "secret")
        for raw in messages:
            deliver("alice", raw)
        return mailbox

    return make


def count(mailbox: Mailbox) -> int:
    return Message.objects.filter(mailbox=mailbox).count()


def assert_unlocked(mailbox: Mailbox) -> None:
    assert not Mailbox.objects.get(pk=mailbox.pk).lock_token


def run(argv: list[str], tmp_path: Path, ok=(0,)) -> str:
    """Run a client with ``HOME`` in ``tmp_path``; return its output (stdout and stderr) as text."""
    env = dict(os.environ, HOME=str(tmp_path), LC_ALL="C")
    result = subprocess.run(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=CLIENT_TIMEOUT
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode in ok, f"{argv[0]} exited {result.returncode}:\n{output}"
    return output


def private_file(path: Path, text: str) -> Path:
    """Clients refuse configuration files with passwords that others can read."""
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def mda(tmp_path) -> tuple[list[str], Path]:
    """(argv of an MDA that stores each message it is given in ``out``, out)."""
    script = tmp_path / "mda.py"
    script.write_text(MDA_SOURCE)
    out = tmp_path / "out"
    out.mkdir()
    return [sys.executable, str(script), str(out)], out


def delivered(out: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(out.iterdir())]


def maildir(base: Path) -> Path:
    for sub in ("new", "cur", "tmp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def maildir_messages(base: Path) -> list[bytes]:
    return sorted(path.read_bytes() for path in (base / "new").iterdir())


# TLS: a CA the clients are told to trust. fetchmail checks the subject's CommonName, and the DNS names only
# (not IP addresses), so the certificate has CN=localhost and fetchmail is told to expect "localhost".
@pytest.fixture(scope="module")
def ca():
    trustme = pytest.importorskip("trustme")
    return trustme.CA()


@pytest.fixture
def ca_file(ca, tmp_path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def tls_server(pop3_server_factory, ca, tmp_path):
    cert = ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    certfile = tmp_path / "server.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(certfile))
    return pop3_server_factory(tls=TlsContextHolder(str(certfile), str(certfile)), implicit_tls=True)


# fetchmail -----------------------------------------------------------------------------------------------
def fetchmail(tmp_path: Path, poll: str, options: str, mda_argv: list[str], ok=(0,)) -> str:
    """One ``fetchmail`` run in the foreground with its own pid and id files; verbose, for the transcript."""
    rc = private_file(
        tmp_path / "fetchmailrc",
        (
            f"{poll} protocol pop3 timeout 20\n"
            f'  user alice password "secret"\n'
            f"  no rewrite no stripcr {options}\n"
            f'  mda "{shlex.join(mda_argv)}"\n'
        ),
    )
    return run(
        [
            "fetchmail",
            "--fetchmailrc",
            str(rc),
            "--idfile",
            str(tmp_path / "fetchids"),
            "--pidfile",
            str(tmp_path / "fetchmail.pid"),
            "--nosyslog",
            "--verbose",
        ],
        tmp_path,
        ok,
    )


def without_fetchmail_received(data: bytes) -> bytes:
    """fetchmail's one change with ``no rewrite no stripcr``: a ``Received:`` field (folded) on top."""
    match = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", data)
    assert match, data[:200]
    assert b"fetchmail" in match.group(0)
    return data[match.end() :]


@needs_fetchmail
def test_fetchmail_user_pass_keeps_the_corpus_byte_for_byte(pop3_server, alice_with, mda, tmp_path):
    messages = corpus()
    mailbox = alice_with(messages)
    mda_argv, out = mda
    # fetchmail 6.4 checks certificates by default and then insists on STLS: sslproto '' turns TLS off.
    transcript = fetchmail(
        tmp_path, f"poll 127.0.0.1 port {pop3_server.port}", "keep fetchall sslproto ''", mda_argv
    )
    assert "POP3> USER alice" in transcript and "STLS" not in transcript  # no certificate: none offered
    assert [without_fetchmail_received(data) for data in delivered(out)] == [
        with_separator(served(raw)) for raw in messages
    ]
    assert count(mailbox) == len(messages)  # keep: nothing deleted
    assert_unlocked(mailbox)


@needs_fetchmail
def test_fetchmail_deletes_only_without_keep_and_each_quit_commits(pop3_server, alice_with, mda, tmp_path):
    messages = [msg(f"message {n}", "x" * n) for n in range(1, 6)]
    mailbox = alice_with(messages)
    mda_argv, out = mda
    poll = f"poll 127.0.0.1 port {pop3_server.port}"
    fetchmail(tmp_path, poll, "keep fetchall sslproto ''", mda_argv)
    assert count(mailbox) == 5
    # "expunge 2": QUIT after every second DELE and log in again at once, so each QUIT must have committed
    # its deletions and released the lock before it answered (or the next login gets [IN-USE]).
    transcript = fetchmail(tmp_path, poll, "no keep fetchall expunge 2 sslproto ''", mda_argv)
    assert transcript.count("POP3> QUIT") == 3 and "IN-USE" not in transcript
    assert transcript.count("POP3> DELE") == 5
    assert [without_fetchmail_received(data) for data in delivered(out)] == [served(m) for m in messages] * 2
    assert count(mailbox) == 0
    assert_unlocked(mailbox)


@needs_fetchmail
def test_fetchmail_stls_with_a_checked_certificate_fetches_only_new_messages(
    tls_server, alice_with, mda, ca_file, tmp_path
):
    first = [msg("one"), msg("two")]
    mailbox = alice_with(first)
    mda_argv, out = mda
    poll = f"poll localhost via 127.0.0.1 port {tls_server.port}"
    # sslproto tls1.2+ without "ssl": STLS is required; the UIDL list of what was seen goes to the id file.
    options = f"keep sslproto 'tls1.2+' sslcertck sslcertfile {ca_file} sslcommonname localhost"
    transcript = fetchmail(tmp_path, poll, options, mda_argv)
    assert "POP3> STLS" in transcript and "upgrade to TLS succeeded" in transcript
    assert [without_fetchmail_received(data) for data in delivered(out)] == [served(m) for m in first]
    new = msg("three", "arrived between the runs")
    deliver("alice", new)
    transcript = fetchmail(tmp_path, poll, options, mda_argv)
    assert "3 messages (2 seen)" in transcript
    assert "RETR 1" not in transcript and "RETR 2" not in transcript
    assert [without_fetchmail_received(data) for data in delivered(out)] == [served(m) for m in [*first, new]]
    assert count(mailbox) == 3
    assert_unlocked(mailbox)


# mpop ----------------------------------------------------------------------------------------------------
def mpop(tmp_path: Path, settings: str, port: int, keep: str, box: Path) -> str:
    """One ``mpop`` run with ``--debug`` (the transcript); UIDs of what was seen in a uidls file."""
    config = private_file(
        tmp_path / "mpoprc",
        (
            "account alice\n"
            f"host 127.0.0.1\nport {port}\ntimeout 20\n"
            "user alice\npassword secret\n"
            f"{settings}\n"
            f"keep {keep}\nonly_new on\nreceived_header off\n"
            f"uidls_file {tmp_path / 'mpop-uidls'}\n"
            f"delivery maildir {box}\n"
        ),
    )
    return run(["mpop", "--file", str(config), "--debug", "alice"], tmp_path)


def lf(data: bytes) -> bytes:
    """mpop's maildir form: CRLF written as LF; a lone CR stays."""
    return data.replace(b"\r\n", b"\n")


@needs_mpop
def test_mpop_stls_auth_plain_keeps_the_corpus_and_fetches_only_new(
    tls_server, alice_with, ca_file, tmp_path
):
    messages = corpus()
    mailbox = alice_with(messages)
    box = maildir(tmp_path / "Maildir")
    settings = f"auth plain\ntls on\ntls_starttls on\ntls_trust_file {ca_file}"
    transcript = mpop(tmp_path, settings, tls_server.port, "on", box)
    assert "--> STLS" in transcript and "--> AUTH PLAIN" in transcript and "+OK Logged in." in transcript
    assert maildir_messages(box) == sorted(lf(served(raw)) for raw in messages)
    new = msg("new", "arrived between the runs")
    deliver("alice", new)
    transcript = mpop(tmp_path, settings, tls_server.port, "on", box)
    assert f"--> RETR {len(messages) + 1}" in transcript
    assert transcript.count("--> RETR") == 1
    assert maildir_messages(box) == sorted(lf(served(raw)) for raw in [*messages, new])
    assert count(mailbox) == len(messages) + 1
    assert_unlocked(mailbox)


@needs_mpop
def test_mpop_implicit_tls_deletes_at_quit(tls_server, alice_with, ca_file, tmp_path):
    messages = [msg(f"message {n}", ".leading dot\r\n" * n) for n in range(1, 4)]
    mailbox = alice_with(messages)
    box = maildir(tmp_path / "Maildir")
    settings = f"auth user\ntls on\ntls_starttls off\ntls_trust_file {ca_file}"
    transcript = mpop(tmp_path, settings, tls_server.tls_port, "off", box)
    assert "STLS" not in transcript and transcript.count("--> DELE") == 3
    assert "--> QUIT" in transcript and "<-- +OK Logging out, messages deleted." in transcript
    assert maildir_messages(box) == sorted(lf(served(raw)) for raw in messages)
    assert count(mailbox) == 0
    assert_unlocked(mailbox)


# getmail6 ------------------------------------------------------------------------------------------------
def getmail(tmp_path: Path, retriever: str, mda_argv: list[str], options: str) -> str:
    """One getmail run; its state (the ``oldmail`` file of UIDLs seen) lives in ``tmp_path / "getmail"``.

    getmail refuses to write a Maildir as root (CI runs as root), so it delivers through MDA_external, which
    ``allow_root_commands`` permits; the MDA is the same for every user."""
    state = tmp_path / "getmail"
    state.mkdir(exist_ok=True)
    mda_path, *mda_args = mda_argv
    rc = private_file(
        state / "getmailrc",
        (
            f"[retriever]\n{retriever}\nusername = alice\npassword = secret\ntimeout = 20\n\n"
            f"[destination]\ntype = MDA_external\npath = {mda_path}\narguments = {tuple(mda_args)!r}\n"
            "allow_root_commands = true\n\n"
            f"[options]\nverbose = 2\n{options}\n"
        ),
    )
    return run([GETMAIL or "getmail", "--getmaildir", str(state), "--rcfile", str(rc)], tmp_path)


def without_getmail_trace(data: bytes) -> bytes:
    """getmail's additions: Return-Path, Delivered-To and a (folded) Received field, in that order."""
    match = re.match(rb"Return-Path: .*\nDelivered-To: .*\nReceived: .*\n(?:[ \t].*\n)*", data)
    assert match, data[:200]
    assert b"getmail" in match.group(0)
    return data[match.end() :]


def getmail_form(data: bytes) -> bytes:
    """LF line endings; Python's ``email`` generator writes a lone CR as a line break."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


@needs_getmail
def test_getmail_user_pass_keeps_the_corpus_and_reads_only_new(pop3_server, alice_with, mda, tmp_path):
    messages = corpus()
    mailbox = alice_with(messages)
    mda_argv, out = mda
    retriever = f"type = SimplePOP3Retriever\nserver = 127.0.0.1\nport = {pop3_server.port}"
    options = "read_all = false\ndelete = false"
    output = getmail(tmp_path, retriever, mda_argv, options)
    assert f"{len(messages)} messages" in output and "retrieved, 0 skipped" in output
    # poplib's 2,048-octet line limit would refuse corpus 07; getmail raises it to 1 MiB
    assert [without_getmail_trace(data) for data in delivered(out)] == [
        getmail_form(with_separator(served(raw))) for raw in messages
    ]
    assert count(mailbox) == len(messages)
    new = msg("new", "arrived between the runs")
    deliver("alice", new)
    output = getmail(tmp_path, retriever, mda_argv, options)
    assert f"1 messages ({len(served(new))} bytes) retrieved, {len(messages)} skipped" in output
    assert without_getmail_trace(delivered(out)[-1]) == getmail_form(served(new))
    assert len(delivered(out)) == len(messages) + 1
    assert count(mailbox) == len(messages) + 1
    assert_unlocked(mailbox)


@needs_getmail
def test_getmail_implicit_tls_deletes_only_when_asked(tls_server, alice_with, mda, ca_file, tmp_path):
    messages = [msg(f"message {n}", "..\r\n.\r\n" * n) for n in range(1, 4)]
    mailbox = alice_with(messages)
    mda_argv, out = mda
    retriever = (
        f"type = SimplePOP3SSLRetriever\nserver = 127.0.0.1\nport = {tls_server.tls_port}\n"
        f"ca_certs = {ca_file}"
    )
    getmail(tmp_path, retriever, mda_argv, "read_all = true\ndelete = false")
    assert count(mailbox) == 3
    output = getmail(tmp_path, retriever, mda_argv, "read_all = true\ndelete = true")
    assert output.count(", deleted") == 3
    assert [without_getmail_trace(data) for data in delivered(out)] == [
        getmail_form(served(raw)) for raw in messages
    ] * 2
    assert count(mailbox) == 0
    assert_unlocked(mailbox)
