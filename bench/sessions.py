"""Bench: sessions per second for login + STAT + UIDL + QUIT, at 1 and 8 concurrent clients.

    .venv/bin/python bench/sessions.py [--seconds 10] [--fast-hasher]

By default passwords are Argon2id with Django's parameters (what a real site pays per login); --fast-hasher
measures the server without the password hash.
"""
import argparse
import poplib
import threading
import time

from common import Server, bulk_messages, make_user, setup_django


def run(port: int, clients: int, seconds: float) -> tuple[int, int]:
    done, errors = [0] * clients, [0] * clients
    deadline = time.monotonic() + seconds

    def worker(i: int) -> None:
        user = f"user{i}"
        while time.monotonic() < deadline:
            try:
                client = poplib.POP3("127.0.0.1", port, timeout=30)
                client.user(user)
                client.pass_("bench-password")
                client.stat()
                client.uidl()
                client.quit()
                done[i] += 1
            except (poplib.error_proto, OSError):
                errors[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done), sum(errors)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--fast-hasher", action="store_true")
    args = parser.parse_args()
    env = setup_django(fast_hasher=args.fast_hasher)
    from django.db import connection

    for i in range(8):
        bulk_messages(make_user(f"user{i}", "bench-password"), 20, b"Subject: s\r\n\r\nbody\r\n")
    server = Server(env)
    try:
        print(f"database: {connection.vendor}; hasher: {'MD5 (fast)' if args.fast_hasher else 'Argon2id'}; "
              "mailboxes of 20 messages")
        for clients in (1, 8):
            done, errors = run(server.port, clients, args.seconds)
            print(f"{clients} client(s): {done / args.seconds:.1f} sessions/s ({done} in {args.seconds:.0f} s, "
                  f"{errors} errors)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
