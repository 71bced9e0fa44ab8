"""The maildrop interface the POP3 session talks to (as Twisted's ``IMailbox``).

A maildrop is opened by a successful login, already holding the mailbox's exclusive lock (RFC 1939 s.4),
with a snapshot of the messages taken at that moment: message numbers, sizes and unique ids are fixed for
the session. DELE only marks (RFC 1939 s.5); ``commit()`` is UPDATE (s.6); ``release()`` ends a session
that did not QUIT, deleting nothing.

Implementations: ``popserver.storage.maildrop.OrmMaildrop`` (the database) and ``popserver.testing.MemoryMaildrop``.
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple


class MessageInfo(NamedTuple):
    """One message of the snapshot. A named tuple: a snapshot of 100,000 messages makes 100,000 of them."""

    size: int  # octets in the presented form (CRLF line endings), before dot-stuffing
    uid: str  # RFC 1939 s.7 unique id: 1-70 characters in 0x21-0x7E
    header_end: bool = True  # False: no blank line after the header (the oe-ns-eoh workaround adds one)


class Maildrop:
    """Base class: keeps the deletion marks; subclasses provide storage.

    Message numbers here are 1-based, as on the wire. ``number`` arguments are always valid numbers of the
    snapshot (the session checks them first).
    """

    # RFC 2449 s.6.7 EXPIRE for this mailbox: days after which retrieved messages are deleted, None: never.
    expire_days: int | None = None

    def __init__(self, messages: Sequence[MessageInfo]):
        self.messages: tuple[MessageInfo, ...] = tuple(messages)
        self.deleted: set[int] = set()
        self.retrieved: set[int] = set()  # RETR'd in this session (not TOP): recorded when the session ends
        self.total_size = sum(info.size for info in self.messages)
        self.deleted_size = 0

    def add_missing_header_ends(self) -> None:
        """Dovecot's oe-ns-eoh workaround: a message without a blank line after its header is sent with one,
        so its size counts the CRLF too (LIST and RETR must agree). Call before anything is listed."""
        self.messages = tuple(
            info if info.header_end else MessageInfo(info.size + 2, info.uid, False) for info in self.messages
        )
        self.total_size = sum(info.size for info in self.messages)

    # Snapshot ----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.messages)

    def info(self, number: int) -> MessageInfo:
        return self.messages[number - 1]

    def is_deleted(self, number: int) -> bool:
        return number in self.deleted

    def totals(self) -> tuple[int, int]:
        """(count, octets) of the messages not marked deleted, for STAT (RFC 1939 s.5), without a scan."""
        return len(self.messages) - len(self.deleted), self.total_size - self.deleted_size

    def visible(self) -> Iterator[tuple[int, MessageInfo]]:
        """(number, info) of every message not marked deleted, in order."""
        for number, info in enumerate(self.messages, start=1):
            if number not in self.deleted:
                yield number, info

    # Marks -------------------------------------------------------------------------------------------
    def mark_deleted(self, number: int) -> None:
        if number not in self.deleted:
            self.deleted.add(number)
            self.deleted_size += self.info(number).size

    def mark_retrieved(self, number: int) -> None:
        """RETR sent the whole message: its first retrieval is recorded at the end of the session."""
        self.retrieved.add(number)

    def numbers_to_remove(self) -> set[int]:
        """What UPDATE removes: the marked messages, and under EXPIRE 0 (RFC 2449 s.6.7: the server keeps no
        retrieved message) the retrieved ones too."""
        if self.expire_days == 0:
            return self.deleted | self.retrieved
        return set(self.deleted)

    def reset(self) -> None:
        self.deleted.clear()
        self.deleted_size = 0

    # Storage (subclasses) ----------------------------------------------------------------------------
    def read(self, number: int) -> Iterator[bytes]:
        """Yield the message's bytes in chunks (the presented form, not dot-stuffed).

        Raises ``MessageExpunged`` before the first chunk if something else removed the message; raising
        it later means the message vanished mid-transfer.
        """
        raise NotImplementedError

    def prefetch(self, numbers: Sequence[int]) -> int:
        """A hint: these messages (valid, not deleted) will be read next, in this order (pipelined RETR and
        TOP already received). A maildrop may read several in one go. Returns how many of ``numbers`` it
        has dealt with (read ahead or passed over); the session names the rest again later. The default
        does nothing and takes them all."""
        return len(numbers)

    def commit(self) -> None:
        """UPDATE: remove ``numbers_to_remove()`` (deleted, or hidden under a keep-deleted policy) and release
        the lock, all or nothing.

        Raises ``CommitFailed`` (or any error) if nothing was deleted.
        """
        raise NotImplementedError

    def release(self) -> None:
        """Release the lock without deleting anything (disconnect, autologout, shutdown). Idempotent."""
        raise NotImplementedError
