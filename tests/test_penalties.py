"""Penalties for addresses cut for abuse before login (``popserver.server.penalties``): what earns one, how
long it lasts, the box its connections wait in, and a live server that holds a flooding address while it
serves another (and, when the penalty is over, a well-behaved client of the flooding address)."""

import os
import select
import socket
import threading

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from popserver.mailin.delivery import deliver
from popserver.server import penalties as penalties_module
from popserver.server.penalties import Penalties, PenaltyBox
from tests.proxyheaders import v1
from tests.test_overload import read_line
from tests.test_session import Client
from tests.waiting import wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.failures = 0  # how many next readings raise (-1: all of them)

    def __call__(self) -> float:
        if self.failures:
            self.failures -= self.failures > 0
            raise RuntimeError("a broken clock")
        return self.now


# What the session reports ----------------------------------------------------------------------------------
def test_the_session_says_why_it_cut_a_client_before_login():
    over_budget = Client()
    over_budget.send(b"CAPA\r\n" * 60)
    assert over_budget.session.closed
    assert over_budget.session.cut_before_login == "Too many commands before login"

    bad = Client()
    bad.send(b"X\r\nY\r\nZ\r\n")
    assert bad.session.cut_before_login == "Too many invalid commands"

    endless = Client()
    assert endless.send(b"A" * 9000) == b"-ERR Input line too long.\r\n"
    assert endless.session.cut_before_login == "Input line too long"


def test_a_client_that_behaves_or_is_logged_in_is_not_reported():
    quits = Client()
    quits.send(b"CAPA\r\nQUIT\r\n")
    assert quits.session.closed and quits.session.cut_before_login is None

    logged_in = Client()
    logged_in.login()
    logged_in.send(b"X\r\n" * 25)  # Dovecot's pop3 closes at the 21st bad command in a row
    assert logged_in.session.closed and logged_in.session.cut_before_login is None


# Penalties -------------------------------------------------------------------------------------------------
def test_penalties_double_up_to_the_longest_as_dovecots_auth_penalty():
    clock = FakeClock()
    penalties = Penalties(first=2, longest=15, clock=clock)
    assert penalties.held_until("192.0.2.1") is None
    assert [penalties.offence("192.0.2.1") for _ in range(5)] == [2, 4, 8, 15, 15]
    assert penalties.held_until("192.0.2.1") == 1015
    assert penalties.held_until("192.0.2.2") is None  # another address is not touched


def test_a_penalty_ends_and_a_quiet_address_is_forgiven():
    clock = FakeClock()
    penalties = Penalties(first=2, longest=15, clock=clock)
    penalties.offence("192.0.2.1")
    penalties.offence("192.0.2.1")  # 4 s from now
    clock.now += 4
    assert penalties.held_until("192.0.2.1") is None  # the penalty is over
    assert penalties.offence("192.0.2.1") == 8  # but remembered: the next one is longer
    clock.now += 8 + 15  # quiet for the longest penalty after its last one ended
    assert penalties.offence("192.0.2.1") == 2
    assert len(penalties) == 1


def test_penalties_forget_the_longest_quiet_when_full(monkeypatch):
    clock = FakeClock()
    penalties = Penalties(first=1, longest=1, clock=clock)
    monkeypatch.setattr(Penalties, "capacity", 3)
    for n in range(5):
        penalties.offence(f"192.0.2.{n}")
    assert len(penalties) == 3
    assert penalties.held_until("192.0.2.0") is None and penalties.held_until("192.0.2.4") == 1001


def test_a_client_that_waits_for_its_greeting_waits_the_first_step_unless_it_speaks_first():
    clock = FakeClock()
    penalties = Penalties(first=2, longest=15, clock=clock)
    assert penalties.silent_until(1008, client_speaks_first=False) == 1002
    assert penalties.silent_until(1001, client_speaks_first=False) == 1001  # never past the penalty
    assert penalties.silent_until(1008, client_speaks_first=True) == 1008  # implicit TLS: the whole penalty


