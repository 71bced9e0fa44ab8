"""The connection handler's output path: batching, the session's FLUSH mark, gather-writes (no server)."""

import socket
import threading

import pytest

from popserver.protocol.wire import FLUSH
from popserver.server.handler import WRITE_COALESCE, Pop3Handler, send_buffers


class Recording(Pop3Handler):
    """A handler with only its output path: records each write instead of needing a server."""

    def __init__(self):  # no socketserver set-up
        self.writes: list[bytes] = []
        self.sock = socket.socket()  # settimeout only

    def write(self, buffers):
        self.writes.append(b"".join(buffers))


@pytest.fixture
def handler():
    h = Recording()
    yield h
    h.sock.close()


def test_small_replies_are_one_write(handler):
    replies = [b"+OK %d\r\n" % n for n in range(250)]
    assert handler.send(iter(replies)) == sum(map(len, replies))
    assert handler.writes == [b"".join(replies)]


def test_the_flush_mark_ends_a_write(handler):
    handler.send(iter([b"+OK a\r\n", b"+OK b\r\n", FLUSH, b"+OK c\r\n", FLUSH, FLUSH]))
    assert handler.writes == [b"+OK a\r\n+OK b\r\n", b"+OK c\r\n"]


def test_large_output_is_written_in_bounded_batches(handler):
    chunk = b"x" * (64 * 1024)
    handler.send(iter([chunk] * 10))
    assert b"".join(handler.writes) == chunk * 10
    assert len(handler.writes) == -(-10 * len(chunk) // WRITE_COALESCE)
    assert all(len(w) <= WRITE_COALESCE for w in handler.writes)


def test_gather_write_survives_partial_sends():
    """sendmsg may take part of the buffers; the rest must follow, in order, with nothing lost."""
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    buffers = [bytes([65 + n % 26]) * (1000 + 37 * n) for n in range(600)]  # more than MAX_IOVEC buffers
    expected = b"".join(buffers)
    received = bytearray()

    def read_all():
        while len(received) < len(expected):
            data = right.recv(65536)
            if not data:
                break
            received.extend(data)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        left.settimeout(10)
        send_buffers(left, buffers)
        reader.join(10)
    finally:
        left.close()
        right.close()
    assert bytes(received) == expected
