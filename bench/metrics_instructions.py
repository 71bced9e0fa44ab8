"""Bench (issue 16): what ``runpop3 --metrics`` costs per RETR, counted in CPU instructions (callgrind).

    .venv/bin/python bench/metrics_instructions.py [--retrs 300] [--rounds 3] [--servers 2] [--size 4096]
        [--setups one,workers]
    .venv/bin/python bench/metrics_instructions.py --differential [--retrs 50,450] [--rounds 2] ...

On a noisy machine CPU time cannot tell 3 % from nothing (``metrics_cost.py``); the instructions a process
executes barely move with other load. Setups: ``one`` (one process) and ``workers`` (``--workers 2``,
``POPSERVER_MAX_SESSIONS=4`` so that the four warm-up sessions go two to each worker); variants: without
and with ``--metrics 127.0.0.1:0``. ``PYTHONHASHSEED=0`` makes runs alike. Needs valgrind: ``apt-get
install valgrind``. SQLite only.

The default, toggled, counts in one warm process: ``runpop3`` runs under ``valgrind --tool=callgrind
--instr-atstart=no --separate-threads=yes --trace-children=yes`` (the last so that a forked worker opens a
vgdb channel of its own), is warmed (one session per worker slot, held open together on mailboxes of their
own, each with 30 RETRs), then each round (``--rounds``) one session logs in, ``callgrind_control -i on``
switches the instrumentation on in the parent and in every worker, the session RETRs messages 1..R
(``--retrs``) of ``--size`` octets one at a time, ``callgrind_control -i off`` and ``-d`` (dump), and the
session QUITs: login and QUIT lie outside the window. Instructions per RETR are the window's count / R, in
the thread that counted most (the session's) and in every thread of every process ("all threads": with
``--metrics`` that includes the flusher, which wakes once a second, so it is overstated as valgrind slows
the window down). ``--servers`` servers of each variant per setup, the variants alternated.

``--differential`` starts each server afresh under callgrind, warms it (two RETRs per warm-up session),
RETRs messages 1..K in one session and stops it; runs with two values of K (``--retrs K1,K2``) are
subtracted and divided by K2-K1. Fresh processes differ from each other by a few per cent in what a RETR
costs, so this is the noisier method.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pop3load
from common import Server, bulk_messages, children, make_user, sample_message, setup_django

PASSWORD = "bench-password"
SETUPS = {"one": [], "workers": ["--workers", "2"]}
VARIANTS = {"without": [], "--metrics": ["--metrics", "127.0.0.1:0"]}
WARM_RETRS = 30  # in each warm-up session of the toggled mode (a worker's first RETRs cost more)
WARM_SESSIONS = 4  # POPSERVER_MAX_SESSIONS: with two workers, two each (a full worker defers accepting)


def read_counts(path: Path) -> tuple[int, int, int]:
    """(pid, thread, instructions) of one callgrind output file."""
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
    return pid, thread or 1, total


def callgrind_totals(directory: Path, parent: int) -> dict[tuple[str, int], int]:
    """Instructions by (process, thread) from the callgrind files in ``directory``: the process is
    ``parent``, or ``worker N`` numbered by rank of the worker's own total (``worker 1``: the busiest)."""
    by_pid: dict[int, dict[int, int]] = {}
    for path in directory.iterdir():
        if path.stat().st_size:  # the file of the process as a whole is left empty with --separate-threads
            pid, thread, total = read_counts(path)
            by_pid.setdefault(pid, {})[thread] = total
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
            warm_up(server.port)
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


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def toggled_server(env: dict[str, str], args: list[str], retrs: int, rounds: int) -> list[tuple[int, int]]:
    """One server under callgrind with its instrumentation off (``--instr-atstart=no``), warmed; then, for
    each round, one session logs in, the instrumentation of every process (the parent and, with workers,
    each worker: valgrind follows ``fork()``) is switched on, the session RETRs messages 1..``retrs`` one
    at a time, the instrumentation is switched off and the counts dumped, and the session QUITs. A pair per
    round: instructions in the window in the thread that counted most (the session's) and in every thread
    of every process."""
    directory = Path(tempfile.mkdtemp(prefix="callgrind-"))
    wrapper = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        "--trace-children=yes",  # else a forked worker has no vgdb channel: callgrind_control cannot reach it
        f"--callgrind-out-file={directory}/callgrind.out.%p",
    ]
    figures = []
    try:
        log = open(directory / "log", "w")  # noqa: SIM115 (closed below; the server writes to it)
        server = Server(env, args, stderr=log, wrapper=wrapper)
        try:
            warm_up(server.port, WARM_RETRS)
            pids = [str(pid) for pid in (server.proc.pid, *children(server.proc.pid))]
            for _ in range(rounds):
                with pop3load.Client("127.0.0.1", server.port, timeout=600) as client:
                    client.login("bench", PASSWORD)
                    callgrind_control("-z", *pids)  # nothing counted before the window
                    callgrind_control("-i", "on", *pids)
                    for number in range(1, retrs + 1):
                        client.sock.sendall(b"RETR %d\r\n" % number)
                        client.multi()
                    callgrind_control("-i", "off", *pids)
                    before = set(directory.iterdir())
                    callgrind_control("-d", *pids)
                    dumped = [path for path in set(directory.iterdir()) - before if path.stat().st_size]
                    counts = [read_counts(path) for path in dumped]  # (the process's own file is empty)
                    client.quit()
                if not counts:
                    raise RuntimeError("callgrind_control -d dumped no file")
                figures.append((max(n for _, _, n in counts), sum(n for _, _, n in counts)))
        finally:
            server.stop(timeout=600)
            log.close()
        return figures
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def warm_up(port: int, retrs: int = 2) -> None:
    """One session per worker slot, held open together on mailboxes of their own, each with ``retrs``
    RETRs."""
    warm = [pop3load.Client("127.0.0.1", port, timeout=600) for _ in range(WARM_SESSIONS)]
    for number, client in enumerate(warm, 1):
        client.login(f"warm{number}", PASSWORD)
        for number in range(1, retrs + 1):
            client.sock.sendall(b"RETR %d\r\n" % number)
            client.multi()
    for client in warm:
        client.quit()
        client.close()


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


