"""A POP3 load client on raw sockets, the same for every server (popserver, Dovecot, anything on HOST:PORT).

    .venv/bin/python bench/pop3load.py 127.0.0.1:1110 USER PASSWORD [--sequential] [--pipelined]
        [--large N] [--sessions 1,8,32 --users 'user{n}' --seconds 10]

Four measurements, each a function that returns its figures:
- ``retr_sequential``: RETR 1..N one at a time (send, read the whole reply, next): messages/s;
- ``retr_pipelined``: RETR 1..N in one send (RFC 2449 PIPELINING), then the N replies: messages/s;
- ``retr_large``: one RETR of a large message: MB/s (10^6 octets of the reply as sent, stuffing included);
- ``sessions``: N client processes each looping connect, USER, PASS, STAT, UIDL, QUIT (one round trip per
  command, as mail clients do) for a fixed time: sessions/s and per-session p50/p99.

The client stays cheap so the server is what is measured: replies are found with ``bytes.find`` on a
buffer (a multi-line reply ends at the first CRLF.CRLF after its status line, RFC 1939 s.3; a body line
that is a lone "." arrives stuffed as ".."), nothing is decoded or unstuffed, and concurrency uses
processes, not threads, so the client's own GIL does not add to the latencies. Each figure comes with the
client's CPU time, to show it did not dominate.
"""

import argparse
import multiprocessing
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, Self

RECV_SIZE = 256 * 1024
TERMINATOR = b"\r\n.\r\n"
KEEP_AT_MOST = 4 * 1024 * 1024  # a body longer than this is counted, not kept, unless asked for


class Pop3Error(Exception):
    """A -ERR reply (or a reply that is not +OK)."""