def test_penalties_come_from_the_settings_and_zero_turns_them_off(settings):
    penalties = Penalties()
    settings.POPSERVER_PRELOGIN_PENALTY = 3
    settings.POPSERVER_PRELOGIN_PENALTY_MAX = 5
    assert [penalties.offence("192.0.2.1") for _ in range(3)] == [3, 5, 5]
    settings.POPSERVER_PRELOGIN_PENALTY = 0
    assert penalties.offence("192.0.2.2") == 0
    assert penalties.held_until("192.0.2.2") is None


# The box ---------------------------------------------------------------------------------------------------
@pytest.fixture
def box():
    box = PenaltyBox(clock=FakeClock())
    yield box
    box.close()


def waiting(box, until: float, silent_until: float):
    """A connection held in ``box``: (the client's socket, released event, dropped event)."""
    ours, theirs = socket.socketpair()
    released, dropped = threading.Event(), threading.Event()
    box.hold(ours, until, silent_until, released.set, lambda: (ours.close(), dropped.set()))
    return theirs, released, dropped


def test_a_client_that_waits_for_its_greeting_goes_after_the_short_wait_one_that_talks_first_waits_it_all(
    box,
):
    talker, talker_released, _ = waiting(box, until=1008, silent_until=1002)
    silent, silent_released, _ = waiting(box, until=1008, silent_until=1002)
    talker.sendall(b"CAPA\r\n")  # before any greeting: a robot's pipelining (postscreen's "pregreet")
    wait_for(lambda: box.talkers == 1)
    box.clock.now = 1002
    box.wake()
    assert silent_released.wait(10)
    # Both were due at 1002 and looked at together: the talker stays.
    assert not talker_released.is_set() and len(box) == 1
    box.clock.now = 1008
    box.wake()
    assert talker_released.wait(10)
    wait_for(lambda: len(box) == 0)
    talker.close(), silent.close()


def test_a_client_that_hangs_up_is_closed_at_once(box):
    client, released, dropped = waiting(box, until=1015, silent_until=1002)
    client.close()
    assert dropped.wait(10)
    wait_for(lambda: len(box) == 0)
    assert not released.is_set()


def test_a_full_box_closes_a_talker_first_then_its_oldest_and_closing_it_closes_the_rest(monkeypatch, box):
    monkeypatch.setattr(PenaltyBox, "capacity", 2)
    silent = waiting(box, until=2000, silent_until=2000)  # the oldest, waiting for its greeting as it should
    talker = waiting(box, until=2000, silent_until=2000)
    talker[0].sendall(b"CAPA\r\n")
    wait_for(lambda: box.talkers == 1)
    newcomer = waiting(box, until=2000, silent_until=2000)
    assert talker[2].is_set() and not silent[2].is_set() and not newcomer[2].is_set()
    assert len(box) == 2 and box.talkers == 0
    last = waiting(box, until=2000, silent_until=2000)  # no talker left: the oldest goes
    assert silent[2].is_set() and not newcomer[2].is_set() and len(box) == 2
    box.close()
    held = [silent, talker, newcomer, last]
    assert all(dropped.is_set() and not released.is_set() for _, released, dropped in held)
    assert len(box) == 0
    late = waiting(box, until=2000, silent_until=2000)  # closed: dropped at once
    assert late[2].is_set()
    for client, _, _ in [*held, late]:
        client.close()


def open_pipes() -> set[str]:
    """The process's open pipes, by inode (other tests' threads may open or close sockets, connections and
    their own pipes meanwhile: a test looks for pipes of its own left open, never at the count)."""
    pipes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("pipe:"):
            pipes.add(target)
    return pipes