def measure_toggled(env: dict[str, str], setups: list[str], retrs: int, rounds: int, servers: int) -> dict:
    """(session's thread, all threads) instructions per RETR, by (setup, variant), a pair per round, from
    ``servers`` servers of each variant per setup, the variants alternated."""
    figures = {(setup, variant): [] for setup in setups for variant in VARIANTS}
    for setup in setups:
        for number in range(servers):
            order = list(VARIANTS) if number % 2 == 0 else list(reversed(VARIANTS))
            for variant in order:
                args = [*SETUPS[setup], *VARIANTS[variant]]
                for round_number, (session, everything) in enumerate(
                    toggled_server(env, args, retrs, rounds), 1
                ):
                    figures[setup, variant].append((session / retrs, everything / retrs))
                    print(
                        f"server {number + 1} round {round_number} {setup:>7} {variant:>9}: "
                        f"{session / retrs:9,.0f} instructions/RETR in the session's thread, "
                        f"{everything / retrs:9,.0f} in all threads",
                        file=sys.stderr,
                        flush=True,
                    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--differential", action="store_true", help="fresh processes, K2 RETRs less K1 (noisier)"
    )
    parser.add_argument(
        "--retrs", help="RETRs in a window (default 300); with --differential K1,K2 (default 50,450)"
    )
    parser.add_argument("--rounds", type=int, help="windows per server (default 3; --differential: 2)")
    parser.add_argument("--servers", type=int, default=2, help="servers of each variant per setup")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--setups", default="one,workers", help="one (one process), workers (--workers 2)")
    options = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind (Debian, Ubuntu)")
    retrs = tuple(int(k) for k in (options.retrs or ("50,450" if options.differential else "300")).split(","))
    if options.differential and (len(retrs) != 2 or not 0 < retrs[0] < retrs[1]):
        sys.exit("--retrs K1,K2 with 0 < K1 < K2")
    if not options.differential and (len(retrs) != 1 or retrs[0] < 1):
        sys.exit("--retrs R with R > 0")
    rounds = options.rounds or (2 if options.differential else 3)
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
    bulk_messages(mailbox, max(retrs), sample_message(options.size))
    for number in range(1, WARM_SESSIONS + 1):
        bulk_messages(make_user(f"warm{number}", PASSWORD), WARM_RETRS, sample_message(options.size))
    from django.db import connections

    connections.close_all()
    database = Path(tempfile.mkdtemp(prefix="metrics-instructions-")) / "bench.sqlite3"
    shutil.copyfile(env["DATABASE_URL"][len("sqlite:///") :], database)

    try:
        if options.differential:
            figures = measure(env, setups, retrs, rounds, database)
        else:
            figures = measure_toggled(env, setups, retrs[0], rounds, options.servers)
    finally:
        shutil.rmtree(database.parent, ignore_errors=True)

    if options.differential:
        method = f"({retrs[1]} - {retrs[0]} RETRs) / {retrs[1] - retrs[0]}, {rounds} rounds"
    else:
        method = f"{retrs[0]} RETRs a window, {rounds} windows a server, {options.servers} servers of each"
    print(
        f"\nRETR of {options.size} octets one at a time, {method}: instructions per RETR, median (lowest-highest)"
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
