"""``manage.py deliver`` as an MTA runs it: a subprocess in another working directory, every exit status, a
one-line reason on stderr and never a traceback, and once as an unprivileged user.

The subprocesses must see the rows this test commits, hence ``transaction=True`` throughout.
"""

import grp
import hashlib
import os
import pwd
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
from django.db import connection, transaction

from popserver.storage.bodies import get_body_store
from popserver.models import Mailbox, Message
from tests.conftest import CORPUS_SIZES, REPO, corpus_files, manage_py_command, subprocess_env
from tests.test_delivery import CORPUS_HEADERS, UID_RE, presented

pytestmark = pytest.mark.django_db(transaction=True)

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_TEMPFAIL = 0, 64, 65, 67, 69, 75
MESSAGE = b"From: carol@example.org\nSubject: hello\n\nbody\n"


def deliver_command(*args: str, data: bytes = MESSAGE, cwd: Path, env: dict | None = None, prefix=()):
    return subprocess.run(
        [*prefix, *manage_py_command("deliver", *args)],
        input=data,
        cwd=cwd,
        env=env if env is not None else subprocess_env(),
        capture_output=True,
        check=False,
        timeout=100,
    )


def assert_refused(result, status: int, reason: str = "") -> str:
    """Exit ``status``, exactly one line on stderr that starts with ``deliver:``, no traceback."""
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == status, stderr
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n") and stderr.startswith("deliver: "), stderr
    assert reason in stderr
    assert result.stdout == b""
    return stderr


def write_module(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())


