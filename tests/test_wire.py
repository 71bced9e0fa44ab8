"""Wire formatting on bytes: status lines, multi-line responses, line endings, dot-stuffing, TOP."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popserver.protocol import wire
from tests.conftest import CORPUS_SIZES, corpus_files


# Independent references: the slow, obvious way, line by line -------------------------------------------
def reference_normalize(data: bytes) -> bytes:
    return re.sub(rb"(?<!\r)\n", b"\r\n", data)


def reference_body(data: bytes) -> bytes:
    """The multi-line body of CRLF ``data``: every line stuffed and ended, then the terminator."""
    lines = data.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"


def reference_top(data: bytes, k: int) -> bytes:
    """TOP's cut of CRLF ``data``: headers, the blank line, ``k`` body lines; all of it without a blank line."""
    if data.startswith(b"\r\n"):
        end = 2
    else:
        found = data.find(b"\r\n\r\n")
        if found < 0:
            return data
        end = found + 4
    body = data[end:]
    pos = 0
    for _ in range(k):
        nxt = body.find(b"\r\n", pos)
        if nxt < 0:
            return data
        pos = nxt + 2
    return data[: end + pos]


def split_at(data: bytes, *positions: int) -> list[bytes]:
    cuts = [0, *sorted(positions), len(data)]
    return [data[a:b] for a, b in pairwise(cuts)]


def stuff_chunks(chunks: list[bytes]) -> bytes:
    stuffer = wire.DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.finish()


def top_chunks(chunks: list[bytes], k: int) -> bytes:
    truncator = wire.TopTruncator(k)
    out = []
    for chunk in chunks:
        out.append(truncator.feed(chunk))
    return b"".join(out)


# Status lines ------------------------------------------------------------------------------------------
def test_ok_and_err():
    assert wire.ok() == b"+OK\r\n"
    assert wire.ok("Logged in.") == b"+OK Logged in.\r\n"
    assert wire.err("[SYS/TEMP] Try later.") == b"-ERR [SYS/TEMP] Try later.\r\n"
    assert wire.continuation() == b"+ \r\n"
    assert wire.continuation(b"VXNlcm5hbWU6") == b"+ VXNlcm5hbWU6\r\n"


def test_status_lines_never_contain_line_breaks():
    assert wire.err("a\r\nb\nc\rd") == b"-ERR a  b c d\r\n"


def test_status_lines_stay_within_512_octets():
    line = wire.err("x" * 2000)
    assert len(line) == wire.MAX_RESPONSE_LINE == 512
    assert line.endswith(b"xx\r\n") and line.count(b"\r\n") == 1
    cut = wire.ok("é" * 600)
    assert len(cut) <= 512
    assert cut.decode("utf-8") == "+OK " + "é" * 253 + "\r\n"  # no half character at the cut


def test_status_line_text_is_utf8():
    assert wire.err("Zoë") == "-ERR Zoë\r\n".encode()


def test_multiline():
    assert wire.multiline(wire.ok(), []) == b"+OK\r\n.\r\n"
    assert (
        wire.multiline(wire.ok("2 messages:"), ["1 10", b"2 20"])
        == b"+OK 2 messages:\r\n1 10\r\n2 20\r\n.\r\n"
    )
    assert wire.multiline(wire.ok(), [".x", "."]) == b"+OK\r\n..x\r\n..\r\n.\r\n"


# Line endings ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", b""),
        (b"a", b"a"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"\n", b"\r\n"),
        (b"\n\n", b"\r\n\r\n"),
        (b"a\rb", b"a\rb"),
        (b"\r", b"\r"),
        (b"\r\r\n", b"\r\r\n"),
        (b"\r\n\n", b"\r\n\r\n"),
        (b"\n\r", b"\r\n\r"),
        (b"x\r\n\ry\nz", b"x\r\n\ry\r\nz"),
        (b"\x00\xff\n\x80", b"\x00\xff\r\n\x80"),
    ],
)
def test_normalize_line_endings(data, expected):
    assert wire.normalize_line_endings(data) == expected


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_normalize_matches_the_regex_reference(data):
    assert wire.normalize_line_endings(data) == reference_normalize(data)


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"."]), max_size=40))
@settings(max_examples=300, deadline=None)
def test_normalize_on_line_ending_soup(parts):
    data = b"".join(parts)
    normalized = wire.normalize_line_endings(data)
    assert normalized == reference_normalize(data)
    assert wire.normalize_line_endings(normalized) == normalized  # idempotent


