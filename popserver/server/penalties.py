"""Penalties for addresses that abuse the time before login, and the box their connections wait in.

A client that the session cuts before login for abuse (over the pre-login command budget, Dovecot's bad
commands in a row, an endless line) has shown what it is, and its address (an IPv4 address, an IPv6 /64:
``peer_group``) gets a penalty. Two ideas are borrowed, from two programs:

- How long, and for how long it is remembered, is Dovecot's auth penalty (``src/auth/auth-penalty.[ch]``),
  which its auth process keeps in anvil for failed logins: 2 s, doubled to 4 and 8, at most 15 s; an
  address quiet for a while is forgiven (Dovecot 2.3 drops the count to nothing once the address has been
  quiet 15 s after its last failure, and has anvil expire its record after 29 s, ``AUTH_PENALTY_TIMEOUT``,
  not anvil's default of an hour); never for ``login_trusted_networks``.
- What the penalty does is Postfix postscreen's approach, not Dovecot's: Dovecot greets at once and delays
  the next authentication from the address; here, as postscreen holds an SMTP client before its greeting
  (``postscreen_greet_wait``) and takes one that talks first for a robot (its "pregreet" test), the
  address's new connections are accepted but held, unanswered, in a ``PenaltyBox`` (descriptors waiting in
  one thread, no session, no thread each, no slot) and greeted when their wait is over. A flooder that
  reconnects at once then waits instead of spinning, and costs the server one connection per penalty instead
  of hundreds per second. A well-behaved client on the same address is delayed by the first step, then
  served as usual. Trusted networks (a webmail, a proxy) are never penalised, as their addresses carry
  everyone's logins.

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
    next one up to ``longest`` (Dovecot's steps). The count is forgotten once the address has been quiet for
    ``longest`` after its last penalty ended: with the defaults 17-30 s after its last offence, no sooner than
    Dovecot, whose count is gone 15 s after the last failure. A flooder that pauses that long starts again at
    the first step, as in Dovecot; it then gets one connection through after 2, 4, 8 and 15 s, three more
    than if it had been remembered (remembering an hour, anvil's default, would save those three connections
    per pause at most, of 1.3 ms each). Thread-safe; ``clock`` and the settings are injectable for tests. At
    most ``capacity`` addresses are remembered (the longest quiet go first), so a botnet cannot grow it
    without bound."""

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

    def silent_until(self, until: float, *, client_speaks_first: bool) -> float:
        """When a held connection that waits for its greeting goes, for a penalty in force until ``until``:
        after the first step (it behaves as every mail client does; RFC 1939 s.4: the server speaks first).
        Where the client speaks first (implicit TLS: its ClientHello) silence tells nothing: the whole
        penalty."""
        return until if client_speaks_first else min(until, self.clock() + self.first)

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
    first), goes at its ``silent_until``, the short wait; one that talks before its greeting (postscreen's
    "pregreet": a client that does not wait for its turn is a robot) waits out the whole penalty. One that
    hangs up is closed at once. At most ``capacity`` wait (descriptors, not threads: well within a service's
    usual 1,024 files); over it a talker is closed unanswered (the one that talked first), or, when none
    talked, the oldest waiting one. There is no cap per address: a flooder whose connection is closed
    reconnects at once, and would spin instead of wait.

    Should the box's thread fail to start, or stop on an error, nothing waits on it: what it held is
    admitted at once (``release``) and so is every later connection, by the normal path and its caps."""

    capacity = 512
    failures_in_a_row = 3  # errors in consecutive rounds of the thread before it gives up (``_run``)

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._guard = threading.Lock()
        self._heap: list[tuple[float, int, _Held]] = []
        self._arrived: list[_Held] = []  # registered with the poll object by the box's own thread
        self._by_fd: dict[int, _Held] = {}
        self._order: deque[_Held] = deque()  # oldest first, for the box's cap
        self._talking: deque[_Held] = deque()  # talkers, in the order they talked: the first to go when full
        self._count = self._talkers = 0
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False  # the server stops: later connections are closed
        self._failed = False  # the thread is gone: later connections are admitted at once
        self._wake_read = self._wake_write = -1

    def __len__(self) -> int:
        with self._guard:
            return self._count

    @property
    def talkers(self) -> int:
        """How many waiting connections talked before their greeting."""
        with self._guard:
            return self._talkers

    @property
    def failed(self) -> bool:
        """The box's thread stopped on an error: connections are no longer held."""
        with self._guard:
            return self._failed

    def hold(
        self,
        sock: socket.socket,
        until: float,
        silent_until: float,
        release: Callable[[], None],
        drop: Callable[[], None],
    ) -> None:
        """Keep ``sock`` until ``silent_until`` (monotonic) if it stays silent, else until ``until``; then
        ``release()`` it. ``drop()`` it if it hangs up, must make room or the box closes. Each held
        connection gets exactly one of the two calls."""
        item = _Held(sock, until, release, drop)
        dropped: list[_Held] = []
        released: list[_Held] = []
        with self._guard:
            if self._closed:
                dropped.append(item)
            elif self._failed or (self._thread is None and not self._start()):
                released.append(item)
            else:
                self._order.append(item)
                self._arrived.append(item)
                self._count += 1
                while self._count > self.capacity:
                    dropped.append(self._forget(self._first_to_go()))
                sequence = next(self._sequence)
                heapq.heappush(self._heap, (min(silent_until, until), sequence, item))
                if silent_until < until:
                    heapq.heappush(self._heap, (until, sequence, item))
        self.wake()
        for held in dropped:
            _quietly(held.drop)
        for held in released:
            _quietly(held.release)

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
            waiting = self._forget_all()
        self.wake()
        for held in waiting:
            _quietly(held.drop)

    def _start(self) -> bool:  # under _guard
        """Start the box's thread and its wake-up pipe; False (and nothing left open) if it cannot start."""
        try:
            self._wake_read, self._wake_write = os.pipe()
            os.set_blocking(self._wake_read, False)
            os.set_blocking(self._wake_write, False)  # a full pipe already means "wake up"
            thread = threading.Thread(target=self._run, daemon=True, name="pop3 penalty box")
            thread.start()
        except (OSError, RuntimeError):  # out of descriptors or threads: admitted as if not penalised
            logger.exception("penalty box: its thread could not start; this connection is not held")
            self._close_pipe()
            return False
        self._thread = thread
        return True

    def _close_pipe(self) -> None:  # under _guard
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_read = self._wake_write = -1

    def _first_to_go(self) -> _Held:  # under _guard
        """The connection a full box closes: the first talker still waiting, else the oldest waiting."""
        while self._talking and self._talking[0].done:
            self._talking.popleft()
        if self._talking:
            return self._talking[0]
        while self._order[0].done:
            self._order.popleft()
        return self._order[0]

    def _forget(self, item: _Held) -> _Held:  # under _guard
        item.done = True
        self._count -= 1
        self._talkers -= item.talked
        for queue in (self._order, self._talking):
            while queue and queue[0].done:
                queue.popleft()
        return item

    def _forget_all(self) -> list[_Held]:  # under _guard
        waiting = [self._forget(item) for item in list(self._order) if not item.done]
        self._heap.clear()
        self._arrived.clear()
        return waiting

    def _run(self) -> None:
        """The box's thread. An error in one round is logged and the next round tries again; after
        ``failures_in_a_row`` such rounds, or any error outside them, the box gives up: what it holds is
        admitted, and so is every later connection (``hold``)."""
        waiting: list[_Held] = []
        try:
            poller = select.poll()
            poller.register(self._wake_read, select.POLLIN)
            failures = 0
            while True:
                try:
                    if not self._round(poller):
                        return
                    failures = 0
                except Exception:  # noqa: BLE001 - logged; held clients must not wait on a dead thread
                    failures += 1
                    logger.exception("penalty box: error (%d in a row)", failures)
                    if failures >= self.failures_in_a_row:
                        raise
        except Exception:  # noqa: BLE001 - logged above or here, then everything held is admitted
            logger.exception("penalty box: stopped; connections are admitted without waiting from now on")
        finally:
            with self._guard:
                if not self._closed:
                    self._failed = True
                    waiting = self._forget_all()
                self._close_pipe()
            for held in waiting:
                _quietly(held.release)

    def _round(self, poller) -> bool:
        """Release what is due, else wait for the clock, a client or a wake-up; False: the box is closed."""
        with self._guard:
            if self._closed:
                return False
            self._watch_arrivals(poller)
            now = self.clock()  # before anything is taken off the heap: an error here loses no one
            due = self._due(poller, now)
            timeout = self._heap[0][0] - now if self._heap else None
        for held in due:
            _quietly(held.release)
        if not due:
            ready = poller.poll(None if timeout is None else max(timeout, 0.0) * 1000 + 1)
            self._classify_readable(poller, ready)
        return True

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

    def _due(self, poller, now: float) -> list[_Held]:  # under _guard
        """Connections whose time has come: the short wait of a silent one, the whole penalty of any."""
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

    def _classify_readable(self, poller, ready: list[tuple[int, int]]) -> None:
        """Sort the sockets ``poll`` found readable: data before the greeting marks a talker (watched no
        further), a hang-up or an error is closed at once; the wake-up pipe is emptied."""
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
                    self._talking.append(item)
                else:
                    gone.append(self._forget(item))
        for held in gone:
            _quietly(held.drop)


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception:  # noqa: BLE001 - one connection's trouble never stops the box
        logger.exception("penalty box: a waiting connection could not be handled")