class Client:
    """One POP3 connection: send command lines, read single-line and multi-line replies."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0
        self.on_read = None  # called after each read from the socket (a memory sampler, say)
        self.greeting = self.ok()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _fill(self) -> None:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data
        if self.on_read is not None:
            self.on_read()

    def line(self) -> bytes:
        """The next reply line, without its CRLF."""
        if self.pos:
            del self.buf[: self.pos]  # O(1) at the front of a bytearray
            self.pos = 0
        while (end := self.buf.find(b"\r\n")) < 0:
            self._fill()
        line = bytes(self.buf[:end])
        self.pos = end + 2
        return line

    def ok(self) -> bytes:
        line = self.line()
        if not line.startswith(b"+OK"):
            raise Pop3Error(line.decode("ascii", "replace"))
        return line

    def command(self, line: bytes) -> bytes:
        """Send one command line and return its single-line +OK reply."""
        self.sock.sendall(line + b"\r\n")
        return self.ok()

    def multi(self, keep: bool = False) -> tuple[int, bytes | None]:
        """Read one multi-line reply: (octets of its body as sent, stuffed; the body if ``keep``).

        The body is everything after the status line up to and including the CRLF before the final ".";
        an empty body is the status line's CRLF followed at once by ".CRLF".
        """
        self.ok()
        buf = self.buf
        start = self.pos
        scan = start - 2
        dropped = 0
        while (end := buf.find(TERMINATOR, scan)) < 0:
            if not keep and len(buf) - start > KEEP_AT_MOST:
                cut = len(buf) - 4  # the terminator may straddle the next read
                dropped += cut - start
                del buf[:cut]
                start = scan = 0
            else:
                scan = max(scan, len(buf) - 4)
            self._fill()
        body_end = end + 2 if end >= start else start
        self.pos = end + 5
        return dropped + body_end - start, (bytes(buf[start:body_end]) if keep else None)

    def login(self, user: str, password: str) -> None:
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + password.encode())

    def quit(self) -> None:
        self.command(b"QUIT")


def unstuff(body: bytes) -> bytes:
    """The message a multi-line body carries (RFC 1939 s.3: a leading "." of a line was doubled)."""
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


@dataclass
class Rate:
    messages: int
    octets: int
    seconds: float
    client_cpu: float

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.octets / 1e6 / self.seconds


class Watch(Protocol):
    """What a caller may hook around the timed part of a measurement (server CPU or memory readings)."""

    def start(self) -> None: ...
    def sample(self) -> None: ...
    def stop(self) -> None: ...


def _timed_session(host: str, port: int, user: str, password: str, run, watch: Watch | None) -> Rate:
    """Log in, then time ``run(client, message count)`` alone (``watch`` around it), then QUIT."""
    with Client(host, port) as client:
        client.login(user, password)
        count = int(client.command(b"STAT").split()[1])
        if watch is not None:
            watch.start()
        cpu, started = time.process_time(), time.perf_counter()
        messages, octets = run(client, count)
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if watch is not None:
            watch.stop()
        client.quit()
    return Rate(messages, octets, seconds, cpu)


def retr_sequential(
    host: str, port: int, user: str, password: str, watch: Watch | None = None, limit: int | None = None
) -> Rate:
    """RETR every message of the mailbox (or the first ``limit``), one command at a time."""

    def run(client: Client, count: int) -> tuple[int, int]:
        octets = 0
        count = count if limit is None else min(count, limit)
        for n in range(1, count + 1):
            client.sock.sendall(b"RETR %d\r\n" % n)
            octets += client.multi()[0]
        return count, octets

    return _timed_session(host, port, user, password, run, watch)


def retr_pipelined(host: str, port: int, user: str, password: str, watch: Watch | None = None) -> Rate:
    """RETR every message of the mailbox: all commands in one send, then all the replies."""

    def run(client: Client, count: int) -> tuple[int, int]:
        commands = b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1))
        if len(commands) <= 32 * 1024:  # fits the socket buffers: no need to read while sending
            client.sock.sendall(commands)
            sender = None
        else:
            sender = threading.Thread(target=client.sock.sendall, args=(commands,))
            sender.start()
        octets = sum(client.multi()[0] for _ in range(count))
        if sender is not None:
            sender.join()
        return count, octets

    return _timed_session(host, port, user, password, run, watch)


def retr_large(
    host: str, port: int, user: str, password: str, number: int = 1, watch: Watch | None = None
) -> Rate:
    """RETR one (large) message; ``watch.sample()`` runs after each read of the reply (a memory sampler)."""

    def run(client: Client, count: int) -> tuple[int, int]:
        client.on_read = watch.sample if watch is not None else None
        client.sock.sendall(b"RETR %d\r\n" % number)
        octets = client.multi()[0]
        client.on_read = None
        return 1, octets

    return _timed_session(host, port, user, password, run, watch)


def fetch(host: str, port: int, user: str, password: str, number: int) -> bytes:
    """The unstuffed bytes of message ``number`` (to check that both servers serve the same message)."""
    with Client(host, port) as client:
        client.login(user, password)
        client.sock.sendall(b"RETR %d\r\n" % number)
        body = client.multi(keep=True)[1]
        client.quit()
    return unstuff(body)


# -- sessions per second ----------------------------------------------------------------------------------


@dataclass
class Sessions:
    clients: int
    done: int
    errors: int
    seconds: float
    latencies: list[float] = field(repr=False)
    client_cpu: float
    first_error: str = ""

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def __add__(self, other: "Sessions") -> "Sessions":
        """Two measurements of the same loop as one (rounds of a bench)."""
        return Sessions(
            clients=self.clients,
            done=self.done + other.done,
            errors=self.errors + other.errors,
            seconds=self.seconds + other.seconds,
            latencies=sorted(self.latencies + other.latencies),
            client_cpu=self.client_cpu + other.client_cpu,
            first_error=self.first_error or other.first_error,
        )

    def percentile(self, q: float) -> float:
        """Per-session latency in ms at quantile ``q`` (nearest rank)."""
        if not self.latencies:
            return 0.0
        return self.latencies[min(len(self.latencies) - 1, int(q * len(self.latencies)))] * 1000


def one_session(host: str, port: int, user: str, password: str) -> None:
    """Connect, USER, PASS, STAT, UIDL, QUIT: one round trip each."""
    with Client(host, port, timeout=30) as client:
        client.login(user, password)
        client.command(b"STAT")
        client.sock.sendall(b"UIDL\r\n")
        client.multi()
        client.quit()


def _session_worker(host, port, user, password, seconds, barrier, results) -> None:
    latencies: list[float] = []
    errors = 0
    first_error = ""
    barrier.wait()
    cpu = time.process_time()
    started = time.perf_counter()
    deadline = started + seconds
    now = started
    while now < deadline:
        try:
            one_session(host, port, user, password)
            finished = time.perf_counter()
            latencies.append(finished - now)
        except (OSError, Pop3Error) as exc:
            finished = time.perf_counter()
            errors += 1
            first_error = first_error or f"{type(exc).__name__}: {exc}"
        now = finished
    results.put((len(latencies), errors, now - started, latencies, time.process_time() - cpu, first_error))


def sessions(host: str, port: int, users: list[str], password: str, clients: int, seconds: float) -> Sessions:
    """``clients`` processes loop over whole sessions for ``seconds``; client i logs in as users[i]."""
    ctx = multiprocessing.get_context("spawn")  # no inherited sockets or database connections
    barrier = ctx.Barrier(clients + 1)
    results = ctx.Queue()
    workers = [
        ctx.Process(
            target=_session_worker,
            args=(host, port, users[i % len(users)], password, seconds, barrier, results),
        )
        for i in range(clients)
    ]
    for worker in workers:
        worker.start()
    barrier.wait(timeout=60)
    gathered = [results.get(timeout=seconds + 120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    latencies = sorted(x for r in gathered for x in r[3])
    return Sessions(
        clients=clients,
        done=sum(r[0] for r in gathered),
        errors=sum(r[1] for r in gathered),
        seconds=max(r[2] for r in gathered),
        latencies=latencies,
        client_cpu=sum(r[4] for r in gathered),
        first_error=next((r[5] for r in gathered if r[5]), ""),
    )


def warm_up(host: str, port: int, users: list[str], password: str) -> None:
    """One session per user, untimed: Dovecot builds its index at a mailbox's first login."""
    for user in users:
        one_session(host, port, user, password)


