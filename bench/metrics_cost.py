"""Bench (issue 16): what ``runpop3 --metrics`` costs per message, on the per-message benchmark.

    .venv/bin/python bench/metrics_cost.py [--messages 3000] [--size 4096] [--rounds 7] [-- RUNPOP3 ARGS]

Two runpop3 processes on one database, one with ``--metrics 127.0.0.1:0`` and one without, serve the same
mailbox (``--messages`` messages of ``--size`` octets). For ``--rounds`` rounds, alternating which server
goes first, each serves RETR 1..N one command at a time (``pop3load.retr_sequential``). The figure is the
server's CPU time per message during the RETRs: the sum over the server's threads of the time they ran
(``/proc/PID/task/*/schedstat``, in nanoseconds), so other load on the machine moves it little. The table
gives the best round, the lower quartile and the median of each server, and their differences: other load
only adds CPU time, so the best rounds say the most. Arguments after ``--`` go to both servers
(``--workers 2``: then every process of each server is counted).
"""

import argparse
import statistics
import sys
from pathlib import Path

import pop3load
from common import Server, bulk_messages, children, make_user, sample_message, setup_django

PASSWORD = "bench-password"


def cpu_ns(pid: int) -> int:
    """Nanoseconds on a CPU so far, summed over the live threads of ``pid`` and of its children."""
    total = 0
    for process in [pid, *children(pid)]:
        for task in Path(f"/proc/{process}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile
    return total


class CpuWatch:
    def __init__(self, pid: int):
        self.pid = pid
        self.used = 0

    def start(self) -> None:
        self.base = cpu_ns(self.pid)

    def sample(self) -> None:
        pass

    def stop(self) -> None:
        self.used = cpu_ns(self.pid) - self.base


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("server_args", nargs="*", help="after --: more runpop3 arguments for both servers")
    options = parser.parse_args()

    env = setup_django(fast_hasher=True)
    mailbox = make_user("bench", PASSWORD)
    bulk_messages(mailbox, options.messages, sample_message(options.size))
    extra = list(options.server_args)
    servers: dict[str, Server] = {}
    per_message: dict[str, list[float]] = {"without": [], "--metrics": []}
    try:
        # Two nodes on one database: each needs a name of its own.
        servers["without"] = Server({**env, "POPSERVER_NODE_NAME": "bench-plain"}, extra, stderr=None)
        servers["--metrics"] = Server(
            {**env, "POPSERVER_NODE_NAME": "bench-metrics"}, [*extra, "--metrics", "127.0.0.1:0"], stderr=None
        )
        for round_number in range(options.rounds):
            order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
            for name in order:
                watch = CpuWatch(servers[name].proc.pid)
                rate = pop3load.retr_sequential("127.0.0.1", servers[name].port, "bench", PASSWORD, watch)
                per_message[name].append(watch.used / 1000 / rate.messages)
                print(
                    f"round {round_number + 1} {name:>9}: {per_message[name][-1]:7.1f} µs CPU/message, "
                    f"{rate.per_second:7.0f} messages/s",
                    file=sys.stderr,
                )
    finally:
        for server in servers.values():
            server.stop()

    print(
        f"\n{options.messages} messages of {options.size} octets, RETR one at a time, {options.rounds} rounds"
    )
    print("| server | CPU µs/message: best | lower quartile | median | worst |")
    print("|---|---|---|---|---|")
    figures = {}
    for name, values in per_message.items():
        quartile = statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0]
        figures[name] = (min(values), quartile, statistics.median(values))
        print(
            f"| {name} | {min(values):.1f} | {quartile:.1f} | {statistics.median(values):.1f} | {max(values):.1f} |"
        )
    base, metered = figures["without"], figures["--metrics"]
    # Other load only adds CPU time (cache misses, a slower clock): the best rounds say the most.
    print(
        "\n--metrics costs {:+.1f} % CPU per message (best rounds), {:+.1f} % (lower quartiles), "
        "{:+.1f} % (medians)".format(*(100 * (m - b) / b for b, m in zip(base, metered, strict=True)))
    )


if __name__ == "__main__":
    main()
