"""Bench: sessions per second for login + STAT + UIDL + QUIT, at 1 and 8 concurrent clients (or --clients).

    .venv/bin/python bench/sessions.py [--seconds 10] [--fast-hasher] [--clients 1,8,50]

By default passwords are Argon2id with Django's parameters (what a real site pays per login); --fast-hasher
measures the server without the password hash. Each client has a mailbox of its own; the clients are threads
of this process, so at high counts its own GIL adds to the latencies shown (p50/p99 of whole sessions).
"""

import argparse
import poplib
import threading
import time

from common import Server, bulk_messages, make_user, setup_django


def run(port: int, clients: int, seconds: float) -> tuple[int, int, list[float]]:
    done, errors = [0] * clients, [0] * clients
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        user = f"user{i}"
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                client = poplib.POP3("127.0.0.1", port, timeout=30)
                client.user(user)
                client.pass_("bench-password")
                client.stat()
                client.uidl()
                client.quit()
                done[i] += 1
                latencies.append(time.monotonic() - started)
            except (poplib.error_proto, OSError):
                errors[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done), sum(errors), sorted(latencies)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--fast-hasher", action="store_true")
    parser.add_argument("--clients", default="1,8", help="comma-separated numbers of concurrent clients")
    args = parser.parse_args()
    counts = [int(n) for n in args.clients.split(",")]
    env = setup_django(fast_hasher=args.fast_hasher)
    from django.db import connection

    for i in range(max(counts)):
        bulk_messages(make_user(f"user{i}", "bench-password"), 20, b"Subject: s\r\n\r\nbody\r\n")
    server = Server(env)
    try:
        print(
            f"database: {connection.vendor}; hasher: {'MD5 (fast)' if args.fast_hasher else 'Argon2id'}; "
            "mailboxes of 20 messages"
        )
        for clients in counts:
            done, errors, latencies = run(server.port, clients, args.seconds)
            p50, p99 = (
                (latencies[int(q * (len(latencies) - 1))] * 1000 for q in (0.5, 0.99))
                if latencies
                else (0, 0)
            )
            print(
                f"{clients} client(s): {done / args.seconds:.1f} sessions/s ({done} in {args.seconds:.0f} s, "
                f"{errors} errors); per session p50 {p50:.0f} ms, p99 {p99:.0f} ms"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
