"""Bench: PASS -> +OK, STAT and UIDL on a 100,000-message mailbox; QUIT after 1,000 DELE.

.venv/bin/python bench/large_mailbox.py [--messages 100000]
"""

import argparse
import poplib

from common import Server, bulk_messages, make_user, setup_django, timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=100_000)
    args = parser.parse_args()
    env = setup_django()
    from django.db import connection

    mailbox = make_user("big", "bench-password")
    _, _ = timed(bulk_messages, mailbox, args.messages, b"Subject: bench\r\n\r\nhello\r\n")
    server = Server(env)
    try:
        client = poplib.POP3("127.0.0.1", server.port, timeout=300)
        client.user("big")
        login, _ = timed(client.pass_, "bench-password")
        stat_time, stat = timed(client.stat)
        uidl_time, uidl = timed(client.uidl)
        assert stat[0] == args.messages and len(uidl[1]) == args.messages
        dele_time, _ = timed(lambda: [client.dele(n) for n in range(1, 1001)])
        quit_time, _ = timed(client.quit)
    finally:
        server.stop()
    print(f"database: {connection.vendor}; mailbox: {args.messages} messages")
    print(f"PASS -> +OK (argon2 check, lock, snapshot): {login * 1000:.0f} ms")
    print(f"STAT: {stat_time * 1000:.1f} ms")
    print(f"UIDL ({args.messages} lines): {uidl_time * 1000:.0f} ms")
    print(f"1,000 DELE: {dele_time * 1000:.0f} ms; QUIT committing them: {quit_time * 1000:.0f} ms")


if __name__ == "__main__":
    main()