def test_a_box_whose_thread_cannot_start_admits_at_once_and_leaks_nothing(monkeypatch, box):
    class NoThread(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(penalties_module.threading, "Thread", NoThread)
    before = open_pipes()
    client, released, dropped = waiting(box, until=1015, silent_until=1002)
    assert released.is_set() and not dropped.is_set() and len(box) == 0
    assert not open_pipes() - before  # no pipe of the box's left open
    monkeypatch.undo()
    later, later_released, _ = waiting(box, until=1015, silent_until=1002)  # a thread starts now: held
    assert not later_released.is_set() and len(box) == 1
    client.close(), later.close()


def test_an_error_in_the_box_is_logged_and_the_box_goes_on(box, caplog):
    client, released, _ = waiting(box, until=1015, silent_until=1002)
    box.clock.failures = 1
    box.wake()
    wait_for(lambda: box.clock.failures == 0)  # the box's thread read the clock and got the error
    wait_for(lambda: "penalty box: error (1 in a row)" in caplog.text)
    assert not released.is_set() and len(box) == 1 and not box.failed
    box.clock.now = 1002
    box.wake()
    assert released.wait(10)
    client.close()


def test_a_box_that_keeps_failing_admits_what_it_held_and_what_comes_later(box):
    client, released, dropped = waiting(box, until=1015, silent_until=1002)
    box.clock.failures = -1
    box.wake()
    assert released.wait(10)  # admitted by the normal path, not left waiting on a dead thread
    assert box.failed and len(box) == 0 and not dropped.is_set()
    later, later_released, _ = waiting(box, until=1015, silent_until=1002)
    assert later_released.is_set()  # at once
    client.close(), later.close()


# Checks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values, ids",
    [
        ({"POPSERVER_PRELOGIN_PENALTY": -1}, ["popserver.E007"]),
        ({"POPSERVER_PRELOGIN_PENALTY_MAX": "15"}, ["popserver.E007"]),
        ({"POPSERVER_PRELOGIN_PENALTY": 10, "POPSERVER_PRELOGIN_PENALTY_MAX": 5}, ["popserver.E060"]),
        ({"POPSERVER_PRELOGIN_PENALTY": 0, "POPSERVER_PRELOGIN_PENALTY_MAX": 0}, []),
        ({"POPSERVER_PRELOGIN_PENALTY_MAX": 120}, ["popserver.W060"]),
    ],
)
def test_penalty_settings_are_checked(values, ids):
    with override_settings(**values):
        found = [m.id for m in run_checks() if "PRELOGIN_PENALTY" in m.msg]
    assert found == ids


# A live server ---------------------------------------------------------------------------------------------
def connect_from(server, source: str) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect((server.host, server.port))
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server says until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def flood(server, source: str) -> bytes:
    """Pipeline CAPA until the server cuts the connection; everything it said."""
    with connect_from(server, source) as sock:
        sock.sendall(b"CAPA\r\n" * 60)
        return read_until_closed(sock)


def nothing_yet(sock: socket.socket) -> bool:
    """The server has said nothing on ``sock`` so far (and not closed it): not readable, without waiting."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


def logs_in(sock: socket.socket) -> bool:
    sock.sendall(b"USER alice\r\nPASS secret\r\n")
    return read_line(sock) == b"+OK\r\n" and read_line(sock) == b"+OK Logged in.\r\n"


@pytest.fixture
def remote_server(pop3_server_factory, make_mailbox, settings):
    """A live server to which 127.0.0.2 and 127.0.0.3 are remote peers (127.0.0.1 is trusted), with a
    clock of the test's own for its penalties."""
    settings.POPSERVER_PLAINTEXT_AUTH = "always"  # remote peers log in without TLS here
    make_mailbox("alice", "secret")
    deliver("alice", b"Subject: one\r\n\r\nhello\r\n")
    server = pop3_server_factory(is_trusted=lambda ip: ip == "127.0.0.1")
    clock = FakeClock()
    registry = server.server.registry
    registry.penalties = Penalties(first=2, longest=15, clock=clock)
    registry.penalty_box = PenaltyBox(clock=clock)
    return server, clock


