"""Test doubles for the POP3 engine, for popserver's tests and for users' own test suites.

``MemoryMaildrop`` keeps messages in memory; ``MemoryAuthenticator`` is an ``authenticate`` callable over a
dict. Neither needs Django or a database::

    from popserver.protocol.session import Pop3Session
    from popserver.testing import MemoryAuthenticator, MemoryMaildrop

    maildrop = MemoryMaildrop([b"Subject: hi\\r\\n\\r\\nhello\\r\\n"])
    session = Pop3Session(MemoryAuthenticator({"alice": ("secret", maildrop)}))
    b"".join(session.receive(b"USER alice\\r\\nPASS secret\\r\\nRETR 1\\r\\nQUIT\\r\\n"))
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterator, Mapping, Sequence

from popserver.exceptions import AuthenticationFailed, LoginRefused, MessageExpunged
from popserver.protocol.maildrop import Maildrop, MessageInfo
from popserver.protocol.wire import has_header_end, normalize_line_endings

__all__ = ["MemoryAuthenticator", "MemoryMaildrop"]


class MemoryMaildrop(Maildrop):
    """A maildrop over a list of message bytes.

    ``messages`` are normalized to the presented form (bare LF -> CRLF) unless ``normalize=False`` says they
    already are. ``read()`` yields ``chunk_size`` octets at a time, so tests can put a chunk boundary
    anywhere. ``expunge(n)`` simulates an administrator removing a message; ``commit_error`` makes
    ``commit()`` fail. ``commit_calls``, ``release_calls``, ``read_calls``, ``prefetch_calls`` and
    ``committed`` record what the session did (``prefetch_takes`` plays a maildrop that reads ahead only so
    many).
    """

    def __init__(
        self,
        messages: Sequence[bytes],
        *,
        uids: Sequence[str] | None = None,
        chunk_size: int = 64 * 1024,
        normalize: bool = True,
        commit_error: BaseException | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.bodies: list[bytes] = [normalize_line_endings(m) if normalize else bytes(m) for m in messages]
        if uids is None:
            uids = [f"mem{number:08d}" for number in range(1, len(self.bodies) + 1)]
        if len(uids) != len(self.bodies):
            raise ValueError("one uid per message")
        super().__init__(
            [
                MessageInfo(len(body), uid, has_header_end(body))
                for body, uid in zip(self.bodies, uids, strict=True)
            ]
        )
        self.chunk_size = chunk_size
        self.commit_error = commit_error
        self.expunged: dict[int, int] = {}  # number -> chunks yielded before MessageExpunged
        self.commit_calls = 0
        self.release_calls = 0
        self.read_calls: list[int] = []
        self.prefetch_calls: list[tuple[int, ...]] = []  # the numbers each read-ahead hint named
        self.prefetch_takes: int | None = None  # how many of them prefetch() says it dealt with (None: all)
        self.committed: tuple[int, ...] | None = None  # the numbers deleted by a successful commit

    def expunge(self, number: int, *, after_chunks: int = 0) -> None:
        """Make ``read(number)`` raise ``MessageExpunged``, after yielding ``after_chunks`` chunks."""
        self.expunged[number] = after_chunks

    def read(self, number: int) -> Iterator[bytes]:
        self.read_calls.append(number)
        body = self.bodies[number - 1]
        limit = self.expunged.get(number)
        for index, start in enumerate(range(0, len(body), self.chunk_size)):
            if limit is not None and index >= limit:
                raise MessageExpunged(f"message {number} was expunged")
            yield body[start : start + self.chunk_size]
        if limit is not None:
            raise MessageExpunged(f"message {number} was expunged")

    def prefetch(self, numbers) -> int:
        self.prefetch_calls.append(tuple(numbers))
        return len(numbers) if self.prefetch_takes is None else min(self.prefetch_takes, len(numbers))

    def commit(self) -> None:
        self.commit_calls += 1
        if self.commit_error is not None:
            raise self.commit_error
        self.committed = tuple(sorted(self.numbers_to_remove()))

    def release(self) -> None:
        self.release_calls += 1

    def remaining(self) -> list[bytes]:
        """The bodies a later session would see: all but those deleted by a successful commit."""
        gone = set(self.committed or ())
        return [body for number, body in enumerate(self.bodies, start=1) if number not in gone]


MaildropSource = Maildrop | Callable[[], Maildrop]


class MemoryAuthenticator:
    """An ``authenticate(username, password, *, mechanism)`` callable over ``{user: (password, maildrop)}``.

    The maildrop may be an instance (returned on every login) or a factory. ``refuse(user, exc)`` makes the
    next logins of ``user`` raise ``exc`` (e.g. ``MailboxInUse()``) whatever the password. ``calls`` records
    ``(username, mechanism)`` of every attempt; passwords are never recorded.
    """

    def __init__(self, users: Mapping[str, tuple[str, MaildropSource]] | None = None) -> None:
        self.users: dict[str, tuple[str, MaildropSource]] = dict(users or {})
        self.refusals: dict[str, LoginRefused] = {}
        self.calls: list[tuple[str, str]] = []

    def add(self, username: str, password: str, maildrop: MaildropSource) -> None:
        self.users[username] = (password, maildrop)

    def refuse(self, username: str, exc: LoginRefused) -> None:
        self.refusals[username] = exc

    def __call__(self, username: str, password: str | None, *, mechanism: str) -> Maildrop:
        self.calls.append((username, mechanism))
        if username in self.refusals:
            raise self.refusals[username]
        entry = self.users.get(username)
        if entry is None or password is None or not hmac.compare_digest(entry[0].encode(), password.encode()):
            raise AuthenticationFailed()
        source = entry[1]
        return source if isinstance(source, Maildrop) else source()