def test_normalize_a_large_message():
    data = b"x" * 70 + b"\n"
    big = data * 300_000  # 21 MB
    out = wire.normalize_line_endings(big)
    assert len(out) == len(big) + 300_000
    assert out[:73] == b"x" * 70 + b"\r\n" + b"x"
    assert wire.normalize_line_endings(out) == out


def test_corpus_sizes_after_normalizing():
    files = corpus_files()
    assert {f.name for f in files} == set(CORPUS_SIZES)
    for path in files:
        raw = path.read_bytes()
        on_disk, listed = CORPUS_SIZES[path.name]
        assert len(raw) == on_disk
        if path.name != "12-from-line.eml":  # the MDA drops its "From " line; the engine does not
            assert len(wire.normalize_line_endings(raw)) == listed, path.name


# Dot-stuffing ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
        (b"a\r\n.\r\n..\r\n", b"a\r\n..\r\n...\r\n.\r\n"),
        (b"a.b\r\n .c\r\n", b"a.b\r\n .c\r\n.\r\n"),
        (b"a\r.b\r\n", b"a\r.b\r\n.\r\n"),  # a lone CR does not end a line
        (b"a\r", b"a\r\r\n.\r\n"),
        (b"a\n.b\n", b"a\n..b\n\r\n.\r\n"),  # not normalized: still stuffed after every LF
    ],
)
def test_stuff_message(data, expected):
    assert wire.stuff_message(data) == expected


def test_dot_stuffing_at_every_chunk_boundary():
    data = b".a\r\n..\r\n.\r\nb.\r\n\r\n.\r\n.c"
    expected = reference_body(data)
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert stuff_chunks(split_at(data, i, j)) == expected, (i, j)


def test_a_chunk_without_a_dot_is_passed_on_without_a_copy():
    stuffer = wire.DotStuffer()
    chunk = b"QUJD\r\n" * 1000  # base64 lines: never a dot
    assert stuffer.feed(chunk) is chunk
    assert stuffer.feed(b".x\r\n") == b"..x\r\n"  # the line start carried over from the last chunk


def test_dot_stuffing_with_empty_chunks():
    assert stuff_chunks([b"a\r\n", b"", b"", b".b"]) == b"a\r\n..b\r\n.\r\n"
    assert stuff_chunks([b"", b"."]) == b"..\r\n.\r\n"


def test_a_final_crlf_split_across_chunks_is_seen():
    assert stuff_chunks([b"a\r", b"\n"]) == b"a\r\n.\r\n"
    assert stuff_chunks([b"a", b"\r", b"\n", b"", b""]) == b"a\r\n.\r\n"