# -- command line -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT")
    parser.add_argument("user")
    parser.add_argument("password")
    parser.add_argument("--sequential", action="store_true", help="RETR all messages one at a time")
    parser.add_argument("--pipelined", action="store_true", help="RETR all messages in one send")
    parser.add_argument("--large", type=int, metavar="N", help="RETR message N once and report MB/s")
    parser.add_argument(
        "--sessions", metavar="1,8,32", help="sessions/s at these numbers of client processes"
    )
    parser.add_argument("--users", default="{user}", help="per-client login names, e.g. 'user{n}' (n = 0..)")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    host, _, port_text = args.address.rpartition(":")
    port = int(port_text)
    if args.sequential:
        rate = retr_sequential(host, port, args.user, args.password)
        print(
            f"RETR one at a time: {rate.per_second:,.0f} messages/s ({rate.messages} in {rate.seconds:.2f} s)"
        )
    if args.pipelined:
        rate = retr_pipelined(host, port, args.user, args.password)
        print(f"RETR pipelined: {rate.per_second:,.0f} messages/s ({rate.messages} in {rate.seconds:.2f} s)")
    if args.large:
        rate = retr_large(host, port, args.user, args.password, args.large)
        print(f"RETR {args.large}: {rate.mb_per_second:,.0f} MB/s ({rate.octets / 1e6:.1f} MB)")
    if args.sessions:
        for clients in (int(n) for n in args.sessions.split(",")):
            users = [args.users.format(n=i, user=args.user) for i in range(clients)]
            result = sessions(host, port, users, args.password, clients, args.seconds)
            print(
                f"{clients} client(s): {result.per_second:,.1f} sessions/s, p50 {result.percentile(0.5):.1f} ms, "
                f"p99 {result.percentile(0.99):.1f} ms, {result.errors} errors {result.first_error}"
            )


if __name__ == "__main__":
    main()
