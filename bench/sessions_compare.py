"""Bench (issue 14): whole sessions per second beside Dovecot, same loop, same client, same run.

    .venv/bin/python bench/sessions_compare.py [--clients 1,8,32] [--seconds 10] [--runpop3-args="--workers 2"]

Each client is a process (bench/pop3load.py) that loops connect, USER, PASS, STAT, UIDL, QUIT for
``--seconds``, one command per round trip, on a mailbox of its own (``user<i>``, ``--messages`` small
messages, the same bytes in popserver and in a private Dovecot's Maildir, bench/dovecot.py). popserver checks
passwords with a cheap hasher (MD5) and Dovecot with a static passdb in the PLAIN scheme, so neither pays for
a real password hash; both log one line per session. ``--runpop3-args`` is split like a shell line and passed
to ``runpop3`` as is. For each number of clients the two servers run back to back; the table gives
sessions/s, per-session p50/p99 and the ratio popserver / Dovecot, and how much CPU the clients themselves
took (on a 2-core machine 32 client processes compete with the server). ``--rounds`` splits each figure
into rounds that alternate the two servers (popserver first, then Dovecot first, ...): a machine whose
speed drifts during the run (a shared host) then slows both alike.

The database is DATABASE_URL (SQLite under data/ by default; for PostgreSQL an existing database the bench
may wipe). Run as root (Dovecot is installed with apt-get if missing).
"""

import argparse
import os
import shlex
import tempfile
from pathlib import Path

import pop3load
from common import Server, bulk_messages, make_user, setup_django, tree_cpu_seconds
from dovecot import Dovecot, seed_maildir

PASSWORD = "bench-password"
MESSAGE = b"Subject: s\r\n\r\nbody\r\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,32", help="comma-separated numbers of client processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds each figure is split into")
    parser.add_argument("--messages", type=int, default=20, help="messages in each client's mailbox")
    parser.add_argument("--runpop3-args", default="", help='extra runpop3 arguments, e.g. "--workers 2"')
    parser.add_argument("--tuned-dovecot", action="store_true", help="Dovecot's high-performance login mode")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    counts = [int(n) for n in args.clients.split(",")]
    users = [f"user{i}" for i in range(max(counts))]

    env = setup_django(fast_hasher=True)
    env["LOG_LEVEL"] = "INFO"
    from django.db import connection

    for user in users:
        bulk_messages(make_user(user, PASSWORD), args.messages, MESSAGE)
    connection.close()

    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    results: dict[int, dict[str, pop3load.Sessions]] = {}
    server_cpu: dict[tuple[int, str], float] = {}
    with Dovecot(PASSWORD, tuned=args.tuned_dovecot) as dovecot, open(workdir / "popserver.log", "w") as log:
        for user in users:
            seed_maildir(dovecot.maildir(user), [MESSAGE] * args.messages)
        server = Server(env, args=shlex.split(args.runpop3_args), stderr=log)
        try:
            targets = {"popserver": server.port, "Dovecot": dovecot.pop3_port}
            for port in targets.values():
                pop3load.warm_up("127.0.0.1", port, users, PASSWORD)
            pids = {"popserver": server.proc.pid, "Dovecot": dovecot.proc.pid}
            for clients in counts:
                results[clients] = {}
                for round_ in range(args.rounds):
                    order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
                    for name in order:
                        cpu = tree_cpu_seconds(pids[name])
                        result = pop3load.sessions(
                            "127.0.0.1", targets[name], users, PASSWORD, clients, args.seconds / args.rounds
                        )
                        server_cpu[clients, name] = server_cpu.get((clients, name), 0.0) + (
                            tree_cpu_seconds(pids[name]) - cpu
                        )
                        earlier = results[clients].get(name)
                        results[clients][name] = result if earlier is None else earlier + result
        finally:
            server.stop()

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\ndatabase: {connection.vendor}; runpop3 {args.runpop3_args or '(no extra arguments)'}; "
        f"{os.cpu_count()} cores; load average after the run: {load}; Dovecot {dovecot.version}; "
        f"{args.seconds:g} s per figure in {args.rounds} alternating rounds; login with a cheap hash (MD5 / PLAIN)\n"
    )
    print(
        "| clients | popserver sessions/s | p50 / p99 ms | Dovecot sessions/s | p50 / p99 ms | popserver / Dovecot "
        "| server CPU ms per session (pop / Dov) | client CPU, cores (pop / Dov) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for clients, pair in results.items():
        pop, dove = pair["popserver"], pair["Dovecot"]
        ratio = pop.per_second / dove.per_second if dove.per_second else float("nan")
        cpu = [server_cpu[clients, n] / max(pair[n].done, 1) * 1000 for n in ("popserver", "Dovecot")]
        print(
            f"| {clients} | {pop.per_second:,.0f} | {pop.percentile(0.5):.1f} / {pop.percentile(0.99):.1f} | "
            f"{dove.per_second:,.0f} | {dove.percentile(0.5):.1f} / {dove.percentile(0.99):.1f} | {ratio:.2f} | "
            f"{cpu[0]:.2f} / {cpu[1]:.2f} | "
            f"{pop.client_cpu / pop.seconds:.2f} / {dove.client_cpu / dove.seconds:.2f} |"
        )
    print(
        "\nServer CPU: the popserver process (and its workers) / Dovecot's master and all its processes, user + "
        "system; the database's own processes (PostgreSQL) are not counted."
    )
    for clients, pair in results.items():
        for name, result in pair.items():
            if result.errors:
                print(
                    f"{name}, {clients} clients: {result.errors} failed sessions; first: {result.first_error}"
                )
    print(f"\npopserver log: {workdir / 'popserver.log'}")


if __name__ == "__main__":
    main()
