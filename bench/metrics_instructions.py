"""Bench (issue 16): what ``runpop3 --metrics`` costs per RETR, counted in CPU instructions (callgrind).

    .venv/bin/python bench/metrics_instructions.py [--retrs 50,450] [--rounds 2] [--size 4096]
        [--setups one,workers]

On a noisy machine CPU time cannot tell 3 % from nothing (``metrics_cost.py``); the instructions a process
executes barely move with other load. Each run starts ``runpop3`` under ``valgrind --tool=callgrind
--separate-threads=yes`` (one output file per process and thread; valgrind follows ``fork()``, so a worker
gets files of its own, starting from its parent's counts at the fork), warms it
(one session per worker slot, held open together on mailboxes of their own, each with two RETRs), then one session logs in, RETRs
messages 1..K of ``--size`` octets one at a time with the bench's client and QUITs, and the server is
stopped. Runs with two values of K (``--retrs K1,K2``) are subtracted and divided by K2-K1: start-up, warm-up,
login, QUIT and shutdown cancel, with no need to switch the instrumentation on and off. Setups: ``one``
(one process) and ``workers`` (``--workers 2``, ``POPSERVER_MAX_SESSIONS=4`` so that the four warm-up
sessions go two to each worker). Each round runs, for each setup, the four servers (with and without
``--metrics 127.0.0.1:0``, K1 and K2) and prints instructions per RETR in the session's thread (the thread
whose count grew the most from K1 to K2) and in every thread of every process. Threads that wake on a clock
(the metrics flusher once a second, the HTTP listener, the supervisor) run more often in the longer run
(under valgrind a run lasts tens of seconds): "all threads" includes them, overstated as time is.
``PYTHONHASHSEED=0`` makes runs alike. Needs valgrind: ``apt-get install valgrind``.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import pop3load
from common import Server, bulk_messages, make_user, sample_message, setup_django

PASSWORD = "bench-password"
SETUPS = {"one": [], "workers": ["--workers", "2"]}
VARIANTS = {"without": [], "--metrics": ["--metrics", "127.0.0.1:0"]}
WARM_SESSIONS = 4  # POPSERVER_MAX_SESSIONS: with two workers, two each (a full worker defers accepting)


def callgrind_totals(directory: Path, parent: int) -> dict[tuple[str, int], int]:
    """Instructions by (process, thread) from the callgrind files in ``directory``: the process is
    ``parent``, or ``worker N`` numbered by rank of the worker's own total (``worker 1``: the busiest)."""
    by_pid: dict[int, dict[int, int]] = {}
    for path in directory.iterdir():
        if not path.stat().st_size:
            continue  # the file of the process as a whole, left empty with --separate-threads
        pid = thread = total = None
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(": ")
            if key == "pid":
                pid = int(value)
            elif key == "thread":
                thread = int(value)
            elif key in ("summary", "totals"):
                total = int(value.split()[0])
        if pid is None or total is None:
            raise RuntimeError(f"no pid or total in {path}")
        by_pid.setdefault(pid, {})[thread or 1] = total
    totals = {("parent", thread): n for thread, n in by_pid.pop(parent, {}).items()}
    ranked = sorted(by_pid.values(), key=lambda threads: sum(threads.values()), reverse=True)
    for rank, threads in enumerate(ranked, 1):
        totals.update({(f"worker {rank}", thread): n for thread, n in threads.items()})
    return totals


def run_once(env: dict[str, str], args: list[str], retrs: int, database: Path) -> dict[tuple[str, int], int]:
    """One server under callgrind, on a fresh copy of the ``database`` made after the set-up (each run adds
    rows: sessions, logins; a database that grows from run to run moves the counts of the start-up): warm
    it, RETR 1..``retrs`` in one session, stop it; its counts."""
    live = Path(env["DATABASE_URL"][len("sqlite:///") :])
    for suffix in ("-wal", "-shm"):
        Path(str(live) + suffix).unlink(missing_ok=True)
    shutil.copyfile(database, live)
    directory = Path(tempfile.mkdtemp(prefix="callgrind-"))
    wrapper = [
        "valgrind",
        "--tool=callgrind",
        "--separate-threads=yes",
        f"--callgrind-out-file={directory}/callgrind.out.%p",
    ]
    try:
        log = open(directory / "log", "w")  # noqa: SIM115 (closed below; the server writes to it)
        server = Server(env, args, stderr=log, wrapper=wrapper)
        try:
            warm = [pop3load.Client("127.0.0.1", server.port, timeout=600) for _ in range(WARM_SESSIONS)]
            for number, client in enumerate(warm, 1):
                client.login(f"warm{number}", PASSWORD)  # a mailbox each: the sessions are open together
                for number in (1, 2):
                    client.sock.sendall(b"RETR %d\r\n" % number)
                    client.multi()
            for client in warm:
                client.quit()
                client.close()
            rate = pop3load.retr_sequential("127.0.0.1", server.port, "bench", PASSWORD, limit=retrs)
            if rate.messages != retrs:
                raise RuntimeError(f"{rate.messages} RETRs instead of {retrs}")
        finally:
            server.stop(timeout=600)
            log.close()
        (directory / "log").unlink()
        return callgrind_totals(directory, server.proc.pid)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def per_retr(short: dict, long: dict, retrs: tuple[int, int]) -> tuple[float, float]:
    """(session thread, all threads) instructions per RETR from a K1 and a K2 run."""
    grown = {key: long.get(key, 0) - short.get(key, 0) for key in short.keys() | long.keys()}
    steps = retrs[1] - retrs[0]
    return max(grown.values()) / steps, sum(grown.values()) / steps


