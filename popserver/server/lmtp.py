"""The LMTP listener (``manage.py runlmtp``): the POP3 listener's machinery with an LMTP handler.

Each connection runs an ``LmtpSession`` (``popserver.protocol.lmtp``) over a delivery handler made per
connection by the ``handler_factory`` the caller gives (``runlmtp`` gives
``popserver.mailin.lmtp.MailboxDeliveryHandler``). LMTP is for the local MTA: on TCP only peers in
POPSERVER_LMTP_TRUSTED_NETWORKS (loopback by default) are served; a UNIX socket is guarded by its mode.
Connections are never dropped to make room (an MTA may be mid-delivery); when POPSERVER_MAX_SESSIONS are
open a newcomer gets ``421 4.3.2`` and the MTA tries again. A connection's queries count against the
process's budget of database connections as a POP3 session's do (``storage/gate.py``: a slot while it
resolves recipients and stores, given back when another connection wants one while it waits for its MTA).
With ``runlmtp --workers N`` the parent binds the listeners and ``workers.Supervisor`` runs N processes of
these servers (``start_lmtp_servers(..., sockets=...)``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from django.db import connections

from ..conf import get_setting
from ..logins.peers import is_lmtp_peer
from ..protocol.lmtp import DeliveryHandler, LmtpSession
from ..storage.gate import release_connection
from .handler import ConnectionHandler, SessionEnded
from .listener import LOCAL_PEER, ThreadedServer, parse_address, process_options, serve_in_thread
from .tls import TlsContextHolder

logger = logging.getLogger("popserver.server")

HandlerFactory = Callable[..., DeliveryHandler]  # handler_factory(peer=...) -> DeliveryHandler


class LmtpHandler(ConnectionHandler):
    """Runs one ``LmtpSession`` over one socket, in the connection's own thread."""

    server: LmtpServer

    def write_timeout(self) -> float:
        return get_setting("LMTP_TIMEOUT")

    def handle(self) -> None:
        server = self.server
        session = LmtpSession(
            server.handler_factory(peer=self.peer),
            hostname=server.hostname,
            peer=self.peer,
            max_message_size=get_setting("MAX_MESSAGE_SIZE"),
            max_recipients=get_setting("LMTP_MAX_RECIPIENTS"),
            over_quota_permanent=get_setting("QUOTA_EXCEEDED_PERMANENT"),
            tls_available=server.tls is not None,
        )
        logger.debug("%s: LMTP connection", self.peer)
        reason = "Connection closed"
        timeout = get_setting("LMTP_TIMEOUT")
        # RFC 5321 s.4.5.3.2.7: the server waits at least 5 minutes for each command; DATA may take as long
        # as bytes keep coming.
        timeout_reply = f"421 4.4.2 {server.hostname} Disconnected for inactivity\r\n".encode()
        # RFC 5321 s.3.8: a server that stops says 421 to a waiting client (the MTA retries elsewhere or later).
        self.shutdown_notice = f"421 4.3.2 {server.hostname} Server shutting down\r\n".encode()
        try:
            self.send([session.greeting()])
            deadline = time.monotonic() + timeout
            while not session.closed:
                data = self.read(deadline, timeout_reply)
                produced = self.send(session.receive(data))
                if produced or session.in_data:
                    deadline = time.monotonic() + timeout
                if session.wants_tls:
                    self.handshake()
                    session.tls_started()
            reason = "Logged out" if session.quit_received else "Closed by server"
        except SessionEnded as ended:
            reason = ended.reason
        except (TimeoutError, ConnectionError, OSError) as exc:
            reason = "Connection closed" if not server.stop_event.is_set() else "Server shutting down"
            logger.debug("%s: %s", self.peer, exc)
        finally:
            if session.in_data:
                reason += " in the middle of DATA: message not delivered"
            session.abandon()
            server.registry.release_slot(self.request)
            self.log_session_end(session, reason)
            release_connection()
            if self.sock is not self.request:
                self.sock.close()  # the TLS wrapper; the server closes the accepted socket

    def log_session_end(self, session: LmtpSession, reason: str) -> None:
        stats = session.stats
        logger.info(
            "LMTP disconnected: %s peer=%s lhlo=<%s> duration=%.1fs messages=%d delivered=%d refused=%d octets=%d",
            reason,
            self.peer,
            session.client_name[:100],
            time.monotonic() - self.connected_at,
            stats.messages,
            stats.delivered,
            stats.refused,
            stats.octets,
        )


class LmtpServer(ThreadedServer):
    """A threaded LMTP listener on TCP or a UNIX socket."""

    handler_class = LmtpHandler
    protocol = "lmtp"
    busy_reply = b"421 4.3.2 Too many connections, try again later\r\n"
    droppable = False  # the MTA may be mid-delivery: never cut to make room
    holds_mailbox_locks = False

    def __init__(self, address: tuple[str, int] | str, *, handler_factory: HandlerFactory, **options) -> None:
        self.handler_factory = handler_factory
        self.hostname = get_setting("LMTP_HOSTNAME") or socket.gethostname()
        # Every peer that gets past verify_request is the MTA: no per-IP cap.
        super().__init__(address, is_trusted=lambda ip: True, **options)

    def verify_request(self, request, client_address) -> bool:
        """On TCP only POPSERVER_LMTP_TRUSTED_NETWORKS: anyone else could put mail in any mailbox."""
        peer_ip = self.peer_address(client_address)[0]
        if peer_ip == LOCAL_PEER or is_lmtp_peer(peer_ip):
            return True
        logger.warning("LMTP: refusing %s: not in POPSERVER_LMTP_TRUSTED_NETWORKS", peer_ip)
        self.refuse(request, b"421 4.7.0 Access denied\r\n")
        return False


def parse_lmtp_address(text: str) -> tuple[str, int] | str:
    """``unix:PATH`` -> PATH; ``ADDR:PORT``, ``PORT``, ``[IPv6]:PORT`` -> (host, port), port 8024 by default."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError("unix: needs a path")
        return path
    return parse_address(text, default_port=8024)


def start_lmtp_servers(
    addresses: list[tuple[str, int] | str],
    stop_event: threading.Event,
    *,
    handler_factory: HandlerFactory,
    tls: TlsContextHolder | None = None,
    socket_mode: int | None = None,
    sockets: list[socket.socket] = (),
    room: tuple | None = None,
) -> list[LmtpServer]:
    """Bind every LMTP listener (or serve ``sockets``, listening sockets bound by the parent of ``runlmtp
    --workers``) and start their loops. One session registry and one share of the database-connection budget
    (``ConnectionGate``) for all of them; ``room`` as for ``listener.start_servers``."""
    connections.close_all()
    options = process_options(stop_event, tls, room)
    servers = [
        LmtpServer(address, handler_factory=handler_factory, socket_mode=socket_mode, **options)
        for address in addresses
    ]
    for sock in sockets:
        bound = sock.getsockname()
        bound = bound if isinstance(bound, str) else bound[:2]
        servers.append(LmtpServer(bound, handler_factory=handler_factory, sock=sock, **options))
    for server in servers:
        serve_in_thread(server)
        logger.info("LMTP server%s listening on %s", " with STARTTLS" if tls else "", server.display_address)
    return servers
