"""Bench (issue 16): what ``runpop3 --metrics`` costs per message, on the per-message benchmark.

    .venv/bin/python bench/metrics_cost.py [--messages 3000] [--size 4096] [--rounds 7] [--control]
        [--idle SECONDS] [--engine-rounds 15] [-- RUNPOP3 ARGS]

First the engine alone, in memory: µs per RETR of ``Pop3Session`` and of ``MeteredSession`` (what the
tally adds per command, free of the noise of system calls). Then runpop3 processes on one database, one
with ``--metrics 127.0.0.1:0`` and one without (``--control``: and a third one without, to show what two
identical servers differ by in the same run), serve the same mailbox (``--messages`` messages of
``--size`` octets); ``--idle N`` first measures each unloaded for N seconds (the threads that wake on
their own: flusher, HTTP listener, supervisor). For ``--rounds`` rounds, in an order that turns, each
serves RETR 1..N one command at a time (``pop3load.retr_sequential``). The figure is the server's CPU time
per message during the RETRs: the sum over the server's threads of the time they ran
(``/proc/PID/task/*/schedstat``, in nanoseconds), so other load on the machine moves it little; with
``--workers`` every process of a server is counted, and each round's line splits it into the parent, the
worker that served the session and the other workers. The table gives the best round, the lower quartile,
the median and the median of the differences within a round (paired) for each server: other load only
adds CPU time, so the best rounds say the most. Arguments after ``--`` go to every server.
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import pop3load
from common import Server, bulk_messages, children, make_user, sample_message, setup_django

PASSWORD = "bench-password"


def cpu_ns(pid: int) -> dict[int, int]:
    """Nanoseconds on a CPU so far, by process: the live threads of ``pid`` and of each of its children."""
    used = {}
    for process in [pid, *children(pid)]:
        used[process] = 0
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                used[process] += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile
    return used


class CpuWatch:
    """The CPU time of a server during the RETRs: in all (``used``) and split into the parent, the worker
    that served the session (the one that used the most) and the other workers (``parts``, nanoseconds)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.used = 0
        self.parts = (0, 0, 0)

    def start(self) -> None:
        self.base = cpu_ns(self.pid)

    def sample(self) -> None:
        pass

    def stop(self) -> None:
        now = cpu_ns(self.pid)
        spent = {pid: ns - self.base.get(pid, 0) for pid, ns in now.items()}
        self.used = sum(spent.values())
        parent = spent.pop(self.pid)
        serving = max(spent.values(), default=0)
        self.parts = (parent, serving, sum(spent.values()) - serving)


def idle_cpu(server: Server, seconds: float) -> tuple[float, float, float]:
    """What ``server`` uses with no client: µs of CPU per second, as (parent, busiest worker, other workers)."""
    watch = CpuWatch(server.proc.pid)
    watch.start()
    threading.Event().wait(seconds)  # sync-ok: the measurement is the wait
    watch.stop()
    return tuple(ns / 1000 / seconds for ns in watch.parts)


