"""One POP3 connection: socket I/O, deadlines, output batching, database-connection hygiene and the
session-end log line.

The protocol lives in ``popserver.protocol.session``; logins, their policy and the audit in
``popserver.logins``. This module moves bytes between them and the socket. ``ConnectionHandler`` is what any
protocol's connection needs (reads with a deadline, batched writes, the TLS handshake); LMTP's handler
(``popserver.server.lmtp``) builds on it too.
"""

from __future__ import annotations

import logging
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterable

from django.utils import timezone

from ..conf import get_setting, node_name
from ..exceptions import LoginRefused, MailboxInUse, TemporaryLoginFailure
from ..logins.audit import record_session, session_ended, session_record, session_record_statement
from ..logins.authenticator import DjangoAuthenticator, printable
from ..logins.peers import peer_group, plaintext_allowed
from ..protocol.session import Pop3Session, State
from ..protocol.wire import FLUSH
from ..storage.gate import connection_wanted, holding_connection, release_connection
from ..storage.lock import LockWrites
from ..storage.retention import expire_before_login
from . import metrics
from .proxy_protocol import ProxyHeader, ProxyHeaderError, read_header
from .tls import HANDSHAKE_TIMEOUT

logger = logging.getLogger("popserver.server")

LOGGED_OUT = "Logged out"  # the end reason of a session that QUIT committed

RECV_SIZE = 64 * 1024
# Replies are coalesced up to this many octets per write (few writes: see PITFALLS on Nagle).
WRITE_COALESCE = 256 * 1024
MAX_IOVEC = 512  # buffers per sendmsg (Linux allows 1024)
# A session waiting for its client keeps its database connection (and its slot of the budget) this long at
# most, and only while no other session of the process waits for one; it looks every DB_IDLE_SLICE.
DB_IDLE_CLOSE = 1.0
DB_IDLE_SLICE = 0.05


# TCP keepalive: a client that vanished (a phone changing networks) frees its session and mailbox lock in
# about 90 s instead of holding them until the autologout.
KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3}


def set_socket_options(sock: socket.socket) -> None:
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    options += [
        (socket.IPPROTO_TCP, getattr(socket, name), value)
        for name, value in KEEPALIVE.items()
        if hasattr(socket, name)
    ]
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def send_buffers(sock: socket.socket, buffers: list[bytes], wait_writable=None) -> None:
    """``sendall`` for a list of buffers, with ``sendmsg`` (partial writes resumed where they stopped).

    A non-blocking socket needs ``wait_writable()``: called when the socket takes nothing, it returns once
    it may take more or raises ``TimeoutError``."""
    views = [memoryview(buffer) for buffer in buffers]
    while views:
        try:
            sent = sock.sendmsg(views[:MAX_IOVEC])
        except BlockingIOError:
            if wait_writable is None:
                raise
            wait_writable()
            continue
        while sent and views:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


