"""Mail out: a mailbox as an mbox file, in POP3 order, each message streamed from the body store.

The file is mboxrd: a ``From MAILER-DAEMON <arrival time>`` line before each message, a blank line after it,
and one more ``>`` on every line of a message that starts with ``>...>From `` (``importmail`` takes it off
again). Messages keep their stored bytes, CRLF line endings included, so ``importmail`` reads back exactly
what was stored; the one exception is a message whose last line has no line break, which mbox cannot hold:
it gains a CRLF (the one POP3 shows before the terminating dot anyway).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

from popserver.exceptions import MessageExpunged
from popserver.models import Mailbox, Message
from popserver.storage.bodies import get_body_store

_FROM_LINE = re.compile(rb"^(>*From )", re.MULTILINE)


def export_mbox(
    mailbox: Mailbox, out: BinaryIO, *, x_uidl: bool = False, progress: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Write the mailbox's messages to ``out`` as mbox; returns (messages written, messages gone meanwhile).

    With ``x_uidl`` each message starts with an ``X-UIDL: <unique id>`` line, for ``importmail --x-uidl``.
    The message list is read first; a message deleted while the export runs (a POP3 QUIT) is left out.
    """
    rows = list(
        Message.objects.visible()
        .filter(mailbox=mailbox)
        .order_by("id")
        .values_list("pk", "uid", "arrived_at")
    )
    store = get_body_store()
    written = gone = 0
    for done, (pk, uid, arrived_at) in enumerate(rows, start=1):
        chunks = store.read_chunks(pk)
        try:
            first = next(chunks)
        except MessageExpunged:
            gone += 1
        else:
            stamp = time.asctime(arrived_at.utctimetuple()).encode()
            out.write(b"From MAILER-DAEMON " + stamp + b"\n")
            if x_uidl:
                out.write(b"X-UIDL: " + uid.encode("ascii") + b"\r\n")
            write_quoted(out, _chain(first, chunks))
            out.write(b"\n")  # the blank line that ends a message in mbox
            written += 1
        if progress is not None:
            progress(done)
    return written, gone


def write_quoted(out: BinaryIO, chunks: Iterable[bytes]) -> None:
    """Write a message's chunks with mboxrd quoting, ending its last line. Quoting looks at whole lines: the
    bytes after a chunk's last LF wait for the next chunk."""
    pending = bytearray()
    for chunk in chunks:
        cut = chunk.rfind(b"\n") + 1
        if not cut:  # no line ends in this chunk (a very long line)
            pending += chunk
            continue
        out.write(_FROM_LINE.sub(rb">\1", bytes(pending) + chunk[:cut] if pending else chunk[:cut]))
        pending = bytearray(chunk[cut:])
    if pending:
        out.write(_FROM_LINE.sub(rb">\1", bytes(pending)) + b"\r\n")


def _chain(first: bytes, rest: Iterable[bytes]):
    yield first
    yield from rest
