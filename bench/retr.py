"""Bench (issue 15): RETR speed beside Dovecot, same messages, same client, same run.

    .venv/bin/python bench/retr.py [--messages 1000] [--size 8192] [--large-mib 50] [--repeat 5] [--dotted]

Seeds one mailbox with ``--messages`` messages of ``--size`` octets and another with one ``--large-mib`` MiB
message (base64 lines, as an attachment; ``--dotted``: every line starts with "." so every line is stuffed),
in popserver (through ``deliver()``, the real storage path) and, as the same bytes, in the Maildir of a
private Dovecot (bench/dovecot.py: installs Debian's dovecot-pop3d if needed, run as root). Then, for
``--repeat`` rounds, alternating servers, each after its login: (a) RETR 1..N one at a time, (b) RETR 1..N
pipelined in one send, (c) the large RETR. Around each, the server's CPU time (all threads of the popserver
process; Dovecot's pop3 process for the session) and during (c) its memory growth (VmHWM after minus VmRSS
before, the peak reset through /proc/PID/clear_refs). A markdown table gives the best round of each figure
(the worst for memory, the least CPU) with the range over the rounds, and the ratio popserver / Dovecot.
CPU per message is the figure least moved by other load on a shared machine; rates move with it.

The database is DATABASE_URL (SQLite under data/ by default; for PostgreSQL an existing database the bench
may wipe, e.g. postgres://postgres@127.0.0.1:5432/popserver_bench). Logins use a cheap hasher; both
servers log one line per session (popserver at INFO to a file, Dovecot to its log file).
"""

import argparse
import base64
import os
import random
import tempfile
import time
from pathlib import Path

import pop3load
from common import Server, _status_kib, children, make_user, reset_peak, sample_message, setup_django
from dovecot import Dovecot, seed_maildir

PASSWORD = "bench-password"
SAMPLE_EVERY = 0.002  # seconds between RSS samples during the large RETR (VmHWM catches what falls between)


def large_message(mib: int, dotted: bool) -> bytes:
    head = b"Subject: large\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    lines = (mib * 1024 * 1024 - len(head)) // 78
    body = base64.encodebytes(random.Random(15).randbytes(57 * lines)).replace(b"\n", b"\r\n")
    if dotted:
        body = b"." + body[1:].replace(b"\r\n", b"\r\n.", lines - 1)
    return head + body


class ServerWatch:
    """CPU time and resident-set growth of the server processes between ``start()`` and ``stop()``.

    The peak is VmHWM after ``/proc/PID/clear_refs`` reset it at start (plus VmRSS samples, in case the
    reset is refused). A process that goes away meanwhile (a previous Dovecot pop3 process ending) is
    dropped.
    """

    def __init__(self, pids):
        self.pids = pids  # a callable: the processes to watch, looked up at start()

    def start(self) -> None:
        self.base = {pid: kib for pid in self.pids() if (kib := _kib(pid, "VmRSS")) is not None}
        self.peak = dict(self.base)
        self.hwm_valid = all(reset_peak(pid) for pid in self.base)
        self.cpu_before = {pid: _cpu_seconds(pid) for pid in self.base}
        self.last = 0.0

    def sample(self) -> None:
        now = time.perf_counter()
        if now - self.last >= SAMPLE_EVERY:
            self.last = now
            for pid in self.base:
                self.peak[pid] = max(self.peak[pid], _kib(pid, "VmRSS") or 0)

    def stop(self) -> None:
        self.cpu = 0.0
        self.growth_mib = 0.0
        for pid, base in self.base.items():
            before = self.cpu_before[pid]  # threads started meanwhile count from zero
            self.cpu += sum(t - before.get(tid, 0.0) for tid, t in _cpu_seconds(pid).items())
            hwm = _kib(pid, "VmHWM") if self.hwm_valid else None
            self.growth_mib = max(self.growth_mib, (max(self.peak[pid], hwm or 0) - base) / 1024)


def _cpu_seconds(pid: int) -> dict[int, float]:
    """CPU time of each thread of a process, in seconds (/proc/PID/task/TID/schedstat: nanoseconds on a CPU,
    finer than the 10 ms ticks of /proc/PID/stat)."""
    times = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            times[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError):
            continue  # a thread that just ended
    return times