class SessionEnded(Exception):
    """The connection is over: ``reason`` goes into the session-end log line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ConnectionHandler(socketserver.BaseRequestHandler):
    """One connection of any protocol, in its own thread: reads with deadlines (giving the database connection
    back before waiting on the client), batched writes, the TLS handshake."""

    server: ThreadedServer  # noqa: F821 (popserver.server.listener)
    shutdown_notice: bytes | None = None  # said to a waiting client when the server stops

    def setup(self) -> None:
        self.sock: socket.socket = self.request
        self.peer_ip, self.peer_port = self.server.peer_address(self.client_address)
        self.peer = f"{self.peer_ip}:{self.peer_port}" if self.peer_port else self.peer_ip
        self.connected_at = time.monotonic()
        self.started_at = timezone.now()
        # Read once per connection, not per command.
        self.autologout = get_setting("AUTOLOGOUT")
        self.login_timeout = get_setting("LOGIN_TIMEOUT")
        self.readable = self.writable = None  # poll objects once ``use_poll`` is on
        self.told_shutdown = False
        set_socket_options(self.sock)

    def use_poll(self) -> None:
        """Plaintext: a non-blocking socket and a poll object of our own, so that a read or write that can go
        ahead at once is one system call (a socket with a timeout polls before every call and has its timeout
        set before each). TLS keeps the socket's timeout: decrypted bytes may wait inside the TLS object,
        where poll cannot see them. Call it once nothing else reads the socket with a timeout (the PROXY
        header is read first)."""
        self.readable = self.writable = None
        if isinstance(self.sock, ssl.SSLSocket):
            return
        self.sock.setblocking(False)
        self.readable, self.writable = select.poll(), select.poll()
        self.readable.register(self.sock, select.POLLIN)
        self.readable.register(self.server.registry.stop_fd, select.POLLIN)  # a stop wakes a waiting read
        self.writable.register(self.sock, select.POLLOUT)

    # TLS ------------------------------------------------------------------------------------------------
    def handshake(self) -> None:
        """Wrap the socket in TLS, in this session's thread, with a deadline (never in the accept loop)."""
        release_connection()  # the handshake waits for the client
        context = self.server.tls.context
        self.readable = self.writable = None  # from here on the TLS socket's own timeouts
        # One deadline for the whole handshake, not per recv(): a byte every few seconds gains nothing. It is
        # also within the pre-login deadline.
        deadline = min(time.monotonic() + HANDSHAKE_TIMEOUT, self.connected_at + self.login_timeout)
        try:
            self.sock = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
            if not self.server.registry.rewrap(self.request, self.sock):
                raise SessionEnded("Dropped to make room")  # cut while being wrapped: the cut missed it
            self.sock.setblocking(False)
            while True:
                try:
                    self.sock.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    events = select.POLLIN
                except ssl.SSLWantWriteError:
                    events = select.POLLOUT
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.wait_for(events, remaining):
                    if self.server.stop_event.is_set():
                        raise SessionEnded("Server shutting down")
                    self.handshake_ended("timeout")
                    raise SessionEnded("TLS handshake timed out")
            self.sock.setblocking(True)
        except (ssl.SSLError, OSError, ValueError) as exc:
            # The peer (or a cut to make room) dropped it mid-handshake: the session-end line says so.
            self.handshake_ended("failed")
            raise SessionEnded(f"TLS handshake failed: {exc.__class__.__name__}") from None
        self.handshake_ended("ok")

    def handshake_ended(self, result: str) -> None:
        """A TLS handshake ended: "ok", "failed" or "timeout" (for a protocol's metrics)."""

    def wait_for(self, events: int, timeout: float) -> bool:
        """Wait until the socket is ready for ``events`` (or closed), the server stops, or ``timeout``
        passes; True if the socket is ready. ``poll``, not ``select``: descriptors may be over 1023."""
        if events & select.POLLIN and isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), events)
        poller.register(self.server.registry.stop_fd, select.POLLIN)
        ready = poller.poll(max(timeout, 0.0) * 1000)
        return any(fd == self.sock.fileno() for fd, _ in ready)

    # Input ----------------------------------------------------------------------------------------------
    def read(self, deadline: float, timeout_reply: bytes) -> bytes:
        """Bytes from the client by ``deadline`` (monotonic), else ``timeout_reply`` is sent and the session
        ends. While it waits, the session gives its database connection back as soon as another session
        wants one (or after DB_IDLE_CLOSE); a server that stops wakes it to say so."""
        readable = self.readable
        now = time.monotonic()
        if readable is not None and now < deadline:  # what pipelining clients sent is often here already
            try:
                data = self.sock.recv(RECV_SIZE)
            except BlockingIOError:
                pass
            else:
                if not data:
                    raise SessionEnded("Connection closed")
                return data
        idle_since = now
        while True:
            now = time.monotonic()
            if self.server.stop_event.is_set():
                self.tell_shutdown()
                raise SessionEnded("Server shutting down")
            remaining = deadline - now
            if remaining <= 0:
                self.send_quietly(timeout_reply)
                raise SessionEnded("Inactivity")
            wait = remaining
            if holding_connection():
                if connection_wanted() or now - idle_since >= DB_IDLE_CLOSE:
                    release_connection()
                else:
                    wait = min(remaining, DB_IDLE_SLICE)
            try:
                if readable is None:
                    if not self.wait_for(select.POLLIN, wait):
                        continue
                    self.sock.settimeout(
                        max(remaining, 0.001)
                    )  # readable: a TLS record may still be arriving
                    data = self.sock.recv(RECV_SIZE)
                elif readable.poll(max(wait * 1000, 1)):
                    data = self.sock.recv(RECV_SIZE)
                else:
                    continue
            except (BlockingIOError, TimeoutError):  # a wake-up without data (a stop, or a TLS record part)
                continue
            if not data:
                if self.server.stop_event.is_set():
                    raise SessionEnded("Server shutting down")
                raise SessionEnded("Connection closed")
            return data

    def tell_shutdown(self) -> None:
        """RFC 3206 s.4 (as Dovecot): say why the connection ends when the server stops."""
        if self.shutdown_notice and not self.told_shutdown:
            self.told_shutdown = True
            self.send_quietly(self.shutdown_notice)

    # Output ---------------------------------------------------------------------------------------------
    def write_timeout(self) -> float:
        """Seconds a write may wait for a client that does not read before the session is dropped."""
        return self.autologout

    def send(self, chunks: Iterable[bytes]) -> int:
        """Write everything ``chunks`` yields in few large writes (Nagle: see PITFALLS); returns octets sent.

        Output is gathered up to WRITE_COALESCE octets, and written early at the session's ``FLUSH`` mark."""
        pending: list[bytes] = []
        pending_size = total = 0
        for chunk in chunks:
            if chunk is FLUSH:
                if pending:
                    self.write(pending)
                    total += pending_size
                    pending, pending_size = [], 0
                continue
            if chunk:
                pending.append(chunk)
                pending_size += len(chunk)
                del chunk  # written data is not kept while the session makes the next piece
                if pending_size >= WRITE_COALESCE:
                    self.write(pending)
                    total += pending_size
                    pending, pending_size = [], 0
        if pending:
            self.write(pending)
            total += pending_size
        return total

    def write(self, buffers: list[bytes]) -> None:
        """Send ``buffers`` whole: one ``sendmsg`` gather-write (no join) with poll, joined under TLS.

        A write that would wait for the client first gives the session's database connection back; a client
        that stops reading is dropped after ``write_timeout()`` (before login: at the login deadline)."""
        try:
            if self.writable is not None:
                send_buffers(self.sock, buffers, self.wait_writable)
            else:
                self._write_tls(buffers[0] if len(buffers) == 1 else b"".join(buffers))
        except TimeoutError:
            raise SessionEnded("Inactivity (the client does not read)") from None

    def _write_tls(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            # After a would-block, OpenSSL wants the same bytes again: the retry starts where this try did.
            if holding_connection():
                self.sock.settimeout(0.0)
                try:
                    sent = self.sock.send(view)
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    release_connection()
                    continue
            else:
                self.sock.settimeout(self.write_timeout())
                sent = self.sock.send(view)
            view = view[sent:]

    def wait_writable(self) -> None:
        release_connection()  # the client is not reading: no database connection is held meanwhile
        if not self.writable.poll(self.write_timeout() * 1000):
            raise TimeoutError("the client stopped reading")

    def send_quietly(self, data: bytes) -> None:
        try:
            self.readable = self.writable = None
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass


class Pop3Handler(ConnectionHandler):
    """Runs one ``Pop3Session`` over one socket, in the connection's own thread."""

    shutdown_notice = b"-ERR [SYS/TEMP] Server shutting down.\r\n"

    def setup(self) -> None:
        super().setup()
        self.session: Pop3Session | None = None
        self.recorded_at_quit = False  # the SessionRecord went into QUIT's transaction (``RecordAtQuit``)
        self.proxy_header: ProxyHeader | None = None
        metrics.session_opened()

    def finish(self) -> None:
        metrics.session_closed(self.session)

    # Main loop ------------------------------------------------------------------------------------------
    def handle(self) -> None:
        if self.server.proxy_protocol and not self.take_proxy_header():
            return
        self.authenticator = authenticator = DjangoAuthenticator(
            self.peer_ip, self.peer_port, self.server.stop_event, trusted=self.server.is_trusted(self.peer_ip)
        )
        authenticator.tls = self.server.implicit_tls or self.tls_at_proxy
        authenticator.tls_at_proxy = self.tls_at_proxy
        # A failed login waits its delay as an idle connection: droppable again, like any other.
        authenticator.before_failure_delay = lambda: self.server.registry.end_login(
            self.request, logged_in=False
        )
        self.session = session = self.make_session(authenticator)
        reason = "Connection closed"
        try:
            if self.server.implicit_tls:
                self.handshake()
            self.use_poll()
            tally = getattr(session, "tally", None)  # with metrics on: the session's command counts
            greeted = self.send([session.greeting()])
            if tally is not None:
                tally.sent += greeted
            line_deadline = time.monotonic() + self.autologout
            while not session.closed:
                data = self.receive(session, line_deadline)
                produced = self.send(session.receive(data))
                if tally is not None:
                    tally.batch_sent(produced)
                if produced:
                    line_deadline = time.monotonic() + self.autologout
                if session.wants_tls:
                    self.start_tls(session)
            if session.state is State.UPDATE:
                reason = LOGGED_OUT
            elif session.quit_received and session.username is None:  # QUIT before login (Dovecot's words)
                reason = "Aborted login by logging out"
            elif session.quit_received:
                reason = "Logout failed, nothing deleted"
            elif session.cut_before_login:
                reason = session.cut_before_login
            else:
                reason = "Closed by server"
        except SessionEnded as ended:
            reason = ended.reason
        except (TimeoutError, ConnectionError, OSError, ValueError) as exc:
            # OSError includes ssl.SSLError; ValueError: a TLS socket closed under us (dropped to make room)
            reason = "Connection closed" if not self.server.stop_event.is_set() else "Server shutting down"
            logger.debug("%s: %s", self.peer, exc)
        finally:
            session.abandon()  # releases the lock without UPDATE unless QUIT already committed
            self.penalise(session)
            # The client is done: its slot is free before the bookkeeping below (which may wait for a busy
            # database), so a client that reconnects at once finds room. The thread stays counted until
            # it ends (``remove``), so a shutdown waits for that bookkeeping.
            self.server.registry.release_slot(self.request)
            self.log_session_end(session, reason, authenticator)
            release_connection()
            if self.sock is not self.request:
                self.sock.close()  # the TLS wrapper; the server closes the accepted socket

    def penalise(self, session: Pop3Session) -> None:
        """An address whose client was cut for abuse before login gets a penalty (``penalties.py``, as
        Dovecot's anvil): its next connections wait before they are greeted. Never a trusted network."""
        if session.cut_before_login is None or self.authenticator.trusted:
            return
        seconds = self.server.registry.penalties.offence(peer_group(self.peer_ip))
        if seconds:
            logger.debug(
                "%s: %s; its address waits %gs before its next greeting",
                self.peer,
                session.cut_before_login,
                seconds,
            )

    @property
    def tls_at_proxy(self) -> bool:
        return self.proxy_header is not None and self.proxy_header.tls_at_proxy

    @property
    def health_check(self) -> bool:
        return self.proxy_header is not None and self.proxy_header.local

    def take_proxy_header(self) -> bool:
        """Read the PROXY header, in this connection's thread, before the greeting and before a TLS handshake
        (HAProxy sends it first and the ClientHello right after). From then on the client it names is the
        peer everywhere: caps, throttles, the plaintext policy, the lock holder, logs and the audit. A health
        check (v2 LOCAL, v1 UNKNOWN) or a header without an address keeps the proxy's own. False: the
        connection is closed (one log line says why)."""
        proxy = self.peer
        try:
            header = read_header(self.sock, get_setting("PROXY_HEADER_TIMEOUT"))
        except ProxyHeaderError as exc:
            metrics.proxy_header(exc.kind)
            if not self.server.stop_event.is_set():
                logger.warning("closing %s: bad PROXY header (%s)", proxy, exc.reason)
            return False
        metrics.proxy_header("health_check" if header.local else "ok")
        self.proxy_header = header
        if header.source is not None:
            self.peer_ip, self.peer_port = header.source
            self.peer = f"{self.peer_ip}:{self.peer_port}"
            if not self.server.registry.readdress(
                self.request, self.peer_ip, trusted=self.server.is_trusted(self.peer_ip)
            ):
                logger.warning(
                    "refusing %s (through %s): too many unauthenticated connections", self.peer, proxy
                )
                if not self.server.implicit_tls:
                    self.send_quietly(b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n")
                return False
            if not self.wait_out_penalty():
                return False
        logger.debug(
            "%s: PROXY v%d header from %s%s%s",
            self.peer,
            header.version,
            proxy,
            " (health check)" if header.local else "",
            " (TLS at proxy)" if header.tls_at_proxy else "",
        )
        return True

    def wait_out_penalty(self) -> bool:
        """Behind a proxy a penalised client (penalties.py) is known only after its PROXY header, in this
        thread, which then waits while the process's penalty box watches the socket as it watches those it
        holds before admission: released after the first step if silent, after the whole penalty if it talked
        first; a hang-up ends it at once. False: the connection is to be closed (hung up, closed to make room
        in the box, or the server stops)."""
        registry = self.server.registry
        penalties = registry.penalties
        if self.server.is_trusted(self.peer_ip):
            return True
        until = penalties.held_until(peer_group(self.peer_ip))
        if until is None:
            return True
        released, over = [], threading.Event()
        registry.penalty_box.hold(
            self.sock,
            until,
            penalties.silent_until(until, client_speaks_first=self.server.implicit_tls),
            release=lambda: (released.append(True), over.set()),
            drop=over.set,
        )
        over.wait()  # the box calls one of the two: when due, at a hang-up, when full, at stop, or if it fails
        if not released:
            logger.debug("%s: closed while it waited out its address's penalty", self.peer)
        return bool(released) and not self.server.stop_event.is_set()

    def make_session(self, authenticator: DjangoAuthenticator) -> Pop3Session:
        # TLS terminated by the proxy counts as TLS: the client's own connection is encrypted (and STLS,
        # which would nest TLS inside it, is not offered).
        tls_active = self.server.implicit_tls or self.tls_at_proxy

        def authenticate(username: str, password: str | None, *, mechanism: str = "USER"):
            # While the password is checked the connection is not dropped to make room, and it counts as
            # logged in before "+OK Logged in." is sent: from then on the client relies on its slot.
            registry = self.server.registry
            if not registry.begin_login(self.request):
                metrics.login(metrics.login_method(mechanism, False), "temporary", None)
                raise TemporaryLoginFailure()  # dropped to make room: its socket is already cut
            started = time.perf_counter()
            try:
                maildrop = authenticator(username, password, mechanism=mechanism)
            except BaseException as exc:
                registry.end_login(self.request, logged_in=False)
                if metrics.enabled and isinstance(exc, LoginRefused):
                    self.count_login(mechanism, exc, started)
                raise
            registry.end_login(self.request, logged_in=True)
            if metrics.enabled:
                self.count_login(mechanism, None, started)
            maildrop.at_commit = RecordAtQuit(self)
            return maildrop

        return metrics.session_class(
            authenticate,
            peer=self.peer,
            greeting=get_setting("GREETING"),
            implementation=get_setting("IMPLEMENTATION"),
            plaintext_allowed=self.plaintext_allowed(tls_active),
            tls_available=self.server.tls is not None and not tls_active,
            tls_active=tls_active,
            login_delay=int(get_setting("LOGIN_DELAY")),
            expire=expire_before_login,
            client_workarounds=frozenset(get_setting("CLIENT_WORKAROUNDS")),
        )

    def count_login(self, mechanism: str, refused: LoginRefused | None, started: float) -> None:
        authenticator = self.authenticator
        seconds = time.perf_counter() - started - authenticator.failure_delay_waited
        metrics.login(
            metrics.login_method(mechanism, authenticator.app_password_tried),
            metrics.login_result(refused, disabled=authenticator.account_disabled),
            max(seconds, 0.0),
        )
        if isinstance(refused, MailboxInUse):
            metrics.lock_refused("in_use")

    def plaintext_allowed(self, tls_active: bool) -> bool:
        return plaintext_allowed(tls_active=tls_active, trusted=self.authenticator.trusted)

    # TLS ------------------------------------------------------------------------------------------------
    def handshake_ended(self, result: str) -> None:
        # An implicit-TLS listener offers no STLS (the session is TLS already): the listener tells the mode.
        metrics.tls_handshake("implicit" if self.server.implicit_tls else "stls", result)

    def start_tls(self, session: Pop3Session) -> None:
        """RFC 2595 s.4: after "+OK Begin TLS negotiation now." the session's pipelined plaintext has already
        been discarded by the engine; handshake, then a fresh AUTHORIZATION state."""
        self.handshake()
        self.authenticator.tls = True
        session.tls_started()
        session.plaintext_allowed = self.plaintext_allowed(tls_active=True)

    # Input ----------------------------------------------------------------------------------------------
    def write_timeout(self) -> float:
        """Before login, what is left of the login deadline: a client that never reads cannot outstay
        POPSERVER_LOGIN_TIMEOUT by blocking our writes. After it, the autologout."""
        session = self.session
        if session is None or session.state is State.AUTHORIZATION:
            remaining = self.connected_at + self.login_timeout - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the login time is over")
            return remaining
        return self.autologout

    def receive(self, session: Pop3Session, line_deadline: float) -> bytes:
        """Bytes from the client, within the deadline that applies: before login the whole login time
        (Dovecot: 3 minutes), after it the autologout per line (RFC 1939 s.3), not per ``recv()``."""
        deadline = line_deadline
        if session.state is State.AUTHORIZATION:
            deadline = min(line_deadline, self.connected_at + self.login_timeout)
        return self.read(deadline, b"-ERR Disconnected for inactivity.\r\n")

    # Session end ----------------------------------------------------------------------------------------
    def session_record_at_quit(self) -> dict:
        """The session's record as a clean logout ends it (``RecordAtQuit``)."""
        session = self.session
        return session_record(
            mailbox=self.authenticator.mailbox,
            username=session.username,
            peer_ip=self.peer_ip,
            started_at=self.started_at,
            duration=time.monotonic() - self.connected_at,
            end_reason=LOGGED_OUT,
            stats=session.stats,
        )

    def log_session_end(self, session: Pop3Session, reason: str, authenticator: DjangoAuthenticator) -> None:
        duration = time.monotonic() - self.connected_at
        node = node_name()
        if session.username is None or authenticator.mailbox is None:
            # Like Dovecot's pop3-login: "Disconnected (auth failed, 1 attempts in 2 secs): user=<alice>, ..."
            attempts = authenticator.attempts
            if not attempts:
                # A load balancer's health check every few seconds would drown the log at INFO.
                logger.log(
                    logging.DEBUG if self.health_check else logging.INFO,
                    "Disconnected: %s (no auth attempts) peer=%s duration=%.1fs node=%s",
                    reason,
                    self.peer,
                    duration,
                    node,
                )
                return
            logger.info(
                "Disconnected: %s (%s, %d attempts) user=<%s> method=%s peer=%s duration=%.1fs node=%s",
                reason,
                authenticator.refusal,
                attempts,
                printable(authenticator.last_username),
                authenticator.last_mechanism,
                self.peer,
                duration,
                node,
            )
            return
        stats = session.stats
        logger.info(
            "Disconnected: %s user=<%s> peer=%s duration=%.1fs top=%d/%d, retr=%d/%d, del=%d/%d, size=%d node=%s",
            reason,
            session.username,
            self.peer,
            duration,
            stats.top_count,
            stats.top_bytes,
            stats.retr_count,
            stats.retr_bytes,
            stats.deleted_count,
            stats.messages,
            stats.mailbox_size,
            node,
        )
        session_ended(
            mailbox=authenticator.mailbox,
            username=session.username,
            peer=self.peer,
            peer_ip=self.peer_ip,
            started_at=self.started_at,
            duration=duration,
            end_reason=reason,
            stats=stats,
            recorded=self.recorded_at_quit and session.state is State.UPDATE,  # QUIT's commit had it
        )


class RecordAtQuit(LockWrites):
    """Inside QUIT's transaction: the session's record, so that QUIT and the record commit once (it counts only
    if that commit succeeds: ``log_session_end``); on PostgreSQL in QUIT's one statement."""

    def __init__(self, handler: Pop3Handler):
        self.handler = handler

    def __call__(self) -> None:
        self.handler.recorded_at_quit = record_session(self.handler.session_record_at_quit())

    def statements(self):
        record = session_record_statement(self.handler.session_record_at_quit())
        return None if record is None else [record]

    def written_at_once(self) -> None:
        self.handler.recorded_at_quit = True
