"""The listener: a threaded ``socketserver`` like Django's ``ThreadedWSGIServer``, with a live-session registry.

``serve_forever()`` runs in one thread; ``stop()`` is called from another (stdlib: ``shutdown()`` deadlocks if
called from the serving thread, so signal handlers only set an event: see ``runpop3``). ``ThreadedServer`` is
the protocol-neutral part (TCP or a UNIX socket, admission, a thread per connection); ``Pop3Server`` and
``popserver.server.lmtp.LmtpServer`` name their handler and their few differences.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import socketserver
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial

from django.db import OperationalError

from ..conf import get_setting, node_name, worker_share
from ..exceptions import ServerBusy
from ..logins.peers import is_trusted_peer, is_trusted_proxy, peer_group
from ..overload import database_unavailable, refused, summary
from ..storage.gate import ConnectionGate, release_connection
from ..storage.lock import refresh_heartbeats, release_all_live_locks, release_dead_locks
from . import metrics
from .handler import Pop3Handler
from .penalties import Penalties, PenaltyBox
from .threads import SessionThreads
from .tls import TlsContextHolder

logger = logging.getLogger("popserver.server")

# Session threads that wait for the next connection at once (server/threads.py): enough for a busy process's
# usual concurrency; a burst beyond it starts threads that end with their session.
KEEP_SESSION_THREADS = 16


def parse_address(text: str, default_port: int = 8110) -> tuple[str, int]:
    """``ADDR:PORT``, ``PORT``, ``ADDR``, ``[IPv6]:PORT`` or ``[IPv6]`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif text.isdigit():
        host, port = "127.0.0.1", text
    elif ":" in text:  # a bare IPv6 address
        host, port = text, str(default_port)
    else:
        host, port = text, str(default_port)
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{port!r} is not a port number")
    return host or "127.0.0.1", int(port)


class SessionRegistry:
    """Live connections of one server process (all its listeners), keyed by the accepted socket: the session
    cap and the cap on unauthenticated connections per IP (IPv6: per /64), this process's share of the
    server's (``worker_share``: each of N workers gets 1/N).

    A connection is idle before login (it may be dropped to make room), logging in (a password check is
    running: never dropped) or logged in. A dropped or finished connection gives its slot back at once but is
    tracked until its thread ends (``remove``), so a shutdown waits for its bookkeeping."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        # accepted socket -> the socket to cut it with (the TLS wrapper once there is one)
        self._sockets: dict[socket.socket, socket.socket] = {}
        # idle before login, oldest first: overall, and per peer group
        self._unauthenticated: OrderedDict[socket.socket, str] = OrderedDict()
        self._unauthenticated_by_group: dict[str, OrderedDict[socket.socket, None]] = {}
        self._logging_in: dict[socket.socket, str] = {}
        self._dropped: set[socket.socket] = set()  # cut to make room; their threads are ending
        self._slot_free: set[socket.socket] = set()  # dropped or finished, thread still running
        self._emptied = threading.Condition(self._guard)
        # Readable once the server stops: sessions waiting for their client wake up, say why, and end.
        self._stop_read, self._stop_write = os.pipe()
        # With workers: one flag per worker in memory they share, 1 while that worker has a free slot.
        self._room_flags = None
        self._room_index = 0
        self._room_changed = threading.Condition(self._guard)
        # Addresses cut for abuse before login, and their connections waiting out the penalty (penalties.py)
        self.penalties = Penalties()
        self.penalty_box = PenaltyBox()
        self.threads = SessionThreads(keep=KEEP_SESSION_THREADS)  # the session threads, reused

    @property
    def stop_fd(self) -> int:
        return self._stop_read

    def announce_stop(self) -> None:
        try:
            os.write(self._stop_write, b"x")
        except OSError:
            pass

    def close(self) -> None:
        for fd in (self._stop_read, self._stop_write):
            try:
                os.close(fd)
            except OSError:
                pass

    def share_room(self, flags, index: int) -> None:
        """Publish this worker's free slots in ``flags[index]`` (shared memory) and read the others': a full
        worker leaves new connections to one with room instead of refusing them."""
        self._room_flags, self._room_index = flags, index
        with self._guard:
            self._publish_room()

    def _has_room(self) -> bool:
        return len(self._sockets) - len(self._slot_free) < worker_share("MAX_SESSIONS")

    def _publish_room(self) -> None:  # under _guard
        if self._room_flags is not None:
            self._room_flags[self._room_index] = 1 if self._has_room() else 0
        self._room_changed.notify_all()

    def defer_accept(self, wait: float = 0.01) -> bool:
        """True if this worker is full while another has room: it waits a moment (for a slot of its own or
        for the other to take the connection) and does not accept now."""
        flags = self._room_flags
        if flags is None:
            return False
        with self._guard:
            if self._has_room():
                return False
            if not any(flag for i, flag in enumerate(flags) if i != self._room_index):
                return False  # every worker is full: accept, to make room or refuse with a reply
            self._room_changed.wait(wait)
            return True

    def __len__(self) -> int:
        with self._guard:
            return len(self._sockets)

    def admit(
        self, sock: socket.socket, peer_ip: str, *, trusted: bool = False, droppable: bool = True
    ) -> bool:
        """Register a new connection, or return False if there is no room for it.

        As Dovecot does, an idle unauthenticated connection makes room (that IP's own oldest when the IP is
        at its cap, else the oldest of all when the server is full), so half-open sockets cannot lock an IP,
        an office NAT or the whole server out. Trusted networks have no per-IP cap: a webmail or a proxy on
        the same host brings every user's logins from one address. A connection admitted with ``droppable``
        false (LMTP: the MTA, mid-delivery) is never dropped to make room; it counts as logged in."""
        group = peer_group(peer_ip)
        evicted = None
        with self._guard:
            if not trusted and self._group_is_full(group):
                evicted = self._oldest_idle(group)
                if evicted is None:
                    metrics.connection_refused("per_ip")
                    return False
            elif len(self._sockets) - len(self._slot_free) >= worker_share("MAX_SESSIONS"):
                if not self._unauthenticated:
                    metrics.connection_refused("full")
                    return False
                evicted = next(iter(self._unauthenticated))
            if evicted is not None:
                self._forget_unauthenticated(evicted)
                self._dropped.add(evicted)
                self._slot_free.add(evicted)
                cut = self._sockets[evicted]
            self._sockets[sock] = sock
            if droppable:
                self._unauthenticated[sock] = group
                self._unauthenticated_by_group.setdefault(group, OrderedDict())[sock] = None
            self._publish_room()
        if evicted is not None:
            _making_room()
            metrics.connection_dropped()
            disconnect(cut)
        return True

    def readdress(self, sock: socket.socket, peer_ip: str, *, trusted: bool = False) -> bool:
        """The connection's real client is ``peer_ip`` (a PROXY header said so): count it under that IP from
        now on, with that IP's cap (making room as ``admit`` does). False if there is no room, or if the
        connection was dropped meanwhile."""
        group = peer_group(peer_ip)
        evicted = None
        with self._guard:
            if sock in self._dropped or sock not in self._sockets:
                return False
            self._forget_unauthenticated(sock)
            if not trusted and self._group_is_full(group):
                evicted = self._oldest_idle(group)
                if evicted is None:
                    self._slot_free.add(sock)  # refused: its slot is free, its thread ends at once
                    metrics.connection_refused("per_ip")
                    return False
                self._forget_unauthenticated(evicted)
                self._dropped.add(evicted)
                self._slot_free.add(evicted)
                cut = self._sockets[evicted]
            self._unauthenticated[sock] = group
            self._unauthenticated_by_group.setdefault(group, OrderedDict())[sock] = None
        if evicted is not None:
            _making_room()
            metrics.connection_dropped()
            disconnect(cut)
        return True

    def _group_is_full(self, group: str) -> bool:
        waiting = self._unauthenticated_by_group.get(group, {})
        logging_in = sum(1 for g in self._logging_in.values() if g == group)
        return len(waiting) + logging_in >= worker_share("MAX_UNAUTHENTICATED_PER_IP")

    def _oldest_idle(self, group: str) -> socket.socket | None:
        return next(iter(self._unauthenticated_by_group.get(group, {})), None)

    def _forget_unauthenticated(self, sock: socket.socket) -> None:
        group = self._unauthenticated.pop(sock, None)
        if group is not None:
            waiting = self._unauthenticated_by_group.get(group)
            if waiting is not None:
                waiting.pop(sock, None)
                if not waiting:
                    del self._unauthenticated_by_group[group]

    def rewrap(self, sock: socket.socket, wrapped: socket.socket) -> bool:
        """The connection accepted as ``sock`` now speaks through ``wrapped`` (TLS). False if it was dropped
        meanwhile (a cut of the socket being wrapped may have missed)."""
        with self._guard:
            if sock in self._dropped or sock not in self._sockets:
                return False
            self._sockets[sock] = wrapped
            return True

    def begin_login(self, sock: socket.socket) -> bool:
        """A password check starts: from now on the connection is not dropped. False if it already was."""
        with self._guard:
            if sock in self._dropped or sock not in self._sockets:
                return False
            group = self._unauthenticated.get(sock)
            if group is not None:
                self._forget_unauthenticated(sock)
                self._logging_in[sock] = group
            return True

    def end_login(self, sock: socket.socket, *, logged_in: bool) -> None:
        """The check is over: logged in, or idle again (and then the newest idle connection)."""
        with self._guard:
            group = self._logging_in.pop(sock, None)
            if group is not None and not logged_in and sock in self._sockets:
                self._unauthenticated[sock] = group
                self._unauthenticated_by_group.setdefault(group, OrderedDict())[sock] = None

    def release_slot(self, sock: socket.socket) -> None:
        """The session is over (its thread still has bookkeeping to do): its slot may serve a new client."""
        with self._guard:
            if sock in self._sockets:
                self._forget_unauthenticated(sock)
                self._logging_in.pop(sock, None)
                self._slot_free.add(sock)
                self._publish_room()

    def remove(self, sock: socket.socket) -> None:
        """The connection's thread has ended."""
        with self._guard:
            self._sockets.pop(sock, None)
            self._forget_unauthenticated(sock)
            self._logging_in.pop(sock, None)
            self._dropped.discard(sock)
            self._slot_free.discard(sock)
            self._publish_room()
            self._emptied.notify_all()

    def disconnect_all(self) -> None:
        with self._guard:
            sockets = list(self._sockets.values())
        for sock in sockets:
            disconnect(sock)

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._guard:
            while self._sockets:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._emptied.wait(remaining)
            return True


def _making_room() -> None:
    refused(
        "making-room",
        "full: dropping the oldest idle unauthenticated connection to make room for a new one",
        level=logging.INFO,
    )


def disconnect(sock: socket.socket) -> None:
    """Cut a connection from another thread; its handler's recv() or send() then fails and it ends.

    At the socket's level even for TLS: ``SSLSocket.shutdown`` also drops the TLS object, under the feet of
    the thread that may be in its handshake (which then failed with an AttributeError and a traceback)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


LOCAL_PEER = "local"  # the peer "address" of a connection on a UNIX socket (Dovecot logs it so too)


class ThreadedServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threaded listener on TCP or, for an ``address`` that is a path, a UNIX socket. Each connection runs
    ``handler_class`` in a daemon thread; subclasses name it and their protocol's few differences."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    handler_class: type[socketserver.BaseRequestHandler]
    protocol = "pop3"  # in thread names
    busy_reply = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"  # when there is no room
    droppable = True  # an idle connection may be dropped to make room (see SessionRegistry.admit)
    holds_mailbox_locks = True  # its sessions take mailbox locks (released by stop_servers)

    def __init__(
        self,
        address: tuple[str, int] | str,
        *,
        stop_event: threading.Event | None = None,
        tls: TlsContextHolder | None = None,
        implicit_tls: bool = False,
        is_trusted: Callable[[str], bool] = is_trusted_peer,
        registry: SessionRegistry | None = None,
        socket_mode: int | None = None,
        proxy_protocol: bool = False,
        is_trusted_proxy: Callable[[str], bool] = is_trusted_proxy,
        gate: ConnectionGate | None = None,
        sock: socket.socket | None = None,
    ):
        """``registry`` is shared by all listeners of a process (its limits are per process). ``tls`` enables
        STLS (or, with ``implicit_tls``, TLS from the first byte: RFC 8314); ``is_trusted(peer_ip)`` decides
        which peers count as local for the plaintext policy (tests inject it to play a remote peer while
        binding to 127.0.0.1 only). ``socket_mode``: the permissions of a UNIX socket (e.g. ``0o660``). With
        ``proxy_protocol`` every connection must come from a proxy (``is_trusted_proxy``) and start with a
        PROXY header (``proxy_protocol.py``). ``gate``: the process's budget of database connections (shared
        by its listeners). ``sock``: a listening socket bound by someone else (the parent of ``runpop3
        --workers``), shared with other processes."""
        if implicit_tls and tls is None:
            raise ValueError("implicit TLS needs a certificate")
        self.tls, self.implicit_tls, self.is_trusted = tls, implicit_tls, is_trusted
        self.proxy_protocol, self.is_trusted_proxy = proxy_protocol, is_trusted_proxy
        self.socket_mode = socket_mode
        if isinstance(address, str):
            self.address_family = socket.AF_UNIX
        else:
            host, port = address
            self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            address = (host, port)
        self.request_queue_size = get_setting("LISTEN_BACKLOG")
        self.stop_event = stop_event or threading.Event()
        # "is None", not "or": an empty registry is falsy (len 0), and listeners must share theirs
        self.registry = registry if registry is not None else SessionRegistry()
        self.gate = gate if gate is not None else ConnectionGate()
        super().__init__(address, self.handler_class, bind_and_activate=sock is None)
        if sock is not None:
            self.socket.close()
            self.socket = sock
            # Workers share the listening socket: a worker that lost the race for a connection must get
            # EAGAIN from accept(), not block in it (where it would not see a shutdown).
            sock.setblocking(False)
            self.server_address = sock.getsockname()

    @property
    def is_unix(self) -> bool:
        return self.address_family == socket.AF_UNIX

    @property
    def port(self) -> int:
        return self.server_address[1]

    def get_request(self):
        """Accept, unless this worker is full while another has room (then the other accepts it)."""
        if self.registry.defer_accept():
            raise BlockingIOError()  # socketserver skips this round
        return super().get_request()

    @property
    def display_address(self) -> str:
        if self.is_unix:
            return f"unix:{self.server_address}"
        host, port = self.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def peer_address(self, client_address) -> tuple[str, int]:
        """(IP, port) of a client; ``("local", 0)`` on a UNIX socket, whose clients have no address."""
        if self.is_unix:
            return LOCAL_PEER, 0
        return client_address[0], client_address[1]

    def server_bind(self) -> None:
        if not self.is_unix:
            super().server_bind()
            return
        self._socket_inode = bind_unix_socket(self.socket, self.server_address, self.socket_mode)

    def server_close(self) -> None:
        super().server_close()
        if self.is_unix:  # a socket bound by a parent (``sock``) is the parent's to remove
            remove_unix_socket(self.server_address, getattr(self, "_socket_inode", None))

    def process_request(self, request, client_address) -> None:
        """Accept loop: admit or refuse at once (no blocking work here), then a thread per connection."""
        peer_ip, peer_port = self.peer_address(client_address)
        if self.proxy_protocol:
            if not self.is_trusted_proxy(peer_ip):
                logger.info(
                    "refusing %s: not in POPSERVER_PROXY_TRUSTED_NETWORKS (PROXY protocol listener)", peer_ip
                )
                metrics.connection_refused("untrusted_proxy")
                self.shutdown_request(request)
                return
            # Not capped per IP until its header names the client (SessionRegistry.readdress).
            trusted = True
        else:
            trusted = self.is_trusted(peer_ip)
        if not trusted and (until := self.registry.penalties.held_until(peer_group(peer_ip))) is not None:
            self.hold(request, client_address, peer_ip, until)
            return
        self.admit_request(request, client_address, trusted=trusted)

    def hold(self, request, client_address, peer_ip: str, until: float) -> None:
        """A penalised address: the connection waits unanswered in the penalty box (no thread, no slot), the
        first step of the penalty if it waits for its greeting, the penalty in force now if it talks first;
        then it is admitted as any other."""
        refused(
            "penalty",
            f"holding connections of addresses cut for abuse before login (e.g. {peer_ip}) until their "
            "penalty is over",
            level=logging.INFO,
        )
        self.registry.penalty_box.hold(
            request,
            until,
            self.registry.penalties.silent_until(until, client_speaks_first=self.implicit_tls),
            release=lambda: self.admit_request(request, client_address, trusted=False),
            drop=lambda: self.shutdown_request(request),
        )

    def admit_request(self, request, client_address, *, trusted: bool) -> None:
        """Admit or refuse at once (no blocking work), then a thread for the connection."""
        peer_ip, peer_port = self.peer_address(client_address)
        if self.stop_event.is_set():
            self.shutdown_request(request)
            return
        if not self.registry.admit(request, peer_ip, trusted=trusted, droppable=self.droppable):
            refused(
                "no-room", f"refusing connections: no room ({len(self.registry)} connections in this process)"
            )
            if not self.implicit_tls:  # a TLS client could not read a plaintext line anyway
                self.refuse(request, self.busy_reply)
            self.shutdown_request(request)
            return
        try:
            self.registry.threads.start(
                partial(self.process_request_thread, request, client_address),
                name=f"{self.protocol} {peer_ip}:{peer_port}",
            )
        except RuntimeError:  # no thread could be started: give the slot back
            logger.exception("could not start a session thread for %s", peer_ip)
            metrics.connection_refused("no_thread")
            self.registry.remove(request)
            self.shutdown_request(request)
            return
        metrics.connection_accepted()

    @staticmethod
    def refuse(request: socket.socket, line: bytes) -> None:
        """One line to a connection being turned away, without waiting for a client that does not read."""
        try:
            request.setblocking(False)
            request.send(line)
        except OSError:
            pass

    def process_request_thread(self, request, client_address) -> None:
        # Every session's database connections (POP3 and LMTP) count against the process's budget.
        with self.gate.budgeted():
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - the connection's last resort: logged, never kills the server
                self.handle_error(request, client_address)
            finally:
                self.registry.remove(request)
                self.shutdown_request(request)
                release_connection()

    def handle_error(self, request, client_address) -> None:
        logger.exception("unexpected error in the session of %s", client_address)

    # Lifecycle ------------------------------------------------------------------------------------------
    def stop(self, grace: float | None = None) -> None:
        """Stop this listener and its process's sessions (see ``stop_servers``)."""
        stop_servers([self], grace)


class Pop3Server(ThreadedServer):
    """A threaded POP3 listener."""

    handler_class = Pop3Handler


def remove_stale_socket(path: str) -> None:
    """Remove a UNIX socket left by a server that died; refuse (EADDRINUSE) if one still answers there, and
    never remove anything that is not a socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: a stale socket
    else:
        raise OSError(errno.EADDRINUSE, f"a server is listening on {path}")
    finally:
        probe.close()


# How long sessions get at a stop to hear "-ERR [SYS/TEMP] Server shutting down." and end on their own before
# the rest are cut (a session in the middle of a large RETR to a slow client would never end by itself).
SHUTDOWN_NOTICE_WAIT = 1.0


def stop_servers(servers: list[ThreadedServer], grace: float | None = None) -> None:
    """Stop accepting on every listener, end open sessions without UPDATE (each is told first, when it is
    waiting for its client), wait for them once, then release any lock still held. Call from a thread other
    than the ones in ``serve_forever()``."""
    for server in servers:
        server.stop_event.set()
    for server in servers:
        server.shutdown()
        server.server_close()
    registries = {id(server.registry): server.registry for server in servers}.values()
    for registry in registries:
        registry.penalty_box.close()
        registry.threads.close()
        registry.announce_stop()
    grace = get_setting("SHUTDOWN_GRACE") if grace is None else grace
    started = time.monotonic()
    for registry in registries:
        registry.wait_empty(max(0.0, started + min(SHUTDOWN_NOTICE_WAIT, grace) - time.monotonic()))
    for registry in registries:
        registry.disconnect_all()
    for registry in registries:
        registry.wait_empty(max(0.0, started + grace - time.monotonic()))
    if any(server.holds_mailbox_locks for server in servers):
        gate = servers[0].gate
        with gate.budgeted():
            release_all_live_locks()
    for registry in registries:
        if not len(registry):
            registry.close()
    summary.flush()


class LockHeartbeat(threading.Thread):
    """Refreshes this process's lock heartbeats so other servers do not take a live session's lock (with a
    connection of the process's budget, like any session)."""

    def __init__(self, stop_event: threading.Event, gate: ConnectionGate):
        super().__init__(daemon=True, name="pop3 lock heartbeat")
        self.stop_event, self.gate = stop_event, gate

    def run(self) -> None:
        with self.gate.budgeted():
            while not self.stop_event.wait(get_setting("LOCK_HEARTBEAT")):
                try:
                    refresh_heartbeats()
                except ServerBusy:
                    pass  # logged by the gate; the next beat comes well within LOCK_STALE_AFTER
                except OperationalError as exc:
                    database_unavailable(exc, "lock heartbeats")
                except Exception:
                    logger.exception("could not refresh the lock heartbeats")
                finally:
                    release_connection()


def start_servers(
    addresses: list[tuple[str, int]],
    stop_event: threading.Event,
    *,
    tls: TlsContextHolder | None = None,
    implicit_tls_addresses: list[tuple[str, int]] = (),
    is_trusted: Callable[[str], bool] = is_trusted_peer,
    proxy_protocol: bool = False,
    sockets: list[tuple[socket.socket, bool]] = (),
    room: tuple | None = None,
) -> list[Pop3Server]:
    """Free this node's dead locks, bind every listener (or serve ``sockets``, (listening socket, implicit
    TLS) pairs bound by a parent process), start their loops and the lock heartbeat. ``proxy_protocol``
    applies to every listener (plain and implicit TLS). ``room``: (shared flags, this worker's index) for
    workers (``SessionRegistry.share_room``).

    The process's session registry and its share of the database-connection budget are made here, once
    for all its listeners."""
    options = process_options(stop_event, tls, room)
    with options["gate"].budgeted():
        release_dead_locks()
    options.update(is_trusted=is_trusted, proxy_protocol=proxy_protocol)
    servers = [Pop3Server(a, **options) for a in addresses]
    servers += [Pop3Server(a, implicit_tls=True, **options) for a in implicit_tls_addresses]
    for sock, implicit_tls in sockets:
        servers.append(Pop3Server(sock.getsockname()[:2], implicit_tls=implicit_tls, sock=sock, **options))
    for server in servers:
        serve_in_thread(server)
        kind = "POP3S (implicit TLS)" if server.implicit_tls else "POP3" + (" with STLS" if tls else "")
        kind += " behind a proxy (PROXY protocol)" if proxy_protocol else ""
        logger.info("%s server listening on %s (node %s)", kind, server.display_address, node_name())
    LockHeartbeat(stop_event, options["gate"]).start()
    return servers


def bind_unix_socket(sock: socket.socket, path: str, mode: int | None) -> int:
    """Bind ``sock`` to ``path`` (a stale socket there is removed first, a live one refused) with ``mode``
    applied before anyone can connect; the inode of the socket file (for ``remove_unix_socket``)."""
    remove_stale_socket(path)
    sock.bind(path)
    if mode is not None:
        os.chmod(path, mode)  # before listen(): nobody can connect before it applies
    return os.stat(path).st_ino


def remove_unix_socket(path: str, inode: int | None) -> None:
    """Remove the socket file at ``path`` if it is still ours (``inode``), not one a newer server bound."""
    with contextlib.suppress(OSError):
        if inode is not None and os.stat(path).st_ino == inode:
            os.unlink(path)


def process_options(stop_event: threading.Event, tls: TlsContextHolder | None, room: tuple | None) -> dict:
    """What every listener of one server process shares (``ThreadedServer`` keywords): the stop event, the
    certificate, the session registry (with ``room``, a worker's place in the shared flags) and the gate."""
    registry = SessionRegistry()
    if room is not None:
        registry.share_room(*room)
    return {"stop_event": stop_event, "tls": tls, "registry": registry, "gate": ConnectionGate()}


def serve_in_thread(server: ThreadedServer) -> None:
    """Run the listener's accept loop in a daemon thread (``stop_servers`` ends it)."""
    threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.5},
        daemon=True,
        name=f"{server.protocol} listener {server.display_address}",
    ).start()


class BoundListener:
    """A listening socket bound by a parent for its worker processes to share (``--workers``): TCP
    (``address`` is (host, port)) or a UNIX socket (a path, with ``socket_mode``). ``close()`` also removes
    a UNIX socket's file."""

    def __init__(self, address: tuple[str, int] | str, *, socket_mode: int | None = None) -> None:
        self.address, self.inode = address, None
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        try:
            if isinstance(address, str):
                self.inode = bind_unix_socket(self.sock, address, socket_mode)
            else:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self.sock.bind(address)
            self.sock.listen(get_setting("LISTEN_BACKLOG"))
        except BaseException:
            self.close()
            raise

    @property
    def display_address(self) -> str:
        if isinstance(self.address, str):
            return f"unix:{self.address}"
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        self.sock.close()
        if isinstance(self.address, str):
            remove_unix_socket(self.address, self.inode)


def bind_listeners(
    addresses: list[tuple[str, int] | str], *, socket_mode: int | None = None
) -> list[BoundListener]:
    """A ``BoundListener`` for each address, or none (those bound are closed if one fails: OSError)."""
    bound: list[BoundListener] = []
    try:
        for address in addresses:
            bound.append(BoundListener(address, socket_mode=socket_mode))
    except BaseException:
        for listener in bound:
            listener.close()
        raise
    return bound
