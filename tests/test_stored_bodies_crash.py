"""kill -9 of ``deliver`` or of the server between object write, row commit and object removal (issue 21):
every state left is one that ``popgc`` repairs, and no message is ever lost or corrupted.

The processes run ``tests/crashpoint.py``, which makes them SIGKILL themselves at the named point.
"""

import hashlib
import re
import signal
import socket
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from popserver.mailin.delivery import deliver
from popserver.models import Message, StoredBody
from popserver.storage.bodies import object_name, read_message
from tests.conftest import REPO, STORAGE_STORE, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)

BODY = b"From: a@example.org\r\nSubject: crash\r\n\r\n" + b"these bytes must survive\r\n" * 50
SHARED = b"From: a@example.org\r\nSubject: shared\r\n\r\nfor alice and bob\r\n"


@pytest.fixture
def bodies(settings, tmp_path):
    folder = tmp_path / "bodies"
    settings.POPSERVER_BODY_STORE = STORAGE_STORE
    settings.STORAGES = {
        **settings.STORAGES,
        "popserver": {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(folder)},
        },
    }
    return folder


def env(folder: Path) -> dict[str, str]:
    return subprocess_env(POPSERVER_BODY_STORE=STORAGE_STORE, BODIES_DIR=str(folder))


def crashing(point: str, *argv: str, folder: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "crashpoint.py"), point, *argv],
        env=env(folder),
        cwd=REPO,
        **kwargs,
    )


def object_file(folder: Path, data: bytes) -> Path:
    return folder / object_name(hashlib.sha256(data).hexdigest())


def popgc() -> str:
    out = StringIO()
    call_command("popgc", "--grace", "0", stdout=out, stderr=StringIO())
    return out.getvalue()


def test_deliver_killed_after_the_object_write(bodies, make_mailbox):
    make_mailbox("alice")
    process = crashing("after-object-write", "deliver", "alice", folder=bodies, stdin=subprocess.PIPE)
    process.communicate(BODY, timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not Message.objects.exists() and not StoredBody.objects.exists()  # no row without its object
    assert object_file(bodies, BODY).read_bytes() == BODY  # at most an object nothing refers to
    assert "1 object(s) without a row removed" in popgc()
    assert not object_file(bodies, BODY).exists()
    message = deliver("alice", BODY)  # the MTA tries again
    assert b"".join(read_message(message)) == BODY


def test_deliver_killed_after_the_row_commit(bodies, make_mailbox):
    make_mailbox("alice")
    process = crashing("after-row-commit", "deliver", "alice", folder=bodies, stdin=subprocess.PIPE)
    process.communicate(BODY, timeout=60)
    assert process.returncode == -signal.SIGKILL
    message = Message.objects.get()
    assert b"".join(read_message(message)) == BODY
    assert popgc().startswith("0 reference count(s) corrected, 0 unreferenced body(ies) removed, 0 object(s)")
    assert b"".join(read_message(message)) == BODY


def start_server(point: str, folder: Path) -> tuple[subprocess.Popen, int]:
    process = crashing(point, "runpop3", "127.0.0.1:0", folder=folder, stdout=subprocess.PIPE, text=True)
    for line in process.stdout:
        if match := re.search(r"POP3 on 127\.0\.0\.1:(\d+)", line):
            return process, int(match.group(1))
    process.kill()
    raise RuntimeError("runpop3 did not start")


def delete_first_and_quit(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"USER alice\r\nPASS secret\r\nDELE 1\r\nQUIT\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data


@pytest.mark.parametrize("point", ["before-object-removal", "during-object-removal"])
def test_server_killed_between_the_quit_commit_and_the_object_removal(point, bodies, make_mailbox):
    make_mailbox("alice")
    make_mailbox("bob")
    deliver("alice", BODY)  # only alice's: removed at her QUIT
    deliver("alice", SHARED)
    deliver("bob", SHARED)
    process, port = start_server(point, bodies)
    try:
        replies = delete_first_and_quit(port)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
    assert b"Logging out" not in replies  # the server died before it could answer
    # The QUIT committed: the message is gone; its body's row is left without references.
    assert list(
        Message.objects.filter(mailbox__user__username="alice").values_list("subject", flat=True)
    ) == ["shared"]
    orphan = StoredBody.objects.get(sha256=hashlib.sha256(BODY).hexdigest())
    assert orphan.refs == 0
    assert object_file(bodies, BODY).exists() == (point == "before-object-removal")
    assert "1 unreferenced body(ies) removed" in popgc()
    assert not object_file(bodies, BODY).exists() and not StoredBody.objects.filter(refs=0).exists()
    for message in Message.objects.all():  # nothing else lost or corrupted
        assert b"".join(read_message(message)) == SHARED
    assert StoredBody.objects.get().refs == 2
    again = deliver("bob", BODY)  # the same content later: its object is written again
    assert b"".join(read_message(again)) == BODY
