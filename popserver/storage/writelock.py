"""One database writer at a time per process, on SQLite.

SQLite has one writer. A thread that finds it busy polls (its busy handler sleeps up to 100 ms between tries),
so under load some threads wait for seconds while newcomers slip in between their tries. Queueing this
process's own writers on a lock first makes the wait fair and short; writers in other processes (``deliver``)
still meet SQLite's busy timeout. Other databases have row locks: there this is a no-op.

Hold it around a whole write transaction (``with one_writer(), transaction.atomic(): ...``) or a single
autocommit write, and never around anything that waits for something else.
"""

import threading
from contextlib import AbstractContextManager, nullcontext

from django.db import DEFAULT_DB_ALIAS, connections

_writer = threading.RLock()  # re-entrant: a writer may call another


def one_writer(using: str = DEFAULT_DB_ALIAS) -> AbstractContextManager:
    return _writer if connections[using].vendor == "sqlite" else nullcontext()
