"""Bench: RETR of many small messages, one at a time and pipelined, and one large RETR (popserver only).

    .venv/bin/python bench/retr_rate.py [--messages 1000] [--size 8192] [--large-mib 50] [--repeat 3]
        [--profile SECONDS] [--store DOTTED.PATH]

Messages go in through ``deliver()`` (the real storage path). The client is a raw socket that finds reply ends
with ``bytes.find``, so the server is what is measured. ``--profile N`` keeps a load (``--load``: pipelined,
sequential or large) running for N seconds and prints the server's PID first, for ``py-spy record --pid PID``. ``--store`` sets
POPSERVER_BODY_STORE for the delivery and the server. Figures beside Dovecot: bench/retr.py.
"""

import argparse
import os
import socket
import tempfile
import threading
import time

from common import Server, make_user, setup_django

TERMINATOR = b"\r\n.\r\n"


def sample_message(size: int) -> bytes:
    """A plain-text message of exactly ``size`` octets, CRLF line endings, 75-octet body lines."""
    head = (
        b"From: Sender <sender@example.org>\r\nTo: Bench <bench@example.org>\r\nSubject: bench\r\n"
        b"Date: Mon, 01 Dec 2025 12:00:00 +0000\r\nMessage-ID: <bench@example.org>\r\n\r\n"
    )
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod..\r\n"
    body = (line * (size // len(line) + 1))[: size - len(head) - 2]
    return head + body.rstrip(b"\r") + b"x" * (body.endswith(b"\r")) + b"\r\n"


class Client:
    def __init__(self, port: int, user: str, password: str = "pw"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.lines(1)
        self.sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
        self.lines(2)

    def lines(self, count: int) -> None:
        while self.buf.count(b"\r\n") < count:
            self.buf += self.sock.recv(65536)
        if b"-ERR" in self.buf:
            raise RuntimeError(self.buf.decode())
        del self.buf[:]

    def replies(self, count: int, keep: bool = False) -> tuple[int, bytes]:
        """Read ``count`` multi-line replies; returns octets received (and the data if ``keep``)."""
        received = 0
        kept = bytearray()
        buf = bytearray()
        found = 0
        scan = 0
        while found < count:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            received += len(data)
            buf += data
            while (end := buf.find(TERMINATOR, scan)) >= 0:
                found += 1
                scan = end + 5
            scan = max(scan, len(buf) - 4)  # a terminator may straddle the next read
            if keep:
                continue
            cut = max(0, min(scan, len(buf) - 4))
            del buf[:cut]
            scan -= cut
        if keep:
            kept = bytes(buf)
        return received, kept

    def quit(self) -> None:
        self.sock.sendall(b"QUIT\r\n")
        self.lines(1)  # the lock is free once +OK is here
        self.sock.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sequential(port: int, count: int) -> float:
    client = Client(port, "small")
    started = time.perf_counter()
    for n in range(1, count + 1):
        client.sock.sendall(b"RETR %d\r\n" % n)
        client.replies(1)
    elapsed = time.perf_counter() - started
    client.quit()
    return count / elapsed


def pipelined(port: int, count: int) -> float:
    client = Client(port, "small")
    commands = b"".join(b"RETR %d\r\n" % n for n in range(1, count + 1))
    started = time.perf_counter()
    sender = threading.Thread(target=client.sock.sendall, args=(commands,))
    sender.start()
    client.replies(count)
    elapsed = time.perf_counter() - started
    sender.join()
    client.quit()
    return count / elapsed


def large(server: Server) -> tuple[float, float]:
    client = Client(server.port, "large")
    baseline = peak = server.rss_kib()
    try:
        with open(f"/proc/{server.proc.pid}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.wait(0.002):
            peak = max(peak, server.rss_kib())

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    client.sock.sendall(b"RETR 1\r\n")
    received, _ = client.replies(1)
    elapsed = time.perf_counter() - started
    stop.set()
    watcher.join()
    peak = max(peak, server.peak_kib())
    client.quit()
    return received / 1e6 / elapsed, (peak - baseline) / 1024


def check(port: int, message: bytes) -> None:
    client = Client(port, "small")
    client.sock.sendall(b"RETR 1\r\n")
    _, data = client.replies(1, keep=True)
    client.quit()
    body = data.split(b"\r\n", 1)[1][: -len(b".\r\n")]
    assert body.replace(b"\r\n..", b"\r\n.") == message, "RETR did not return the delivered bytes"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--large-mib", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=float, default=0)
    parser.add_argument("--load", choices=["pipelined", "sequential", "large"], default="pipelined")
    parser.add_argument("--store", default="")
    args = parser.parse_args()
    if args.store:
        os.environ["POPSERVER_BODY_STORE"] = args.store
        os.environ["BODIES_DIR"] = tempfile.mkdtemp(prefix="bench-bodies-")  # the storage store's objects
    # room for --large-mib 200 (the memory check of issue 15)
    os.environ["POPSERVER_MAX_MESSAGE_SIZE"] = str(max(64, args.large_mib + 1) * 1024 * 1024)
    env = setup_django(fast_hasher=True)
    from django.db import connection

    from popserver.mailin.delivery import deliver

    message = sample_message(args.size)
    make_user("small", "pw")
    for _ in range(args.messages):
        deliver("small", message)
    if args.large_mib:
        make_user("large", "pw")
        line = b"." + b"x" * 76 + b"\r\n"  # every line stuffed: the worst case
        deliver("large", b"Subject: big\r\n\r\n" + line * (args.large_mib * 1024 * 1024 // len(line)))
    connection.close()
    server = Server(env)
    try:
        check(server.port, message)
        if args.profile:
            print(f"server pid {server.proc.pid}", flush=True)
            deadline = time.monotonic() + args.profile
            while time.monotonic() < deadline:
                if args.load == "large":
                    large(server)
                else:
                    globals()[args.load](server.port, args.messages)
            return
        seq, pipe, big = [], [], []
        cpu = {"seq": [], "pipe": []}
        pid = server.proc.pid
        for _ in range(args.repeat):
            before = cpu_seconds(pid)
            seq.append(sequential(server.port, args.messages))
            middle = cpu_seconds(pid)
            pipe.append(pipelined(server.port, args.messages))
            cpu["seq"].append(middle - before)
            cpu["pipe"].append(cpu_seconds(pid) - middle)
            if args.large_mib:
                big.append(large(server))
    finally:
        server.stop()
    print(
        f"database: {connection.vendor}; store: {args.store or 'default'}; load {os.getloadavg()[0]:.2f}; "
        f"best of {args.repeat}"
    )
    # The mean over the rounds: /proc counts CPU time in 10 ms ticks.
    per_message = {key: sum(values) / len(values) / args.messages * 1e6 for key, values in cpu.items()}
    print(
        f"RETR one at a time ({args.messages} x {args.size} octets): {max(seq):,.0f} messages/s, "
        f"server CPU {per_message['seq']:.0f} µs/message (with the session's login and QUIT)"
    )
    print(f"RETR pipelined: {max(pipe):,.0f} messages/s, server CPU {per_message['pipe']:.0f} µs/message")
    if big:
        print(
            f"one {args.large_mib} MiB RETR (every line stuffed): {max(r for r, _ in big):,.0f} MB/s, "
            f"server memory growth {max(g for _, g in big):.1f} MiB (worst)"
        )


if __name__ == "__main__":
    main()