def measure(
    env: dict[str, str], setups: list[str], retrs: tuple[int, int], rounds: int, database: Path
) -> dict:
    """(session's thread, all threads) instructions per RETR, by (setup, variant), a pair per round."""
    figures = {(setup, variant): [] for setup in setups for variant in VARIANTS}
    for round_number in range(rounds):
        for setup in setups:
            counts = {}
            # An order that turns, in case anything else drifts.
            runs = [(variant, k) for k in retrs for variant in VARIANTS]
            if round_number % 2:
                runs.reverse()
            for variant, k in runs:
                counts[variant, k] = run_once(env, [*SETUPS[setup], *VARIANTS[variant]], k, database)
            for variant in VARIANTS:
                session, everything = per_retr(counts[variant, retrs[0]], counts[variant, retrs[1]], retrs)
                figures[setup, variant].append((session, everything))
                print(
                    f"round {round_number + 1} {setup:>7} {variant:>9}: {session:9,.0f} instructions/RETR "
                    f"in the session's thread, {everything:9,.0f} in all threads",
                    file=sys.stderr,
                    flush=True,
                )

    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--retrs", default="50,450", help="K1,K2: RETRs in the short and the long run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--setups", default="one,workers", help="one (one process), workers (--workers 2)")
    options = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind (Debian, Ubuntu)")
    retrs = tuple(int(k) for k in options.retrs.split(","))
    if len(retrs) != 2 or not 0 < retrs[0] < retrs[1]:
        sys.exit("--retrs K1,K2 with 0 < K1 < K2")
    setups = options.setups.split(",")
    if unknown := set(setups) - SETUPS.keys():
        sys.exit(f"unknown setup: {', '.join(unknown)}")

    if not os.environ.get("DATABASE_URL", "sqlite:///").startswith("sqlite:///"):
        sys.exit("SQLite only (each run starts from a copy of the database file): unset DATABASE_URL")
    env = setup_django(fast_hasher=True)
    env["PYTHONHASHSEED"] = "0"  # the same dict and set layouts in every run
    env["POPSERVER_MAX_SESSIONS"] = str(WARM_SESSIONS)
    os.environ.update(env)
    mailbox = make_user("bench", PASSWORD)
    bulk_messages(mailbox, retrs[1], sample_message(options.size))
    for number in range(1, WARM_SESSIONS + 1):
        bulk_messages(make_user(f"warm{number}", PASSWORD), 2, sample_message(options.size))
    from django.db import connections

    connections.close_all()
    database = Path(tempfile.mkdtemp(prefix="metrics-instructions-")) / "bench.sqlite3"
    shutil.copyfile(env["DATABASE_URL"][len("sqlite:///") :], database)

    try:
        figures = measure(env, setups, retrs, options.rounds, database)
    finally:
        shutil.rmtree(database.parent, ignore_errors=True)

    print(
        f"\nRETR of {options.size} octets one at a time, ({retrs[1]} - {retrs[0]} RETRs) / {retrs[1] - retrs[0]}, "
        f"{options.rounds} rounds: instructions per RETR, median (lowest-highest)"
    )
    print("| setup | threads | without | --metrics | difference |")
    print("|---|---|---|---|---|")
    for setup in setups:
        for index, threads in enumerate(("session's", "all")):
            base = [pair[index] for pair in figures[setup, "without"]]
            metered = [pair[index] for pair in figures[setup, "--metrics"]]
            diffs = [100 * (m - b) / b for b, m in zip(base, metered, strict=True)]
            print(
                f"| {setup} | {threads} | {spread(base)} | {spread(metered)} | "
                f"{statistics.median(diffs):+.1f} % ({min(diffs):+.1f} to {max(diffs):+.1f}) |"
            )


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


if __name__ == "__main__":
    main()