@given(
    st.lists(st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r", b"\x00"]), max_size=30),
    st.lists(st.integers(min_value=0, max_value=60), max_size=5),
)
@settings(max_examples=300, deadline=None)
def test_dot_stuffing_property(parts, cuts):
    data = b"".join(parts)
    positions = [min(c, len(data)) for c in cuts]
    assert stuff_chunks(split_at(data, *positions)) == reference_body(data)


@st.composite
def dots_at_chunk_boundaries(draw):
    """Data with at least one line that starts with "." and chunk cuts placed at, just before and just
    after such dots and at line starts: the places where stuffing across chunks goes wrong."""
    parts = draw(st.lists(st.sampled_from([b".", b"\r\n", b"a", b"..", b"\r"]), max_size=25))
    at = draw(st.integers(min_value=0, max_value=len(parts)))
    data = b"".join([*parts[:at], b"\r\n.", *parts[at:]])
    line_starts = [0] + [i + 1 for i, octet in enumerate(data) if octet == 0x0A]
    dots = [i for i in line_starts if data[i : i + 1] == b"."]
    places = sorted({p for d in dots for p in (d - 1, d, d + 1)} | set(line_starts))
    places = [p for p in places if 0 <= p <= len(data)]
    forced = draw(st.sampled_from(dots))  # always cut right before one line-start dot
    cuts = draw(st.lists(st.sampled_from(places), max_size=6))
    return data, [forced, *cuts]


@given(dots_at_chunk_boundaries())
@settings(max_examples=200, deadline=None)
def test_dot_stuffing_at_generated_chunk_boundaries(case):
    data, cuts = case
    assert stuff_chunks(split_at(data, *cuts)) == reference_body(data)


# TOP -------------------------------------------------------------------------------------------------
TOP_MESSAGE = b"A: 1\r\nB: 2\r\n\r\nline 1\r\n\r\n.line 3\r\nline 4"


@pytest.mark.parametrize(
    "k, expected",
    [
        (0, b"A: 1\r\nB: 2\r\n\r\n"),
        (1, b"A: 1\r\nB: 2\r\n\r\nline 1\r\n"),
        (2, b"A: 1\r\nB: 2\r\n\r\nline 1\r\n\r\n"),
        (3, b"A: 1\r\nB: 2\r\n\r\nline 1\r\n\r\n.line 3\r\n"),
        (4, TOP_MESSAGE),
        (50, TOP_MESSAGE),
    ],
)
def test_top_cut(k, expected):
    assert reference_top(TOP_MESSAGE, k) == expected
    for i in range(len(TOP_MESSAGE) + 1):
        for j in range(i, len(TOP_MESSAGE) + 1):
            assert top_chunks(split_at(TOP_MESSAGE, i, j), k) == expected, (k, i, j)


@pytest.mark.parametrize(
    "data, k, expected",
    [
        (b"A: 1\r\nB: 2\r\n", 0, b"A: 1\r\nB: 2\r\n"),  # headers only: the whole message
        (b"A: 1\r\nB: 2", 5, b"A: 1\r\nB: 2"),
        (b"\r\nbody 1\r\nbody 2\r\n", 1, b"\r\nbody 1\r\n"),  # no headers at all
        (b"\r\nbody", 0, b"\r\n"),
        (b"A: 1\r\n\r\n", 3, b"A: 1\r\n\r\n"),  # empty body
        (b"A: 1\r\n\r\n\r\n\r\n", 1, b"A: 1\r\n\r\n\r\n"),
        (
            b"A: 1\r\n\r\r\n\r\nx\r\n",
            0,
            b"A: 1\r\n\r\r\n\r\n",
        ),  # a header line holding a lone CR is not blank
        (b"", 3, b""),
    ],
)
def test_top_edge_cases(data, k, expected):
    assert reference_top(data, k) == expected
    for i in range(len(data) + 1):
        assert top_chunks(split_at(data, i), k) == expected, i


def test_top_stops_reading_when_done():
    truncator = wire.TopTruncator(1)
    assert truncator.feed(b"A: 1\r\n\r\nx\r\ny") == b"A: 1\r\n\r\nx\r\n"
    assert truncator.done
    assert truncator.feed(b"more\r\n") == b""


def test_top_rejects_negative_counts():
    with pytest.raises(ValueError):
        wire.TopTruncator(-1)


@given(
    st.lists(st.sampled_from([b"H: v", b"\r\n", b".", b"x", b"\r"]), max_size=30),
    st.integers(min_value=0, max_value=8),
    st.lists(st.integers(min_value=0, max_value=60), max_size=4),
)
@settings(max_examples=300, deadline=None)
def test_top_property(parts, k, cuts):
    data = b"".join(parts)
    positions = [min(c, len(data)) for c in cuts]
    assert top_chunks(split_at(data, *positions), k) == reference_top(data, k)


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_top_and_body_against_references(path):
    data = wire.normalize_line_endings(path.read_bytes())
    assert wire.stuff_message(data) == reference_body(data)
    for k in (0, 1, 5, 1000):
        assert top_chunks([data], k) == reference_top(data, k)