def engine_cost(messages: int, size: int, rounds: int) -> tuple[float, float]:
    """µs per RETR of the engine alone (``Pop3Session`` and ``MeteredSession`` over the in-memory maildrop,
    no socket, no database), best of ``rounds``: what the metrics code itself adds per command, without
    the noise of system calls. The tally is handed each reply's size as the handler does."""
    from popserver.protocol.session import Pop3Session
    from popserver.server import metrics
    from popserver.testing import MemoryAuthenticator, MemoryMaildrop

    def one(session_class) -> float:
        maildrop = MemoryMaildrop([sample_message(size)] * messages)
        session = session_class(MemoryAuthenticator({"bench": (PASSWORD, maildrop)}), peer="bench")
        b"".join(session.receive(b"USER bench\r\nPASS %s\r\n" % PASSWORD.encode()))
        tally = getattr(session, "tally", None)
        commands = [b"RETR %d\r\n" % number for number in range(1, messages + 1)]
        started = time.perf_counter()
        for command in commands:
            produced = sum(len(piece) for piece in session.receive(command))
            if tally is not None:
                tally.batch_sent(produced)
        return (time.perf_counter() - started) / messages * 1e6

    metrics.enable()
    try:
        plain, metered = [], []
        for _ in range(rounds):
            plain.append(one(Pop3Session))
            metered.append(one(metrics.MeteredSession))
    finally:
        metrics.disable()
    return min(plain), min(metered)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--control", action="store_true", help="a third server, the same as the one without --metrics"
    )
    parser.add_argument("--idle", type=float, default=0, help="seconds to measure each server unloaded")
    parser.add_argument(
        "--engine-rounds", type=int, default=15, help="rounds of the engine alone, in memory (0: none)"
    )
    parser.add_argument("server_args", nargs="*", help="after --: more runpop3 arguments for every server")
    options = parser.parse_args()

    env = setup_django(fast_hasher=True)
    mailbox = make_user("bench", PASSWORD)
    bulk_messages(mailbox, options.messages, sample_message(options.size))
    if options.engine_rounds:
        plain, metered = engine_cost(options.messages, options.size, options.engine_rounds)
        print(
            f"engine alone, in memory: {plain:.2f} µs/RETR, with the tally {metered:.2f} "
            f"({metered - plain:+.2f} µs, best of {options.engine_rounds})",
            file=sys.stderr,
        )
    extra = list(options.server_args)
    variants = {"without": [], "--metrics": ["--metrics", "127.0.0.1:0"]}
    if options.control:
        variants["control"] = []
    servers: dict[str, Server] = {}
    per_message: dict[str, list[float]] = {name: [] for name in variants}
    try:
        # Nodes on one database: each needs a name of its own.
        for name, args in variants.items():
            node = "bench-" + name.strip("-")
            servers[name] = Server({**env, "POPSERVER_NODE_NAME": node}, [*extra, *args], stderr=None)
        for name, server in servers.items():
            pop3load.retr_sequential("127.0.0.1", server.port, "bench", PASSWORD)  # warm up, not counted
        for name, server in servers.items() if options.idle else ():
            parent, worker, others = idle_cpu(server, options.idle)
            print(
                f"idle {name:>9}: {parent + worker + others:6.0f} µs CPU/s "
                f"(parent {parent:.0f}, worker {worker:.0f}, others {others:.0f})",
                file=sys.stderr,
            )
        for round_number in range(options.rounds):
            # Each round runs every server once, in an order that turns: slow drifts of the machine's load
            # fall on each alike, and the differences within a round pair them.
            shift = round_number % len(servers)
            order = list(servers)[shift:] + list(servers)[:shift]
            if round_number // len(servers) % 2:
                order.reverse()
            for name in order:
                watch = CpuWatch(servers[name].proc.pid)
                rate = pop3load.retr_sequential("127.0.0.1", servers[name].port, "bench", PASSWORD, watch)
                per_message[name].append(watch.used / 1000 / rate.messages)
                parent, serving, others = (ns / 1000 / rate.messages for ns in watch.parts)
                split = f" (parent {parent:.2f}, worker {serving:.1f}, others {others:.2f})" if extra else ""
                print(
                    f"round {round_number + 1} {name:>9}: {per_message[name][-1]:7.1f} µs CPU/message"
                    f"{split}, {rate.per_second:7.0f} messages/s",
                    file=sys.stderr,
                )
    finally:
        for server in servers.values():
            server.stop()

    print(
        f"\n{options.messages} messages of {options.size} octets, RETR one at a time, {options.rounds} rounds"
        + (f", runpop3 {' '.join(extra)}" if extra else "")
    )
    print("| server | CPU µs/message: best | lower quartile | median | worst | paired difference: median |")
    print("|---|---|---|---|---|---|")
    base_values = per_message["without"]
    for name, values in per_message.items():
        best, quartile, median = figures(values)
        paired = statistics.median(100 * (v - b) / b for v, b in zip(values, base_values, strict=True))
        print(
            f"| {name} | {best:.1f} | {quartile:.1f} | {median:.1f} | {max(values):.1f} | {paired:+.1f} % |"
        )
    base = figures(base_values)
    for name in [n for n in per_message if n != "without"]:
        # Other load only adds CPU time (cache misses, a slower clock): the best rounds say the most.
        print(
            "\n{} costs {:+.1f} % CPU per message (best rounds), {:+.1f} % (lower quartiles), "
            "{:+.1f} % (medians)".format(
                name, *(100 * (m - b) / b for b, m in zip(base, figures(per_message[name]), strict=True))
            )
        )


def figures(values: list[float]) -> tuple[float, float, float]:
    quartile = statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0]
    return min(values), quartile, statistics.median(values)


if __name__ == "__main__":
    main()
