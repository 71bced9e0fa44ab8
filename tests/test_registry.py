"""The live-session registry's room-making rules, on real (paired) sockets without a server."""

import socket

import pytest
from django.test import override_settings

from popserver.server.listener import SessionRegistry


@pytest.fixture
def sockets():
    pairs = []

    def make():
        ours, theirs = socket.socketpair()
        pairs.append((ours, theirs))
        return ours

    yield make
    for pair in pairs:
        for sock in pair:
            sock.close()


def was_cut(sock: socket.socket) -> bool:
    """After shutdown(SHUT_RDWR) a send fails; a live socket's does not."""
    try:
        sock.send(b"x")
    except OSError:
        return True
    return False


@override_settings(POPSERVER_MAX_UNAUTHENTICATED_PER_IP=2)
def test_a_connection_whose_password_is_being_checked_is_never_dropped(sockets):
    registry = SessionRegistry()
    a, b, c, d = (sockets() for _ in range(4))
    assert registry.admit(a, "203.0.113.5") and registry.admit(b, "203.0.113.5")
    assert registry.begin_login(a)
    assert registry.admit(c, "203.0.113.5")  # room made by dropping b, the oldest idle one
    assert was_cut(b) and not was_cut(a)
    assert registry.admit(d, "203.0.113.5")  # a (logging in) and c (idle) are at the cap: c goes
    assert was_cut(c) and not was_cut(a)
    assert not registry.begin_login(c)  # a dropped connection may not start a login
    registry.end_login(a, logged_in=True)
    assert registry.admit(sockets(), "203.0.113.5")  # a is logged in: it no longer counts for the IP


@override_settings(POPSERVER_MAX_UNAUTHENTICATED_PER_IP=2)
def test_an_ip_whose_connections_are_all_logging_in_gets_no_more(sockets):
    registry = SessionRegistry()
    a, b = sockets(), sockets()
    for sock in (a, b):
        assert registry.admit(sock, "203.0.113.5") and registry.begin_login(sock)
    assert not registry.admit(sockets(), "203.0.113.5")
    assert registry.admit(sockets(), "198.51.100.7")  # another IP is not affected
    registry.end_login(a, logged_in=False)  # a failed login: idle again, and droppable
    assert registry.admit(sockets(), "203.0.113.5") and was_cut(a)


@override_settings(POPSERVER_MAX_UNAUTHENTICATED_PER_IP=2)
def test_trusted_peers_have_no_per_ip_cap(sockets):
    registry = SessionRegistry()
    opened = [sockets() for _ in range(5)]
    assert all(registry.admit(sock, "127.0.0.1", trusted=True) for sock in opened)
    assert not any(was_cut(sock) for sock in opened)


@override_settings(POPSERVER_MAX_SESSIONS=2)
def test_a_dropped_connection_frees_its_slot_but_is_tracked_until_its_thread_ends(sockets):
    registry = SessionRegistry()
    a, b, c = sockets(), sockets(), sockets()
    assert registry.admit(a, "203.0.113.5") and registry.admit(b, "198.51.100.7")
    assert registry.begin_login(b) and registry.end_login(b, logged_in=True) is None
    assert registry.admit(c, "192.0.2.1")  # full: a, the only idle one, is dropped
    assert was_cut(a) and len(registry) == 3  # a's thread has not ended yet
    assert registry.begin_login(c) and registry.end_login(c, logged_in=True) is None
    assert not registry.admit(sockets(), "192.0.2.2")  # b and c are logged in: no room
    registry.remove(a)
    assert len(registry) == 2


@override_settings(POPSERVER_MAX_SESSIONS=1)
def test_a_finished_session_frees_its_slot_before_its_thread_ends(sockets):
    registry = SessionRegistry()
    a = sockets()
    assert registry.admit(a, "203.0.113.5") and registry.begin_login(a)
    registry.end_login(a, logged_in=True)
    assert not registry.admit(sockets(), "198.51.100.7")  # full of logged-in sessions
    registry.release_slot(a)  # QUIT done; the thread still writes its session record
    assert registry.admit(sockets(), "198.51.100.7")
    assert not registry.wait_empty(0)  # a shutdown still waits for a's thread
    registry.remove(a)


def test_a_connection_dropped_while_being_wrapped_in_tls_is_told(sockets):
    registry = SessionRegistry()
    a, wrapped = sockets(), sockets()
    with override_settings(POPSERVER_MAX_SESSIONS=1):
        assert registry.admit(a, "203.0.113.5") and registry.admit(sockets(), "198.51.100.7")
    assert not registry.rewrap(a, wrapped)  # the handler then ends the session itself


@override_settings(POPSERVER_MAX_UNAUTHENTICATED_PER_IP=1)
def test_a_failed_login_waits_its_delay_as_a_droppable_connection(sockets):
    registry = SessionRegistry()
    a = sockets()
    assert registry.admit(a, "203.0.113.5") and registry.begin_login(a)
    registry.end_login(a, logged_in=False)  # the authenticator's hook, before the delay
    registry.end_login(a, logged_in=False)  # and the handler's, after it: harmless
    assert registry.admit(sockets(), "203.0.113.5") and was_cut(a)
