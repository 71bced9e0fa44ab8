"""Bench: server memory growth and throughput while one client RETRs a 50 MB message.

.venv/bin/python bench/retr_memory.py [--megabytes 50]
"""

import argparse
import socket
import time

from common import Server, make_user, setup_django


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=50)
    args = parser.parse_args()
    env = setup_django(fast_hasher=True)
    from django.db import connection

    from popserver.mailin.delivery import deliver

    make_user("big", "pw")
    line = b"." + b"x" * 76 + b"\r\n"  # every line needs dot-stuffing: the worst case
    body = line * (args.megabytes * 1024 * 1024 // len(line))
    deliver("big", b"Subject: big\r\n\r\n" + body)
    del body
    server = Server(env)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=120)
        sock.recv(1000)
        sock.sendall(b"USER big\r\nPASS pw\r\n")
        replies = b""
        while replies.count(b"\r\n") < 2:
            replies += sock.recv(1000)
        baseline = server.rss_kib()
        peak = baseline
        started = time.perf_counter()
        sock.sendall(b"RETR 1\r\n")
        received, tail = 0, b""
        while not tail.endswith(b"\r\n.\r\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("connection closed")
            received += len(chunk)
            tail = (tail + chunk)[-5:]
            peak = max(peak, server.rss_kib())
        elapsed = time.perf_counter() - started
        sock.sendall(b"QUIT\r\n")
        sock.close()
    finally:
        server.stop()
    print(f"database: {connection.vendor}; message: {args.megabytes} MB, every line dot-stuffed")
    print(f"RETR: {received / 1e6:.1f} MB in {elapsed:.2f} s = {received / 1e6 / elapsed:.0f} MB/s")
    print(
        f"server RSS: {baseline / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB during "
        f"(growth {(peak - baseline) / 1024:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
