"""Shared set-up for the benchmarks: a database of their own, a runpop3 subprocess, memory readings.

Each script prints its figures; nothing here asserts timings. The database is DATABASE_URL if set
(e.g. postgres://postgres@127.0.0.1:5432/popserver_bench), else a fresh SQLite file under data/.
"""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def setup_django(fast_hasher: bool = False) -> dict[str, str]:
    """Point Django at the bench database, migrate it, and return the environment for subprocesses."""
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"sqlite:///{REPO / 'data' / 'bench.sqlite3'}")
    if env["DATABASE_URL"].startswith("sqlite:///"):
        path = Path(env["DATABASE_URL"][len("sqlite:///") :])
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    env["DJANGO_SETTINGS_MODULE"] = "project.settings"
    env["POPSERVER_AUTH_FAILURE_DELAY"] = "0"
    env["POPSERVER_MAX_SESSIONS"] = "64"
    env["LOG_LEVEL"] = "WARNING"
    if fast_hasher:
        env["BENCH_FAST_HASHER"] = "1"
    os.environ.update(env)
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    if fast_hasher:
        settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    if "postgresql" in settings.DATABASES["default"]["ENGINE"]:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
    call_command("migrate", verbosity=0)
    return env


def make_user(username: str, password: str):
    from django.contrib.auth import get_user_model

    from popserver.models import Mailbox

    user = get_user_model().objects.create_user(username=username, password=password)
    return Mailbox.objects.create(user=user)


def bulk_messages(mailbox, count: int, body: bytes) -> None:
    """Insert ``count`` messages quickly (bulk, not through deliver()); each gets one body row."""
    from django.db import transaction

    from popserver.models import Message, MessageChunk

    batch = 2000
    for start in range(0, count, batch):
        with transaction.atomic():
            n = min(batch, count - start)
            messages = Message.objects.bulk_create(
                [
                    Message(
                        mailbox=mailbox,
                        uid=f"{start + i + 1:08X}{mailbox.uid_validity:08X}",
                        size=len(body),
                        chunk_count=1,
                    )
                    for i in range(n)
                ]
            )
            MessageChunk.objects.bulk_create([MessageChunk(message=m, seq=0, data=body) for m in messages])
    from popserver.models import Mailbox

    Mailbox.objects.filter(pk=mailbox.pk).update(next_uid=count + 1)


class Server:
    """runpop3 on 127.0.0.1 and a free port."""

    def __init__(self, env: dict[str, str]):
        code = (
            "import os, sys; sys.argv=['manage.py','runpop3','127.0.0.1:0'];"
            "os.environ.setdefault('DJANGO_SETTINGS_MODULE','project.settings');"
            "import django; django.setup();"
            "from django.conf import settings;"
            "os.environ.get('BENCH_FAST_HASHER') and setattr(settings, 'PASSWORD_HASHERS',"
            " ['django.contrib.auth.hashers.MD5PasswordHasher']);"
            "from django.core.management import execute_from_command_line; execute_from_command_line(sys.argv)"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
        )
        for line in self.proc.stdout:
            if match := re.search(r"POP3 on 127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError("runpop3 did not start")

    def rss_kib(self) -> int:
        return _status_kib(self.proc.pid, "VmRSS")

    def peak_kib(self) -> int:
        return _status_kib(self.proc.pid, "VmHWM")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result