@pytest.mark.live
def test_a_flooding_address_waits_while_another_logs_in(remote_server):
    server, clock = remote_server
    registry = server.server.registry
    assert flood(server, "127.0.0.2").endswith(b"-ERR Too many commands before login.\r\n")
    assert registry.penalties.held_until("127.0.0.2") == 1002

    held = connect_from(server, "127.0.0.2")  # accepted, but held unanswered: no thread, no slot
    wait_for(lambda: len(registry.penalty_box) == 1)
    with connect_from(server, "127.0.0.3") as other:
        assert read_line(other).startswith(b"+OK")
        assert logs_in(other)
    assert len(registry.penalty_box) == 1  # the clock has not moved: still held
    assert nothing_yet(held)

    clock.now = 1002
    registry.penalty_box.wake()
    with held:  # its penalty is over: greeted, and a client that behaves logs in
        assert read_line(held).startswith(b"+OK")
        assert logs_in(held)
    assert registry.penalties.held_until("127.0.0.3") is None


@pytest.mark.live
def test_a_trusted_address_is_never_penalised(remote_server):
    server, _ = remote_server
    assert flood(server, "127.0.0.1").endswith(b"-ERR Too many commands before login.\r\n")
    with connect_from(server, "127.0.0.1") as sock:
        assert read_line(sock).startswith(b"+OK")  # greeted at once, not held
    assert server.server.registry.penalties.held_until("127.0.0.1") is None
    assert len(server.server.registry.penalty_box) == 0


@pytest.mark.live
def test_the_penalty_box_closes_its_connections_when_the_server_stops(remote_server):
    server, _ = remote_server
    flood(server, "127.0.0.2")
    held = connect_from(server, "127.0.0.2")
    wait_for(lambda: len(server.server.registry.penalty_box) == 1)
    server.stop()
    assert held.recv(100) == b""  # closed unanswered
    held.close()


@pytest.fixture
def proxied_server(settings, pop3_server_factory):
    """A live server behind a PROXY-protocol proxy on 127.0.0.1, with a clock of the test's own."""
    settings.POPSERVER_PROXY_TRUSTED_NETWORKS = ["127.0.0.1/32"]
    server = pop3_server_factory(proxy_protocol=True)
    clock = FakeClock()
    registry = server.server.registry
    registry.penalties = Penalties(first=2, longest=15, clock=clock)
    registry.penalty_box = PenaltyBox(clock=clock)
    return server, clock


def flood_through_proxy(server, client: tuple[str, int]) -> bytes:
    with server.socket() as sock:
        sock.sendall(v1(client) + b"CAPA\r\n" * 60)
        return read_until_closed(sock)


@pytest.mark.live
def test_behind_a_proxy_the_client_in_the_header_is_penalised_not_the_proxy(proxied_server):
    server, clock = proxied_server
    registry = server.server.registry
    assert flood_through_proxy(server, ("192.0.2.10", 50000)).endswith(
        b"-ERR Too many commands before login.\r\n"
    )
    assert registry.penalties.held_until("192.0.2.10") == 1002
    assert registry.penalties.held_until("127.0.0.1") is None
    with server.socket() as other:  # another client of the same proxy
        other.sendall(v1(("192.0.2.20", 50000)))
        assert read_line(other).startswith(b"+OK")
    with server.socket() as again:  # the penalised client waits in its thread, watched by the box
        again.sendall(v1(("192.0.2.10", 50001)))
        wait_for(lambda: len(registry.penalty_box) == 1)
        assert nothing_yet(again)  # the clock has not moved: not greeted
        clock.now = 1002
        registry.penalty_box.wake()
        assert read_line(again).startswith(b"+OK")  # the first step is over: served
        assert len(registry.penalty_box) == 0


@pytest.mark.live
def test_behind_a_proxy_a_penalised_client_that_hangs_up_frees_its_thread_at_once(proxied_server):
    server, _ = proxied_server
    registry = server.server.registry
    flood_through_proxy(server, ("192.0.2.10", 50000))
    sock = server.socket()
    sock.sendall(v1(("192.0.2.10", 50001)))
    wait_for(lambda: len(registry.penalty_box) == 1)
    sock.close()  # the clock never moves: only the hang-up can end its wait
    wait_for(lambda: len(registry) == 0 and len(registry.penalty_box) == 0)
