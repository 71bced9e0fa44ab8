"""Bench (issue 21): the size of the database and of the body storage after deliveries to many recipients,
with each body store, and RETR speed with each store.

    .venv/bin/python bench/bodies.py [--messages 1000] [--recipients 10] [--size 102400] [--retr]

``--messages`` distinct messages of ``--size`` octets, each sent once to ``--recipients`` local mailboxes
through the email backend (the path of ``send_mail``; LMTP stores the same way): messages x recipients
deliveries. Printed per store: time, database size, storage size. ``--retr`` also runs bench/retr_rate.py
(8 KB one at a time and pipelined, one 50 MiB message) with each store. The database is DATABASE_URL (SQLite
under data/ by default; PostgreSQL: an existing database the bench may wipe).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO

STORES = {
    "database": "popserver.storage.bodies.DatabaseBodyStore",
    "storage": "popserver.storage.bodies.DjangoStorageBodyStore",
}


def database_size() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cursor.execute("PRAGMA page_count")
            pages = cursor.fetchone()[0]
            cursor.execute("PRAGMA page_size")
            return pages * cursor.fetchone()[0]
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_database_size(current_database())")
            return cursor.fetchone()[0]
        cursor.execute(
            "SELECT SUM(data_length + index_length) FROM information_schema.tables WHERE table_schema = DATABASE()"
        )
        return int(cursor.fetchone()[0] or 0)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def one_store(store: str, messages: int, recipients: int, size: int) -> None:
    """Runs in a child process of its own (a fresh database and Django set-up per store)."""
    bodies = Path(tempfile.mkdtemp(prefix="bench-bodies-"))
    os.environ["POPSERVER_BODY_STORE"] = STORES[store]
    os.environ["BODIES_DIR"] = str(bodies)
    os.environ["POPSERVER_QUOTA_BYTES"] = "0"
    from common import make_user, setup_django

    setup_django(fast_hasher=True)
    from django.core.mail import EmailMessage, get_connection

    from popserver.models import Address

    for n in range(recipients):
        Address.objects.create(mailbox=make_user(f"user{n}", "pw"), address=f"user{n}@example.org")
    backend = get_connection("popserver.mailin.email_backend.LocalDeliveryBackend")
    line = "All work and no play makes a mail server a dull server; 100 KB of it.\n"
    text = (line * (size // len(line) + 1))[:size]
    started = time.perf_counter()
    for n in range(messages):
        message = EmailMessage(
            f"message {n}", text, "bench@example.org", [f"user{r}@example.org" for r in range(recipients)]
        )
        backend.send_messages([message])
    elapsed = time.perf_counter() - started
    db = database_size()
    stored = folder_size(bodies)
    print(
        f"| {store} | {messages * recipients:,} | {messages * recipients / elapsed:,.0f} | "
        f"{db / 2**20:,.1f} MiB | {stored / 2**20:,.1f} MiB |",
        flush=True,
    )
    shutil.rmtree(bodies, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--recipients", type=int, default=10)
    parser.add_argument("--size", type=int, default=100 * 1024)
    parser.add_argument("--retr", action="store_true")
    parser.add_argument("--store", choices=sorted(STORES), help=argparse.SUPPRESS)  # the child's
    args = parser.parse_args()
    if args.store:
        one_store(args.store, args.messages, args.recipients, args.size)
        return
    print(
        f"{args.messages} messages of {args.size} octets, each to {args.recipients} local recipients "
        f"(database: {os.environ.get('DATABASE_URL', 'SQLite')})\n"
    )
    print("| store | deliveries | deliveries/s | database | body storage |\n|---|---|---|---|---|")
    for store in STORES:
        subprocess.run(
            [sys.executable, __file__, "--store", store, *sys.argv[1:]], check=True, cwd=REPO / "bench"
        )
    if args.retr:
        for store, path in STORES.items():
            print(f"\nRETR with the {store} store:", flush=True)
            subprocess.run(
                [sys.executable, "retr_rate.py", "--store", path, "--repeat", "3"],
                check=True,
                cwd=REPO / "bench",
            )


if __name__ == "__main__":
    main()
