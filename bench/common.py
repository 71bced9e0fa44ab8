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

    def __init__(
        self,
        env: dict[str, str],
        args: list[str] | tuple[str, ...] = (),
        stderr=None,
        wrapper: list[str] | tuple[str, ...] = (),
    ):
        """``args`` are passed to runpop3 after the address; ``stderr`` (a file) takes the server's log;
        ``wrapper`` is a command that runs the Python process (``valgrind --tool=callgrind ...``)."""
        code = (
            f"import os, sys; sys.argv=['manage.py','runpop3','127.0.0.1:0',*{list(args)!r}];"
            "os.environ.setdefault('DJANGO_SETTINGS_MODULE','project.settings');"
            "import django; django.setup();"
            "from django.conf import settings;"
            "os.environ.get('BENCH_FAST_HASHER') and setattr(settings, 'PASSWORD_HASHERS',"
            " ['django.contrib.auth.hashers.MD5PasswordHasher']);"
            "from django.core.management import execute_from_command_line; execute_from_command_line(sys.argv)"
        )
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        for line in self.proc.stdout:
            if match := re.search(r"POP3 on 127\.0\.0\.1:(\d+)", line):
                self.port = int(match.group(1))
                tls = re.search(r"POP3S on 127\.0\.0\.1:(\d+)", line)  # with --tls-port
                self.tls_port = int(tls.group(1)) if tls else None
                break
        else:
            self.proc.wait(timeout=30)
            said = Path(stderr.name).read_text()[-2000:].strip() if hasattr(stderr, "name") else ""
            raise RuntimeError(f"runpop3 did not start (exit status {self.proc.returncode}) {said}")

    def rss_kib(self) -> int:
        return _status_kib(self.proc.pid, "VmRSS")

    def peak_kib(self) -> int:
        return _status_kib(self.proc.pid, "VmHWM")

    def stop(self, timeout: float = 30) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=timeout)


def reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM (peak RSS) to its current RSS (Linux, root or the owner); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def sample_message(size: int, subject: str = "bench") -> bytes:
    """A plain-text message of exactly ``size`` octets (CRLF line endings, body lines of 75 octets)."""
    head = (
        f"From: Sender <sender@example.org>\r\nTo: Bench <bench@example.org>\r\nSubject: {subject}\r\n"
        "Date: Mon, 01 Dec 2025 12:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod..\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    body = body[: size - len(head) - 2]
    if body.endswith(b"\r"):  # never a CR before the final CRLF
        body = body[:-1] + b"x"
    message = head + body + b"\r\n"
    assert len(message) == size
    return message


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat as [comm, state, ppid, ...]: [2] is the parent, [12:16] utime, stime, cutime, cstime."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return [text[text.index("(") + 1 : text.rindex(")")], *text[text.rindex(")") + 2 :].split()]


def children(pid: int, name: str | None = None) -> list[int]:
    """The live child processes of ``pid`` (whose command name is ``name``, if given)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = _stat_fields(int(entry.name))
            except OSError:
                continue
            if int(fields[2]) == pid and (name is None or fields[0] == name):
                found.append(int(entry.name))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by a process, its live children and the children it has reaped.

    For a server that forks (Dovecot's master, runpop3 with workers) the difference between two readings is
    what the whole server used in between (10 ms ticks: fine over seconds of load).
    """
    total = 0
    for p in [pid, *children(pid)]:
        try:
            total += sum(int(x) for x in _stat_fields(p)[12:16])  # utime, stime, cutime, cstime
        except OSError:
            continue  # reaped meanwhile: its time is in the parent's cutime now
    return total / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result
