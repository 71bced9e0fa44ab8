"""Penalties for addresses that abuse the time before login, and the box their connections wait in.

A client that the session cuts before login for abuse (over the pre-login command budget, Dovecot's bad
commands in a row, an endless line) has shown what it is. As Dovecot's anvil does for failed logins (its
auth penalty: 2 s, doubled to 4 and 8, at most 15 s; never for ``login_trusted_networks``), its address (an
IPv4 address, an IPv6 /64: ``peer_group``) gets a penalty: for a while, its new connections are accepted but
held, unanswered, in a ``PenaltyBox`` (descriptors waiting in one thread, no session, no thread each, no
slot), and greeted when the penalty that was in force when they arrived is over. A flooder that reconnects
at once then waits instead of spinning, and costs the server one connection per penalty instead of hundreds
per second. A well-behaved client on the same address is delayed as long, then served as usual. Trusted
networks (a webmail, a proxy) are never penalised, as their addresses carry everyone's logins.

Penalties are per process (each worker learns its own), like the caps on connections.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..conf import get_setting

logger = logging.getLogger("popserver.server")


@dataclass
class Penalty:
    offences: int  # since the address was last forgiven
    until: float  # monotonic: new connections wait until then


class Penalties:
    """Offences per peer group and the penalty each earns: ``first`` seconds for the first, doubled for each
    next one up to ``longest``; forgotten once the address has been quiet for ``longest`` after its last
    penalty ended. Thread-safe; ``clock`` and the settings are injectable for tests. At most ``capacity``
    addresses are remembered (the longest quiet go first), so a botnet cannot grow it without bound."""

    capacity = 100_000

    def __init__(
        self,
        first: float | None = None,
        longest: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._first, self._longest, self.clock = first, longest, clock
        self._guard = threading.Lock()
        self._by_group: OrderedDict[str, Penalty] = OrderedDict()  # least recently offending first

    @property
    def first(self) -> float:
        return get_setting("PRELOGIN_PENALTY") if self._first is None else self._first

    @property
    def longest(self) -> float:
        return max(
            self.first, get_setting("PRELOGIN_PENALTY_MAX") if self._longest is None else self._longest
        )

    def offence(self, group: str) -> float:
        """``group`` was cut for abuse: return the penalty (seconds) it gets now (0: penalties are off)."""
        first, longest = self.first, self.longest
        if first <= 0:
            return 0.0
        now = self.clock()
        with self._guard:
            entry = self._current(group, now, longest)
            offences = entry.offences + 1 if entry is not None else 1
            seconds = min(first * 2 ** min(offences - 1, 32), longest)
            self._by_group[group] = Penalty(offences, max(now + seconds, entry.until if entry else 0.0))
            self._by_group.move_to_end(group)
            self._prune(now, longest)
        return seconds

    def held_until(self, group: str) -> float | None:
        """While ``group`` has a penalty: the monotonic time its new connections wait until; else None."""
        now = self.clock()
        with self._guard:
            entry = self._by_group.get(group)
            if entry is None or entry.until <= now:
                return None
            return entry.until

    def __len__(self) -> int:
        with self._guard:
            return len(self._by_group)

    def _current(self, group: str, now: float, longest: float) -> Penalty | None:
        entry = self._by_group.get(group)
        if entry is not None and now >= entry.until + longest:  # quiet long enough: forgiven
            del self._by_group[group]
            return None
        return entry

    def _prune(self, now: float, longest: float) -> None:
        groups = self._by_group
        while groups:
            group, entry = next(iter(groups.items()))
            if now < entry.until + longest and len(groups) <= self.capacity:
                break
            del groups[group]


@dataclass
class _Held:
    sock: socket.socket
    until: float  # the whole penalty: for a client that talks before its greeting
    release: Callable[[], None]  # admit the connection (its listener's ``admit_request``)
    drop: Callable[[], None]  # close it unanswered
    talked: bool = False
    done: bool = False


class PenaltyBox:
    """Connections of penalised addresses, waiting unanswered: one thread per process (started at the first
    use) that polls them and keeps a heap of when each may go.

    A connection that waits for its greeting, as every mail client does (RFC 1939 s.4: the server speaks
    first), goes at its ``silent_until``, the short wait; one that talks before its greeting (Postfix's
    postscreen calls it "pregreet": a client that does not wait for its turn is a robot) waits out the whole
    penalty. One that hangs up is closed at once. At most ``capacity`` wait (descriptors, not threads: well
    within a service's usual 1,024 files); over it the oldest waiting one is closed unanswered. There is no cap
    per address: a flooder whose connection is closed reconnects at once, and would spin instead of wait."""

    capacity = 512

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._guard = threading.Lock()
        self._heap: list[tuple[float, int, _Held]] = []
        self._arrived: list[_Held] = []  # registered with the poll object by the box's own thread
        self._by_fd: dict[int, _Held] = {}
        self._order: deque[_Held] = deque()  # oldest first, for the box's cap
        self._count = self._talkers = 0
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._wake_read = self._wake_write = -1

    def __len__(self) -> int:
        with self._guard:
            return self._count

    @property
    def talkers(self) -> int:
        """How many waiting connections talked before their greeting."""
        with self._guard:
            return self._talkers

    def hold(
        self,
        sock: socket.socket,
        until: float,
        silent_until: float,
        release: Callable[[], None],
        drop: Callable[[], None],
    ) -> None:
        """Keep ``sock`` until ``silent_until`` (monotonic) if it stays silent, else until ``until``; then
        ``release()`` it. ``drop()`` it if it hangs up, must make room or the box closes."""
        item = _Held(sock, until, release, drop)
        dropped: list[_Held] = []
        with self._guard:
            if self._closed:
                dropped.append(item)
            else:
                if self._thread is None:
                    self._wake_read, self._wake_write = os.pipe()
                    os.set_blocking(self._wake_read, False)
                    os.set_blocking(self._wake_write, False)  # a full pipe already means "wake up"
                    self._thread = threading.Thread(target=self._run, daemon=True, name="pop3 penalty box")
                    self._thread.start()
                self._order.append(item)
                self._arrived.append(item)
                self._count += 1
                while self._count > self.capacity:
                    dropped.append(self._forget(self._oldest()))
                sequence = next(self._sequence)
                heapq.heappush(self._heap, (min(silent_until, until), sequence, item))
                if silent_until < until:
                    heapq.heappush(self._heap, (until, sequence, item))
        self.wake()
        for held in dropped:
            _quietly(held.drop)

    def wake(self) -> None:
        """Look at the connections and the clock again now (a new one; a test that moved its clock)."""
        with self._guard:  # the box's thread closes the pipe under it: never a write to a reused descriptor
            if self._wake_write >= 0:
                try:
                    os.write(self._wake_write, b"x")
                except OSError:
                    pass  # full (BlockingIOError): the box wakes anyway

    def close(self) -> None:
        """Close every waiting connection (the server stops); later ``hold`` calls close theirs at once."""
        with self._guard:
            self._closed = True
            waiting = [self._forget(item) for item in list(self._order) if not item.done]
            self._heap.clear()
        self.wake()
        for held in waiting:
            _quietly(held.drop)

    def _oldest(self) -> _Held:  # under _guard
        while self._order[0].done:
            self._order.popleft()
        return self._order[0]

    def _forget(self, item: _Held) -> _Held:  # under _guard
        item.done = True
        self._count -= 1
        self._talkers -= item.talked
        while self._order and self._order[0].done:
            self._order.popleft()
        return item

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        try:
            while True:
                with self._guard:
                    if self._closed:
                        return
                    self._watch_arrivals(poller)
                    due = self._due(poller)
                    timeout = self._heap[0][0] - self.clock() if self._heap else None
                for held in due:
                    _quietly(held.release)
                if due:
                    continue
                ready = poller.poll(None if timeout is None else max(timeout, 0.0) * 1000 + 1)
                self._look(poller, ready)
        finally:
            with self._guard:
                for fd in (self._wake_read, self._wake_write):
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._wake_read = self._wake_write = -1

    def _watch_arrivals(self, poller) -> None:  # under _guard
        for item in self._arrived:
            if not item.done:
                try:
                    fd = item.sock.fileno()
                    poller.register(fd, select.POLLIN)
                except (OSError, ValueError):
                    continue
                self._by_fd[fd] = item
        self._arrived.clear()
        for fd, item in list(self._by_fd.items()):
            if item.done:  # released or dropped meanwhile: no longer ours to watch
                self._unwatch(poller, fd)

    def _due(self, poller) -> list[_Held]:  # under _guard
        """Connections whose time has come: the short wait of a silent one, the whole penalty of any."""
        now = self.clock()
        due = []
        while self._heap and self._heap[0][0] <= now:
            when, _, item = heapq.heappop(self._heap)
            if item.done or (item.talked and when < item.until):
                continue
            due.append(self._forget(item))
        for item in due:
            with contextlib.suppress(OSError, ValueError):
                self._unwatch(poller, item.sock.fileno())
        return due

    def _unwatch(self, poller, fd: int) -> None:
        self._by_fd.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            poller.unregister(fd)

    def _look(self, poller, ready: list[tuple[int, int]]) -> None:
        """Data before the greeting marks a talker (watched no further); a hang-up is closed at once."""
        gone = []
        with self._guard:
            for fd, _ in ready:
                if fd == self._wake_read:
                    with contextlib.suppress(OSError):
                        os.read(fd, 4096)
                    continue
                item = self._by_fd.get(fd)
                if item is None or item.done:
                    continue
                try:
                    peeked = item.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    peeked = b""
                self._unwatch(poller, fd)
                if peeked:
                    item.talked = True
                    self._talkers += 1
                else:
                    gone.append(self._forget(item))
        for held in gone:
            _quietly(held.drop)


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - one connection's trouble never stops the box
        logger.exception("penalty box: a waiting connection could not be handled")
