"""Bench (issue 17): mail in over LMTP beside Dovecot's LMTP and beside ``manage.py deliver`` in a loop.

    .venv/bin/python bench/lmtp_compare.py [--clients 1,8] [--recipients 1,10] [--seconds 5]
        [--popserver HOST:PORT | --runlmtp-args="--workers 2"] [--deliver-runs 30] [--no-pipelining]

Each client is a process holding one LMTP connection (``smtplib.LMTP``) and sending ``--size``-octet messages
for ``--seconds``: MAIL FROM, one RCPT TO per recipient, DATA (sent in one write when the server offers
PIPELINING, RFC 2920, as Postfix's LMTP client does), the dot-stuffed message, then one reply per accepted
recipient, in RCPT order (RFC 2033 s.4.2: smtplib's own ``data()`` would read only the first). Client ``c`` with
``k`` recipients sends to ``rcpt<c*k>@localhost`` .. ``rcpt<c*k+k-1>@localhost``, so clients never share a
mailbox. "messages/s" counts transactions whose every recipient got a 2xx; "deliveries/s" counts 2xx replies
after DATA (one stored copy each).

The popserver side is ``--popserver HOST:PORT`` (a server you started, whose database must have the
mailboxes ``rcpt<n>`` with the addresses ``rcpt<n>@localhost``; the script prints how to create them), or
else ``manage.py runlmtp 127.0.0.1:0`` started on the bench database when that command exists (it is
skipped, with a note, when it does not). Dovecot's LMTP (bench/dovecot.py: Debian's dovecot-lmtpd, Maildir,
``mail_fsync = optimized``: each delivery is fsynced) and ``manage.py deliver`` (``--deliver-runs`` runs one
after another, one recipient each: a whole Python and Django start-up per message) run in the same run.
Durability differs by database: the project runs SQLite with ``synchronous=NORMAL`` (no fsync per commit),
so ``--dovecot-fsync never`` is the like-for-like comparison there; PostgreSQL fsyncs each commit, as
Dovecot's default fsyncs each delivered message.

The database is DATABASE_URL (SQLite under data/ by default; for PostgreSQL an existing database the bench
may wipe). Run as root (Dovecot is installed with apt-get if missing).
"""

import argparse
import multiprocessing
import os
import re
import shlex
import smtplib
import socket
import subprocess
import sys
import time

from common import REPO, _stat_fields, make_user, sample_message, setup_django, tree_cpu_seconds
from dovecot import Dovecot

SENDER = b"bench@example.org"
START_TIMEOUT = 60.0


def recipients_of(client: int, count: int) -> list[bytes]:
    return [b"rcpt%d@localhost" % (client * count + j) for j in range(count)]


def wire_payload(message: bytes) -> bytes:
    """The message as sent after DATA's 354: dot-stuffed (RFC 5321 s.4.5.2) and terminated."""
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


def connect(host: str, port: int) -> smtplib.LMTP:
    """An LMTP connection after LHLO (LMTP's ehlo() sends LHLO), without Nagle's delay on the client side."""
    client = smtplib.LMTP(host, port, timeout=60)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.ehlo()
    return client


def _lmtp_worker(host, port, recipients, payload, seconds, pipelining, barrier, results) -> None:
    messages = deliveries = errors = 0
    first_error = ""
    latencies: list[float] = []
    client = connect(host, port)
    pipelined = pipelining and client.has_extn("pipelining")
    commands = b"MAIL FROM:<%s>\r\n" % SENDER + b"".join(b"RCPT TO:<%s>\r\n" % r for r in recipients)
    barrier.wait()
    cpu = time.process_time()
    started = time.perf_counter()
    now = started
    while now < started + seconds:
        try:
            if pipelined:
                client.send(commands + b"DATA\r\n")
                replies = [client.getreply() for _ in range(len(recipients) + 2)]
            else:
                replies = [client.mail(SENDER.decode())]
                replies += [client.rcpt(r.decode()) for r in recipients]
                client.putcmd("data")
                replies.append(client.getreply())
            accepted = sum(200 <= code < 300 for code, _ in replies[1:-1])
            if replies[-1][0] != 354:
                raise smtplib.SMTPResponseException(*replies[-1])
            client.send(payload)
            finals = [client.getreply() for _ in range(accepted)]  # RFC 2033 s.4.2: one per accepted RCPT
            good = sum(200 <= code < 300 for code, _ in finals)
            deliveries += good
            if good == len(recipients):
                messages += 1
                latencies.append(time.perf_counter() - now)
            else:
                errors += 1
                bad = next((r for r in replies[1:-1] + finals if not 200 <= r[0] < 300), (0, b""))
                first_error = first_error or f"{bad[0]} {bad[1].decode(errors='replace')}"
        except (smtplib.SMTPException, OSError) as exc:
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
            try:
                client.rset()
            except (smtplib.SMTPException, OSError):
                client.close()
                client = connect(host, port)
        now = time.perf_counter()
    try:
        client.quit()
    except (smtplib.SMTPException, OSError):
        client.close()
    results.put(
        (messages, deliveries, errors, now - started, latencies, time.process_time() - cpu, first_error)
    )


