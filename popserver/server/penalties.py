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

import heapq
import itertools
import logging
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
    until: float
    release: Callable[[], None]  # admit the connection (its listener's ``admit_request``)
    drop: Callable[[], None]  # close it unanswered
    done: bool = False


class PenaltyBox:
    """Connections of penalised addresses, waiting for their penalty to end: a heap and one thread per
    process (started at the first use). Each address may have ``per_group()`` connections waiting, the whole
    box ``capacity``; over either the oldest waiting one is closed."""

    capacity = 1024  # descriptors, not threads

    def __init__(
        self, per_group: Callable[[], int] = lambda: 16, clock: Callable[[], float] = time.monotonic
    ):
        self.per_group, self.clock = per_group, clock
        self._guard = threading.Condition()
        self._heap: list[tuple[float, int, _Held]] = []
        self._by_group: dict[str, deque[_Held]] = {}
        self._order: deque[_Held] = deque()  # oldest first, for the box's own cap
        self._count = 0
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __len__(self) -> int:
        with self._guard:
            return self._count

    def hold(self, until: float, release: Callable[[], None], drop: Callable[[], None]) -> None:
        """Keep a connection until ``until`` (monotonic), then ``release()`` it; ``drop()`` it if it must make
        room or the box closes."""
        item = _Held(until, release, drop)
        dropped: list[_Held] = []
        with self._guard:
            if self._closed:
                dropped.append(item)
            else:
                self._order.append(item)
                self._count += 1
                while self._count > self.capacity:
                    dropped.append(self._forget(self._oldest()))
                heapq.heappush(self._heap, (until, next(self._sequence), item))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True, name="pop3 penalty box")
                    self._thread.start()
                self._guard.notify()
        for held in dropped:
            _quietly(held.drop)

    def wake(self) -> None:
        """Look at the clock again now (for a test that moves a clock of its own)."""
        with self._guard:
            self._guard.notify()

    def close(self) -> None:
        """Close every waiting connection (the server stops); later ``hold`` calls close theirs at once."""
        with self._guard:
            self._closed = True
            waiting = [self._forget(item) for _, _, item in self._heap if not item.done]
            self._heap.clear()
            self._guard.notify()
        for held in waiting:
            _quietly(held.drop)

    def _oldest(self) -> _Held:
        while self._order[0].done:
            self._order.popleft()
        return self._order[0]

    def _forget(self, item: _Held) -> _Held:  # under _guard
        item.done = True
        self._count -= 1
        while self._order and self._order[0].done:
            self._order.popleft()
        return item

    def _run(self) -> None:
        while True:
            due: list[_Held] = []
            with self._guard:
                while not self._closed:
                    while self._heap and self._heap[0][2].done:
                        heapq.heappop(self._heap)
                    now = self.clock()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._guard.wait(self._heap[0][0] - now if self._heap else None)
                if self._closed:
                    return
                now = self.clock()
                while self._heap and self._heap[0][0] <= now:
                    _, _, item = heapq.heappop(self._heap)
                    if not item.done:
                        due.append(self._forget(item))
            for held in due:
                _quietly(held.release)


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - one connection's trouble never stops the box
        logger.exception("penalty box: a waiting connection could not be handled")
