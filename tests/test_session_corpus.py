"""The shared corpus through the engine: LIST sizes, RETR and TOP bytes, at every chunk boundary."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import pytest

from popserver.protocol import wire
from popserver.testing import MemoryMaildrop
from tests.conftest import CORPUS_SIZES, corpus_files
from tests.test_session import Client
from tests.test_wire import reference_body, reference_top

FILES = corpus_files()
RAW = [path.read_bytes() for path in FILES]
PRESENTED = [wire.normalize_line_endings(raw) for raw in RAW]
NUMBER = {path.name: number for number, path in enumerate(FILES, start=1)}


class SplitMaildrop(MemoryMaildrop):
    """Yields each message cut at the given positions, to put a chunk boundary exactly anywhere."""

    def __init__(self, messages: list[bytes], cuts: tuple[int, ...]) -> None:
        super().__init__(messages)
        self.cuts = cuts

    def read(self, number: int) -> Iterator[bytes]:
        body = self.bodies[number - 1]
        points = [0, *sorted(min(c, len(body)) for c in self.cuts), len(body)]
        for a, b in pairwise(points):
            yield body[a:b]


def corpus_client(**kwargs: object) -> Client:
    client = Client(RAW, **kwargs)  # type: ignore[arg-type]
    client.login()
    return client


def test_the_corpus_is_complete():
    assert [p.name for p in FILES] == sorted(CORPUS_SIZES)


def test_list_sizes_of_the_corpus():
    client = corpus_client()
    lines = [f"{n} {len(data)}" for n, data in enumerate(PRESENTED, start=1)]
    expected = f"+OK {len(FILES)} messages:\r\n" + "".join(line + "\r\n" for line in lines) + ".\r\n"
    assert client.send(b"LIST\r\n") == expected.encode()
    for path, data in zip(FILES, PRESENTED):
        _on_disk, listed = CORPUS_SIZES[path.name]
        if path.name != "12-from-line.eml":  # the MDA strips its From line; the engine keeps what it is given
            assert len(data) == listed, path.name
        assert client.send(f"LIST {NUMBER[path.name]}\r\n".encode()) == (
            f"+OK {NUMBER[path.name]} {len(data)}\r\n".encode()
        )
    total = sum(len(d) for d in PRESENTED)
    assert client.send(b"STAT\r\n") == f"+OK {len(FILES)} {total}\r\n".encode()


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 1000, 64 * 1024])
def test_retr_of_the_whole_corpus(chunk_size):
    client = corpus_client(chunk_size=chunk_size)
    for number, data in enumerate(PRESENTED, start=1):
        out = client.send(f"RETR {number}\r\n".encode())
        assert out == f"+OK {len(data)} octets\r\n".encode() + reference_body(data), FILES[number - 1].name


def test_retr_returns_the_bytes_unchanged():
    client = corpus_client()
    for name in ("05-8bit-utf8.eml", "06-latin1-bytes.eml", "13-nul-byte.eml", "07-long-line.eml"):
        number = NUMBER[name]
        out = client.send(f"RETR {number}\r\n".encode())
        _status, body = out.split(b"\r\n", 1)
        assert body == PRESENTED[number - 1] + b".\r\n"


def test_retr_of_specific_corpus_messages():
    client = corpus_client()
    out = client.send(f"RETR {NUMBER['02-dot-lines.eml']}\r\n".encode())
    assert out.endswith(
        b"\r\n\r\n..\r\n...\r\n..leading dot\r\n....three\r\nmiddle . dot\r\n.. space\r\n..\r\nend\r\n.\r\n"
    )
    out = client.send(f"RETR {NUMBER['04-no-final-newline.eml']}\r\n".encode())
    assert out.endswith(b"\r\n\r\nlast line has no newline\r\n.\r\n")
    out = client.send(f"RETR {NUMBER['03-bare-lf.eml']}\r\n".encode())
    assert out.startswith(b"+OK 243 octets\r\n")
    assert b"\n" not in out.replace(b"\r\n", b"")
    out = client.send(f"RETR {NUMBER['10-mixed-endings.eml']}\r\n".encode())
    assert b"lone cr\rline\r\n" in out
    out = client.send(f"RETR {NUMBER['08-headers-only.eml']}\r\n".encode())
    assert out.endswith(b"Content-Type: text/plain; charset=utf-8\r\n.\r\n")


def test_dot_stuffing_at_every_chunk_size():
    data = PRESENTED[NUMBER["02-dot-lines.eml"] - 1]
    expected = b"+OK 264 octets\r\n" + reference_body(data)
    for chunk_size in range(1, len(data) + 2):
        client = Client([data], chunk_size=chunk_size)
        client.login()
        assert client.send(b"RETR 1\r\n") == expected, chunk_size


def test_dot_stuffing_at_every_boundary_position():
    data = PRESENTED[NUMBER["02-dot-lines.eml"] - 1]
    body_start = data.index(b"\r\n\r\n") + 2
    expected = b"+OK 264 octets\r\n" + reference_body(data)
    for cut in range(body_start - 2, len(data) + 1):
        for second in (cut, cut + 1, cut + 2):
            client = Client(maildrop=SplitMaildrop([data], (cut, second)))
            client.login()
            assert client.send(b"RETR 1\r\n") == expected, (cut, second)


TOP_FILE = PRESENTED[NUMBER["14-top-lines.eml"] - 1]
TOP_HEADERS = TOP_FILE[: TOP_FILE.index(b"\r\n\r\n") + 4]


def top_expected(k: int) -> bytes:
    body = b"".join(f"body line {i}\r\n".encode() for i in range(1, min(k, 20) + 1))
    return b"+OK\r\n" + TOP_HEADERS + body + b".\r\n"


@pytest.mark.parametrize("k", [0, 1, 5, 19, 20, 21, 1000])
def test_top_of_the_numbered_lines(k):
    client = corpus_client()
    number = NUMBER["14-top-lines.eml"]
    assert client.send(f"TOP {number} {k}\r\n".encode()) == top_expected(k)
    assert client.session.stats.top_count == 1


@pytest.mark.parametrize("k", [0, 3, 20, 25])
def test_top_at_every_boundary_position(k):
    expected = top_expected(k)
    for cut in range(len(TOP_FILE) + 1):
        client = Client(maildrop=SplitMaildrop([TOP_FILE], (cut, cut + 1)))
        client.login()
        assert client.send(b"TOP 1 %d\r\n" % k) == expected, (k, cut)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 5, 17, 180, 10_000])
def test_top_of_the_whole_corpus(chunk_size):
    client = corpus_client(chunk_size=chunk_size)
    for number, data in enumerate(PRESENTED, start=1):
        for k in (0, 2, 10_000):
            out = client.send(f"TOP {number} {k}\r\n".encode())
            assert out == b"+OK\r\n" + reference_body(reference_top(data, k)), (FILES[number - 1].name, k)


def test_top_of_headers_only_and_empty_body():
    client = corpus_client()
    headers_only = PRESENTED[NUMBER["08-headers-only.eml"] - 1]
    for k in (0, 1, 50):
        out = client.send(f"TOP {NUMBER['08-headers-only.eml']} {k}\r\n".encode())
        assert out == b"+OK\r\n" + headers_only + b".\r\n"
    empty_body = PRESENTED[NUMBER["09-empty-body.eml"] - 1]
    assert empty_body.endswith(b"\r\n\r\n")
    for k in (0, 1, 50):
        out = client.send(f"TOP {NUMBER['09-empty-body.eml']} {k}\r\n".encode())
        assert out == b"+OK\r\n" + empty_body + b".\r\n"


def test_top_stops_reading_early():
    reads: list[int] = []

    class Counting(MemoryMaildrop):
        def read(self, number: int) -> Iterator[bytes]:
            for chunk in super().read(number):
                reads.append(len(chunk))
                yield chunk

    big = b"Subject: big\r\n\r\n" + b"line\r\n" * 100_000
    client = Client(maildrop=Counting([big], chunk_size=1024))
    client.login()
    assert client.send(b"TOP 1 2\r\n") == b"+OK\r\nSubject: big\r\n\r\nline\r\nline\r\n.\r\n"
    assert len(reads) == 1


def test_a_large_retr_streams_in_large_chunks():
    line = b"x" * 76 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * 200_000 + b".last\r\n"  # about 15.6 MB
    client = Client([big], chunk_size=1024 * 1024)
    client.login()
    pieces = client.pieces(b"RETR 1\r\n")
    status, body, terminator = pieces[0], pieces[1:-1], pieces[-1]
    assert 10 <= len(body) <= 20  # chunk by chunk, never the whole message in one piece
    assert all(len(p) >= 512 * 1024 for p in body[:-1])
    assert status == b"+OK %d octets\r\n" % len(big) and body[0].startswith(b"Subject: big\r\n")
    assert body[-1].endswith(b"\r\n..last\r\n") and terminator == b".\r\n"
    assert sum(map(len, pieces)) == len(b"+OK %d octets\r\n" % len(big)) + len(big) + 1 + 3
    assert client.session.stats.retr_bytes == len(big)