def settings_env(folder: Path, module: str, **extra: str) -> dict:
    """The environment for a settings module written into ``folder``."""
    return subprocess_env(DJANGO_SETTINGS_MODULE=module, PYTHONPATH=f"{folder}{os.pathsep}{REPO}", **extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Delivered -------------------------------------------------------------------------------------------------
def test_every_corpus_message_delivered_by_the_command(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice", email="alice@example.org")
    for path in corpus_files():
        result = deliver_command("Alice@Example.org", data=path.read_bytes(), cwd=tmp_path)
        assert (result.returncode, result.stderr, result.stdout) == (EX_OK, b"", b""), path.name
    mailbox.refresh_from_db()
    messages = list(Message.objects.filter(mailbox=mailbox))
    assert len(messages) == len(corpus_files())
    for number, (path, message) in enumerate(zip(corpus_files(), messages, strict=True), start=1):
        assert b"".join(get_body_store().read_chunks(message.pk)) == presented(path.read_bytes()), path.name
        assert message.size == CORPUS_SIZES[path.name][1], path.name
        assert (message.subject, message.sender, message.date) == CORPUS_HEADERS[path.name], path.name
        assert message.uid == f"{number:08X}{mailbox.uid_validity:08X}"  # unique, and as stored at delivery
        assert UID_RE.fullmatch(message.uid)


@pytest.mark.slow
def test_a_50_mb_message_through_the_pipe(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    data = b"Subject: big\r\n\r\n" + (b"z" * 98 + b"\r\n") * 500_000
    result = deliver_command("alice", data=data, cwd=tmp_path)
    assert (result.returncode, result.stderr) == (EX_OK, b"")
    message = Message.objects.get(mailbox=mailbox)
    assert message.size == len(data)
    digest = hashlib.sha256()
    for chunk in get_body_store().read_chunks(message.pk):
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_another_apps_failing_system_check_does_not_bounce_mail(make_mailbox, tmp_path):
    make_mailbox("alice")
    write_module(tmp_path, "failingcheck/__init__.py", "")
    write_module(
        tmp_path,
        "failingcheck/apps.py",
        """
        from django.apps import AppConfig
        from django.core import checks


        def always_fails(app_configs, **kwargs):
            return [checks.Error("this site is misconfigured", id="failingcheck.E001")]


        class FailingCheckConfig(AppConfig):
            name = "failingcheck"

            def ready(self):
                checks.register(always_fails)
    """,
    )
    write_module(
        tmp_path,
        "checksettings.py",
        """
        from tests.settings import *  # noqa: F403
        from tests.settings import INSTALLED_APPS

        INSTALLED_APPS = [*INSTALLED_APPS, "failingcheck"]
    """,
    )
    env = settings_env(tmp_path, "checksettings")
    check = subprocess.run(
        manage_py_command("check"), cwd=tmp_path, env=env, capture_output=True, check=False, timeout=100
    )
    assert check.returncode != 0 and b"failingcheck.E001" in check.stderr  # the check does fail
    result = deliver_command("alice", cwd=tmp_path, env=env)
    assert (result.returncode, result.stderr) == (EX_OK, b"")
    assert Message.objects.count() == 1


def test_the_settings_option_is_honoured(make_mailbox, tmp_path):
    make_mailbox("alice")
    env = subprocess_env(DJANGO_SETTINGS_MODULE="no_such_settings_module")
    result = deliver_command("--settings=tests.settings", "alice", cwd=tmp_path, env=env)
    assert (result.returncode, result.stderr) == (EX_OK, b"")
    assert Message.objects.count() == 1


# Refused for good ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"From carol@example.org Thu Nov 26 10:00:00 2026\n"])
def test_empty_input_exits_65(make_mailbox, tmp_path, data):
    make_mailbox("alice")
    assert_refused(deliver_command("alice", data=data, cwd=tmp_path), EX_DATAERR, "empty")
    assert not Message.objects.exists()


@pytest.mark.parametrize("recipient", ["carol", "carol@example.org", ""])
def test_unknown_recipient_exits_67(make_mailbox, tmp_path, recipient):
    make_mailbox("alice", email="alice@example.org")
    assert_refused(deliver_command(recipient, cwd=tmp_path), EX_NOUSER, "no ")
    assert not Message.objects.exists()


def test_over_the_size_limit_exits_69(make_mailbox, tmp_path):
    make_mailbox("alice")
    plain, from_line = (next(p for p in corpus_files() if p.name.startswith(n)) for n in ("01-", "12-"))
    env = subprocess_env(POPSERVER_MAX_MESSAGE_SIZE="240")  # 01 is 241 octets
    result = deliver_command("alice", data=plain.read_bytes(), cwd=tmp_path, env=env)
    assert_refused(result, EX_UNAVAILABLE, "limit")
    # reading stops soon after the limit: 5 MB of input are not read to the end, and the reason gives no
    # size it does not know (never "241 octets" for a 5,000,000-octet message)
    stderr = assert_refused(
        deliver_command("alice", data=b"x" * 5_000_000, cwd=tmp_path, env=env), EX_UNAVAILABLE
    )
    assert "message of more than 240 octets is over the limit of 240 octets" in stderr
    assert not Message.objects.exists()
    # exactly at the limit, and the envelope line does not count: 12 is 276 octets without it
    env = subprocess_env(POPSERVER_MAX_MESSAGE_SIZE=str(CORPUS_SIZES[from_line.name][1]))
    assert deliver_command("alice", data=from_line.read_bytes(), cwd=tmp_path, env=env).returncode == EX_OK
    assert Message.objects.get().size == CORPUS_SIZES[from_line.name][1]


@pytest.mark.parametrize(
    "args",
    [(), ("alice", "bob"), ("--no-such-option", "alice")],
    ids=["no recipient", "two recipients", "unknown option"],
)
def test_usage_errors_exit_64(make_mailbox, tmp_path, args):
    make_mailbox("alice")
    assert_refused(deliver_command(*args, cwd=tmp_path), EX_USAGE, "usage error")
    assert not Message.objects.exists()


# Try again later -------------------------------------------------------------------------------------------


def test_unreachable_database_exits_75(tmp_path):
    env = subprocess_env(DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/popserver")
    env.pop("POPSERVER_TEST_DB_NAME")
    assert_refused(deliver_command("alice", cwd=tmp_path, env=env), EX_TEMPFAIL, "database unavailable")


def test_busy_database_exits_75(make_mailbox, tmp_path):
    mailbox = make_mailbox("alice")
    write_module(
        tmp_path,
        "busysettings.py",
        """
        from tests.settings import *  # noqa: F403
        from tests.settings import DATABASES

        if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
            DATABASES["default"]["OPTIONS"]["timeout"] = 0.2
        elif DATABASES["default"]["ENGINE"].endswith("mysql"):  # MariaDB's shortest row-lock wait
            DATABASES["default"].setdefault("OPTIONS", {})["init_command"] = "SET SESSION innodb_lock_wait_timeout=1"
        else:
            DATABASES["default"].setdefault("OPTIONS", {})["options"] = "-c lock_timeout=200"
    """,
    )
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute(f"LOCK TABLE {Mailbox._meta.db_table} IN EXCLUSIVE MODE")
        elif connection.vendor == "mysql":  # the row lock delivery waits for
            Mailbox.objects.select_for_update().get(pk=mailbox.pk)
        else:  # an IMMEDIATE transaction holds SQLite's one write lock
            Mailbox.objects.filter(pk=mailbox.pk).update(pop3_enabled=True)
        result = deliver_command("alice", cwd=tmp_path, env=settings_env(tmp_path, "busysettings"))
    assert_refused(result, EX_TEMPFAIL, "database unavailable")
    assert not Message.objects.exists()


BROKEN_SETTINGS = {
    "missing module": None,
    "raises on import": "raise RuntimeError('the settings are broken\\nover two lines')\n",
    "unreadable secret": "raise PermissionError(13, 'Permission denied', '/srv/popserver/data/secret_key')\n",
    "an app that does not exist": "from tests.settings import *\nINSTALLED_APPS = ['no_such_app']\n",
    "no databases": "from tests.settings import *\nDATABASES = {}\n",
}


@pytest.mark.parametrize("case", BROKEN_SETTINGS, ids=list(BROKEN_SETTINGS))
def test_broken_settings_exit_75(tmp_path, case):
    module = "broken_settings_" + case.replace(" ", "_")
    if BROKEN_SETTINGS[case] is not None:
        write_module(tmp_path, f"{module}.py", BROKEN_SETTINGS[case])
    result = deliver_command("alice", cwd=tmp_path, env=settings_env(tmp_path, module))
    assert_refused(result, EX_TEMPFAIL)


# As the MTA's own unprivileged user ------------------------------------------------------------------------
MTA_USER, MTA_GROUP = "nobody", "nogroup"


@pytest.fixture
def mta_user():
    """(uid, gid, command prefix, data folder owned by the user); skips when that is not possible here."""
    if os.geteuid() != 0:
        pytest.skip("switching to an unprivileged user needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    try:
        uid, gid = pwd.getpwnam(MTA_USER).pw_uid, grp.getgrnam(MTA_GROUP).gr_gid
    except KeyError:
        pytest.skip(f"no user {MTA_USER} or group {MTA_GROUP}")
    prefix = ("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups")
    data_dir = Path(tempfile.mkdtemp(prefix="popserver-mta-"))  # not under pytest's root-only tmp folders
    try:
        os.chown(data_dir, uid, gid)
        probe = subprocess.run(
            [*prefix, sys.executable, "-c", "import django, popserver"],
            cwd=data_dir,
            capture_output=True,
            check=False,
            env=subprocess_env(),
            timeout=100,
        )
        if probe.returncode != 0:
            pytest.skip(f"{MTA_USER} cannot read the repository or the venv: {probe.stderr.decode()[-200:]}")
        yield uid, gid, prefix, data_dir
    finally:
        shutil.rmtree(data_dir)


def test_deliver_as_an_unprivileged_user(make_mailbox, mta_user):
    """What the MTA's user needs: read the repository and the venv; write a data folder of its own (the
    generated secret key; with SQLite the database, its -wal and -shm files, so the folder itself)."""
    uid, gid, prefix, data_dir = mta_user
    mailbox = make_mailbox("alice", email="alice@example.org")
    env = subprocess_env(POPSERVER_DATA_DIR=str(data_dir), HOME=str(data_dir))
    copy = None
    if connection.vendor == "sqlite":  # a copy of the test database in a folder the user owns
        copy = data_dir / "db.sqlite3"
        source, target = sqlite3.connect(connection.settings_dict["NAME"]), sqlite3.connect(copy)
        source.backup(target)
        source.close()
        target.close()
        os.chown(copy, uid, gid)
        env["POPSERVER_TEST_DB_NAME"] = str(copy)
    message = next(p for p in corpus_files() if p.name.startswith("03-")).read_bytes()
    result = deliver_command("ALICE@example.org", data=message, cwd=data_dir, env=env, prefix=prefix)
    assert (result.returncode, result.stderr) == (EX_OK, b"")
    refused = deliver_command("carol", data=message, cwd=data_dir, env=env, prefix=prefix)
    assert_refused(refused, EX_NOUSER)
    if copy is None:
        stored = Message.objects.get(mailbox=mailbox)
        rows = [(stored.size, stored.subject, b"".join(get_body_store().read_chunks(stored.pk)))]
    else:
        db = sqlite3.connect(copy)
        rows = db.execute(
            "SELECT m.size, m.subject, c.data FROM popserver_message m "
            "JOIN popserver_messagechunk c ON c.message_id = m.id WHERE m.mailbox_id = ?",
            (mailbox.pk,),
        ).fetchall()
        db.close()
    assert rows == [(CORPUS_SIZES["03-bare-lf.eml"][1], "bare lf", presented(message))]
    assert (data_dir / "secret_key").stat().st_uid == uid  # generated by the user, in its own folder
