"""Bench (issue 14): a legitimate login's latency, idle and while N clients flood the server before login.

    .venv/bin/python bench/prelogin_flood.py [--flooders 20] [--seconds 5] [--runpop3-args="--workers 2"]
        [--flood-from 127.0.0.2] [--client-from 127.0.0.3] [--repeat 2]

Each flooder is a process that loops: connect (its socket bound to ``--flood-from``, a comma list handed out
in turn), send 2,000 ``CAPA`` at once (RFC 2449 pipelining, the server cuts it after its pre-login budget),
read until the server closes, reconnect. The legitimate client (bound to ``--client-from``) loops connect,
USER, PASS, QUIT with ``--pause`` between sessions; its figure is the time from connect() to PASS's ``+OK``.
First ``--seconds`` idle, then ``--seconds`` with the flooders (after ``--settle`` seconds of flood), per
repeat. Bound to other loopback addresses than 127.0.0.1, as in real life an abuser is not on the user's
address; ``--trusted`` sets POPSERVER_TRUSTED_NETWORKS (default: 127.0.0.1 only, so both addresses are
ordinary remote peers; PLAINTEXT_AUTH is "always" so the client may log in without TLS).

Prints p50/p99 of the login, the flooders' connections per second and what the server and the flooders used
of the CPUs. The database is DATABASE_URL (SQLite under data/ by default), with a cheap password hasher.
"""

import argparse
import json
import multiprocessing
import os
import shlex
import socket
import statistics
import tempfile
import time
from pathlib import Path

from common import Server, make_user, setup_django, tree_cpu_seconds

PASSWORD = "bench-password"
FLOOD = b"CAPA\r\n" * 2000


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def flooder(port: int, source: str, stop, counts, index: int) -> None:
    """Reconnect and pipeline CAPA until ``stop`` is set; ``counts[index]``: connections the server closed."""
    done = 0
    while not stop.is_set():
        try:
            with connect(port, source) as sock:
                try:
                    sock.sendall(FLOOD)
                except OSError:
                    pass  # closed under us after the budget: read what was said
                while sock.recv(65536):
                    pass
        except OSError:
            continue
        done += 1
        counts[index] = done


class Login:
    """connect, USER, PASS (timed to its +OK), QUIT."""

    def __init__(self, port: int, source: str):
        self.port, self.source = port, source

    def once(self) -> float:
        started = time.perf_counter()
        with connect(self.port, self.source) as sock:
            reader = sock.makefile("rb")
            self.expect(reader.readline())
            sock.sendall(b"USER legit\r\n")
            self.expect(reader.readline())
            sock.sendall(f"PASS {PASSWORD}\r\n".encode())
            self.expect(reader.readline())
            elapsed = time.perf_counter() - started
            sock.sendall(b"QUIT\r\n")
            reader.readline()
            return elapsed

    @staticmethod
    def expect(line: bytes) -> None:
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"unexpected reply {line!r}")


def measure(login: Login, seconds: float, pause: float) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        latencies.append(login.once())
        time.sleep(pause)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def cpu_seconds(pids: list[int]) -> float:
    return sum(tree_cpu_seconds(pid) for pid in pids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flooders", type=int, default=20, help="flooding client processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of flood before measuring")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds between the client's logins")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--flood-from", default="127.0.0.2", help="source addresses of the flooders (a list)")
    parser.add_argument("--client-from", default="127.0.0.3", help="source address of the legitimate client")
    parser.add_argument("--trusted", default="127.0.0.1/32", help="POPSERVER_TRUSTED_NETWORKS (comma list)")
    parser.add_argument("--runpop3-args", default="", help='extra runpop3 arguments, e.g. "--workers 2"')
    args = parser.parse_args()
    sources = args.flood_from.split(",")

    os.environ["POPSERVER_TRUSTED_NETWORKS"] = json.dumps([n for n in args.trusted.split(",") if n])
    os.environ["POPSERVER_PLAINTEXT_AUTH"] = "always"
    env = setup_django(fast_hasher=True)
    env["LOG_LEVEL"] = "INFO"
    from django.db import connection

    make_user("legit", PASSWORD)
    connection.close()

    workdir = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    rows = []
    with open(workdir / "popserver.log", "w") as log:
        server = Server(env, args=shlex.split(args.runpop3_args), stderr=log)
        login = Login(server.port, args.client_from)
        try:
            measure(login, 0.5, args.pause)  # warm up
            for _ in range(args.repeat):
                cpu = tree_cpu_seconds(server.proc.pid)
                idle = measure(login, args.seconds, args.pause)
                idle_cpu = (tree_cpu_seconds(server.proc.pid) - cpu) / args.seconds

                stop = multiprocessing.Event()
                counts = multiprocessing.Array("l", args.flooders)
                procs = [
                    multiprocessing.Process(
                        target=flooder, args=(server.port, sources[i % len(sources)], stop, counts, i)
                    )
                    for i in range(args.flooders)
                ]
                for proc in procs:
                    proc.start()
                time.sleep(args.settle)
                before = sum(counts)
                cpu = tree_cpu_seconds(server.proc.pid)
                flood_cpu = cpu_seconds([p.pid for p in procs])
                started = time.monotonic()
                flooded = measure(login, args.seconds, args.pause)
                elapsed = time.monotonic() - started
                server_cpu = (tree_cpu_seconds(server.proc.pid) - cpu) / elapsed
                flood_cpu = (cpu_seconds([p.pid for p in procs]) - flood_cpu) / elapsed
                connections = (sum(counts) - before) / elapsed
                stop.set()
                for proc in procs:
                    proc.join(timeout=30)
                    if proc.is_alive():
                        proc.kill()
                rows.append((idle, idle_cpu, flooded, server_cpu, flood_cpu, connections))
        finally:
            server.stop()

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\ndatabase: {connection.vendor}; runpop3 {args.runpop3_args or '(no extra arguments)'}; "
        f"{os.cpu_count()} cores; load average after the run: {load}; {args.flooders} flooders from "
        f"{args.flood_from}, the client from {args.client_from}; trusted networks {args.trusted or '(none)'}; "
        f"{args.seconds:g} s per figure\n"
    )
    print(
        "| idle login p50 / p99 ms | flooded login p50 / p99 ms | flooded p50 / idle p50 | logins (idle / flooded) "
        "| flood connections/s | server CPU, cores (idle / flooded) | flooders' CPU, cores |"
    )
    print("|---|---|---|---|---|---|---|")
    for idle, idle_cpu, flooded, server_cpu, flood_cpu, connections in rows:
        ratio = statistics.median(flooded) / statistics.median(idle)
        print(
            f"| {percentile(idle, 0.5):.1f} / {percentile(idle, 0.99):.1f} "
            f"| {percentile(flooded, 0.5):.1f} / {percentile(flooded, 0.99):.1f} | {ratio:.2f} "
            f"| {len(idle)} / {len(flooded)} | {connections:,.0f} | {idle_cpu:.2f} / {server_cpu:.2f} "
            f"| {flood_cpu:.2f} |"
        )
    print(f"\npopserver log: {workdir / 'popserver.log'}")


if __name__ == "__main__":
    main()