class Result:
    def __init__(self, gathered: list[tuple]):
        self.messages = sum(r[0] for r in gathered)
        self.deliveries = sum(r[1] for r in gathered)
        self.errors = sum(r[2] for r in gathered)
        self.seconds = max(r[3] for r in gathered)
        self.latencies = sorted(x for r in gathered for x in r[4])
        self.client_cpu = sum(r[5] for r in gathered)
        self.first_error = next((r[6] for r in gathered if r[6]), "")
        self.server_cpu: float | None = None  # set by the caller for a server it started
        self.database_cpu: float | None = None  # PostgreSQL's processes meanwhile, when it runs here

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def deliveries_per_second(self) -> float:
        return self.deliveries / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        return self.latencies[min(len(self.latencies) - 1, int(q * len(self.latencies)))] * 1000


def lmtp_load(
    host: str,
    port: int,
    clients: int,
    recipients: int,
    message: bytes,
    seconds: float,
    pipelining: bool = True,
) -> Result:
    """``clients`` processes, each one LMTP connection sending to ``recipients`` mailboxes of its own."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    payload = wire_payload(message)
    workers = [
        ctx.Process(
            target=_lmtp_worker,
            args=(host, port, recipients_of(c, recipients), payload, seconds, pipelining, barrier, results),
        )
        for c in range(clients)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=START_TIMEOUT)
    gathered = [results.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    return Result(gathered)


def deliver_loop(env: dict[str, str], message: bytes, runs: int) -> tuple[float, float]:
    """``manage.py deliver`` run ``runs`` times one after another: (messages/s, CPU seconds per message)."""
    before = os.times()
    started = time.perf_counter()
    for n in range(runs):
        subprocess.run(
            [sys.executable, "manage.py", "deliver", "rcpt0@localhost"],
            input=message,
            cwd=REPO,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    elapsed = time.perf_counter() - started
    after = os.times()
    cpu = after.children_user + after.children_system - before.children_user - before.children_system
    return runs / elapsed, cpu / runs


class RunLmtp:
    """``manage.py runlmtp 127.0.0.1:0`` on the bench database, if the command exists."""

    def __init__(self, env: dict[str, str], args: list[str], log):
        self.proc = subprocess.Popen(
            [sys.executable, "manage.py", "runlmtp", "127.0.0.1:0", *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        for line in self.proc.stdout:
            if match := re.search(r"LMTP\S* on [^\s,]*:(\d+)", line):
                self.port = int(match.group(1))
                return
        self.proc.wait(timeout=30)
        raise RuntimeError(f"runlmtp did not start (exit status {self.proc.returncode})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def postmaster_pid(connection) -> int | None:
    """PostgreSQL's postmaster, when the database runs on this machine (its processes' CPU is then measured:
    the backends' own, and that of backends already gone, in the postmaster's cutime/cstime)."""
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    try:
        return int(_stat_fields(backend)[2])
    except OSError:  # not on this machine
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8", help="comma-separated numbers of client processes")
    parser.add_argument("--recipients", default="1,10", help="comma-separated recipients per message")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--size", type=int, default=8192, help="octets per message")
    parser.add_argument("--popserver", metavar="HOST:PORT", help="a running popserver LMTP service")
    parser.add_argument("--runlmtp-args", default="", help='extra runlmtp arguments, e.g. "--workers 2"')
    parser.add_argument("--deliver-runs", type=int, default=30)
    parser.add_argument(
        "--dovecot-fsync",
        choices=("optimized", "always", "never"),
        help="Dovecot's mail_fsync (default: Dovecot's own, optimized: each delivery fsynced)",
    )
    parser.add_argument(
        "--no-pipelining",
        dest="pipelining",
        action="store_false",
        help="one command per round trip even where PIPELINING is offered",
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    rcpt_counts = [int(n) for n in args.recipients.split(",")]
    mailboxes = max(counts) * max(rcpt_counts)
    message = sample_message(args.size)

    env = setup_django()
    from django.core.management import get_commands
    from django.db import connection

    from popserver.models import Address

    for n in range(mailboxes):
        Address.objects.create(mailbox=make_user(f"rcpt{n}", "unused-password"), address=f"rcpt{n}@localhost")
    postmaster = postmaster_pid(connection)
    connection.close()
    deliver_rate, deliver_cpu = (
        deliver_loop(env, message, args.deliver_runs) if args.deliver_runs else (0.0, 0.0)
    )

    targets: dict[str, tuple[str, int]] = {}
    pids: dict[str, int] = {}  # the servers this script started: their CPU time is measured
    runlmtp = None
    note = ""
    if args.popserver:
        host, _, port = args.popserver.rpartition(":")
        targets["popserver"] = (host, int(port))
        note = (
            f"popserver at {args.popserver}: its database needs the mailboxes rcpt0..rcpt{mailboxes - 1}, e.g. "
            f"for n in $(seq 0 {mailboxes - 1}); do python manage.py createmailbox rcpt$n "
            "--email rcpt$n@localhost; done"
        )
    elif "runlmtp" in get_commands():
        with open(os.devnull, "w") as log:  # the child keeps its own descriptor
            runlmtp = RunLmtp(env, shlex.split(args.runlmtp_args), log)
        targets["popserver"] = ("127.0.0.1", runlmtp.port)
        pids["popserver"] = runlmtp.proc.pid
    else:
        note = "popserver: no runlmtp command in this tree and no --popserver given; its LMTP is not measured"

    results: dict[tuple[int, int], dict[str, Result]] = {}
    try:
        with Dovecot(mail_fsync=args.dovecot_fsync) as dovecot:
            targets["Dovecot"] = ("127.0.0.1", dovecot.lmtp_port)
            pids["Dovecot"] = dovecot.proc.pid
            for clients in counts:
                for recipients in rcpt_counts:
                    results[clients, recipients] = pair = {}
                    for name, (host, port) in targets.items():
                        cpu = tree_cpu_seconds(pids[name]) if name in pids else None
                        database_cpu = tree_cpu_seconds(postmaster) if postmaster else None
                        pair[name] = lmtp_load(
                            host, port, clients, recipients, message, args.seconds, args.pipelining
                        )
                        if cpu is not None:
                            pair[name].server_cpu = tree_cpu_seconds(pids[name]) - cpu
                        if database_cpu is not None:
                            pair[name].database_cpu = tree_cpu_seconds(postmaster) - database_cpu
    finally:
        if runlmtp is not None:
            runlmtp.stop()

    names = list(targets)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\ndatabase: {connection.vendor}; {os.cpu_count()} cores; load average after the run: {load}; "
        f"Dovecot {dovecot.version}; {args.size}-octet messages, {args.seconds:g} s per figure; "
        f"pipelining {'on where offered' if args.pipelining else 'off'}; Dovecot's mail_fsync "
        f"{args.dovecot_fsync or 'optimized (default)'}"
    )
    if note:
        print(note)
    print()
    header = " | ".join(
        f"{n} messages/s (deliveries/s) | {n} p50 / p99 ms | {n} CPU ms per delivery" for n in names
    )
    if postmaster:
        header += " | " + " | ".join(f"PostgreSQL CPU ms per delivery ({n})" for n in names)
    print(f"| clients x recipients | {header} |" + (" popserver / Dovecot |" if len(names) == 2 else ""))
    columns = len(names) * (4 if postmaster else 3)
    print("|---|" + "---|" * columns + ("---|" if len(names) == 2 else ""))
    for (clients, recipients), pair in results.items():
        cells = " | ".join(
            f"{r.per_second:,.1f} ({r.deliveries_per_second:,.0f}) | "
            f"{r.percentile(0.5):.1f} / {r.percentile(0.99):.1f} | "
            + (f"{r.server_cpu / max(r.deliveries, 1) * 1000:.2f}" if r.server_cpu is not None else "-")
            for r in pair.values()
        )
        if postmaster:
            cells += " | " + " | ".join(
                f"{r.database_cpu / max(r.deliveries, 1) * 1000:.2f}" for r in pair.values()
            )
        ratio = ""
        if len(names) == 2 and pair["Dovecot"].per_second:
            ratio = f" {pair['popserver'].per_second / pair['Dovecot'].per_second:.2f} |"
        print(f"| {clients} x {recipients} | {cells} |{ratio}")
    if args.deliver_runs:  # --deliver-runs 0: not measured
        print(
            f"\nmanage.py deliver, {args.deliver_runs} runs one after another: {deliver_rate:.2f} messages/s, "
            f"{deliver_cpu * 1000:.0f} ms CPU per message"
        )
    print(
        "Server CPU: user + system of the server process and its children (Dovecot: master, lmtp, auth, log); "
        "a database's own processes (PostgreSQL) are not counted there but in their own columns (all of "
        "PostgreSQL's processes during each measurement; Dovecot's figure is PostgreSQL's idle background)."
    )
    if "popserver" in names and deliver_rate:
        best = max(r["popserver"].deliveries_per_second for r in results.values())
        print(f"popserver LMTP's best deliveries/s over deliver's rate: {best / deliver_rate:,.0f}x")
    for (clients, recipients), pair in results.items():
        for name, result in pair.items():
            if result.errors:
                print(
                    f"{name}, {clients} x {recipients}: {result.errors} failed transactions; "
                    f"first: {result.first_error}"
                )


if __name__ == "__main__":
    main()