def _kib(pid: int, field: str) -> int | None:
    try:
        return _status_kib(pid, field)
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=8192, help="octets per message")
    parser.add_argument("--large-mib", type=int, default=50)
    parser.add_argument("--dotted", action="store_true", help="every line of the large message is stuffed")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the best is shown")
    args = parser.parse_args()

    env = setup_django(fast_hasher=True)
    env["LOG_LEVEL"] = "INFO"
    from django.db import connection

    from popserver.delivery import deliver

    small = sample_message(args.size)
    large = large_message(args.large_mib, args.dotted)
    make_user("small", PASSWORD)
    make_user("large", PASSWORD)
    for _ in range(args.messages):
        deliver("small", small)
    deliver("large", large)
    connection.close()

    workdir = Path(tempfile.mkdtemp(prefix="bench-retr-"))
    with Dovecot(PASSWORD) as dovecot, open(workdir / "popserver.log", "w") as log:
        seed_maildir(dovecot.maildir("small"), [small] * args.messages)
        seed_maildir(dovecot.maildir("large"), [large])
        server = Server(env, stderr=log)
        try:
            targets = {
                "popserver": (server.port, ServerWatch(lambda: [server.proc.pid])),
                "Dovecot": (dovecot.pop3_port, ServerWatch(lambda: children(dovecot.proc.pid, "pop3"))),
            }
            for name, (port, _) in targets.items():  # also Dovecot's first logins, which index the Maildirs
                if pop3load.fetch("127.0.0.1", port, "small", PASSWORD, args.messages) != small:
                    raise SystemExit(f"{name} did not return the seeded message")
                pop3load.warm_up("127.0.0.1", port, ["large"], PASSWORD)
            rounds: dict[str, dict[str, list[tuple[pop3load.Rate, float, float]]]] = {
                name: {"seq": [], "pipe": [], "large": []} for name in targets
            }
            measures = {
                "seq": pop3load.retr_sequential,
                "pipe": pop3load.retr_pipelined,
                "large": pop3load.retr_large,
            }
            for _ in range(args.repeat):
                for name, (port, watch) in targets.items():
                    for key, measure in measures.items():
                        user = "large" if key == "large" else "small"
                        rate = measure("127.0.0.1", port, user, PASSWORD, watch=watch)
                        rounds[name][key].append((rate, watch.cpu, watch.growth_mib))
            for name, (port, _) in targets.items():
                if pop3load.fetch("127.0.0.1", port, "large", PASSWORD, 1) != large:
                    raise SystemExit(f"{name} did not return the large message as seeded")
        finally:
            server.stop()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())

    def figure(name: str, key: str, value) -> tuple[float, float, float]:
        """(best, lowest, highest) of ``value(rate, cpu, growth)`` over the rounds."""
        values = [value(*r) for r in rounds[name][key]]
        return max(values), min(values), max(values)

    rows = [
        (
            f"RETR one at a time ({args.messages} x {args.size / 1024:g} KiB), messages/s",
            "seq",
            lambda rate, cpu, growth: rate.per_second,
            "{:,.0f}",
            max,
        ),
        (
            f"RETR pipelined (all {args.messages} in one send), messages/s",
            "pipe",
            lambda rate, cpu, growth: rate.per_second,
            "{:,.0f}",
            max,
        ),
        (
            f"one {args.large_mib} MiB RETR{' (every line stuffed)' if args.dotted else ''}, MB/s",
            "large",
            lambda rate, cpu, growth: rate.mb_per_second,
            "{:,.0f}",
            max,
        ),
        (
            "server memory growth during that RETR, MiB (worst round)",
            "large",
            lambda rate, cpu, growth: growth,
            "{:.1f}",
            max,
        ),
        (
            "server CPU per message, one at a time, µs",
            "seq",
            lambda rate, cpu, growth: cpu / rate.messages * 1e6,
            "{:,.0f}",
            min,
        ),
        (
            "server CPU per message, pipelined, µs",
            "pipe",
            lambda rate, cpu, growth: cpu / rate.messages * 1e6,
            "{:,.0f}",
            min,
        ),
        (
            "server CPU per MB of the large RETR, ms",
            "large",
            lambda rate, cpu, growth: cpu / (rate.octets / 1e6) * 1e3,
            "{:.2f}",
            min,
        ),
    ]
    print(
        f"\ndatabase: {connection.vendor}; {os.cpu_count()} cores; load average after the run: {load}; "
        f"Dovecot {dovecot.version}; {args.repeat} rounds, alternating servers: the best round, "
        "(lowest-highest)\n"
    )
    print(f"| figure | popserver | Dovecot {dovecot.version.split()[0]} (Maildir) | popserver / Dovecot |")
    print("|---|---|---|---|")
    for label, key, value, fmt, pick in rows:
        cells, picked = [], []
        for name in targets:
            values = [value(*r) for r in rounds[name][key]]
            picked.append(pick(values))
            spread = f" ({fmt.format(min(values))}-{fmt.format(max(values))})" if len(values) > 1 else ""
            cells.append(fmt.format(picked[-1]) + spread)
        ratio = f"{picked[0] / picked[1]:.2f}" if picked[1] and "memory" not in label else ""
        print(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    seq_client = {n: max(r.client_cpu / r.seconds for r, _, _ in rounds[n]["seq"]) for n in targets}
    print(
        f"\nServer CPU is user+system time of the popserver process / of Dovecot's pop3 process (its login and "
        f"auth processes are idle while the figure runs); it is the figure least moved by other load on the "
        f"machine. Client CPU during RETR one at a time: at most {seq_client['popserver']:.0%} of a core "
        f"against popserver, {seq_client['Dovecot']:.0%} against Dovecot. popserver log: {workdir}/popserver.log"
    )


if __name__ == "__main__":
    main()
