"""The audit trail: one LoginEvent per login attempt and one SessionRecord per logged-in session.

Writing it never breaks a login or a session: errors are logged. Passwords never reach it.
"""

from __future__ import annotations

import ipaddress
import logging
from datetime import timedelta

from django.db import OperationalError, transaction
from django.utils import timezone

from popserver.conf import get_setting, node_name
from popserver.exceptions import ServerBusy
from popserver.models import DeliveryCount, LoginEvent, SessionRecord
from popserver.overload import database_unavailable
from popserver.signals import send_safely, session_closed
from popserver.storage.compiled import CompiledInsert, Statement
from popserver.storage.gate import using_database
from popserver.storage.writelock import one_writer

logger = logging.getLogger(__name__)


def _ip_or_none(ip: str) -> str | None:
    try:
        return str(ipaddress.ip_address(ip.split("%", 1)[0]))
    except ValueError:
        return None


_LOGIN_EVENT = CompiledInsert(
    LoginEvent,
    (
        "time",
        "username",
        "peer_ip",
        "mechanism",
        "tls",
        "tls_at_proxy",
        "node",
        "outcome",
        "reason",
        "mailbox_id",
    ),
)
_SESSION_RECORD = CompiledInsert(
    SessionRecord,
    (
        "mailbox_id",
        "username",
        "peer_ip",
        "started_at",
        "duration",
        "end_reason",
        "node",
        "retrieved_count",
        "retrieved_bytes",
        "deleted_count",
        "deleted_bytes",
    ),
)


def login_event(
    *,
    username: str,
    peer_ip: str,
    mechanism: str,
    tls: bool,
    outcome: str,
    reason: str = "",
    mailbox=None,
    tls_at_proxy: bool = False,
) -> dict:
    """A LoginEvent's fields, for ``record_login`` or ``login_event_statement``. ``tls``: the client used TLS,
    to this server or (``tls_at_proxy``) to the load balancer in front."""
    return {
        "time": timezone.now(),
        "username": username[:255],
        "peer_ip": _ip_or_none(peer_ip),
        "mechanism": mechanism[:16],
        "tls": tls or tls_at_proxy,
        "tls_at_proxy": tls_at_proxy,
        "node": node_name(),
        "outcome": outcome,
        "reason": reason[:64],
        "mailbox_id": None if mailbox is None else mailbox.pk,
    }


def record_login(event: dict) -> None:
    """Write a ``login_event``. Inside a transaction (a login's lock) the row commits with it, behind a
    savepoint of its own."""
    try:
        with using_database(), one_writer():  # in a transaction: behind a savepoint (CompiledInsert)
            _LOGIN_EVENT.insert(**event)
    except Exception as exc:
        _not_written(exc, "recording a login event")


def login_event_statement(event: dict) -> Statement | None:
    """A ``login_event`` as a statement for a lock's one statement (``storage.lock.LockWrites``)."""
    return _LOGIN_EVENT.statement(**event)


def _not_written(exc: Exception, what: str) -> None:
    """An audit row could not be written: logged, unless the enclosing transaction (a login's lock, QUIT's
    UPDATE) is lost with it, and then ``exc`` is raised again. That happens when the row's savepoint cannot
    be rolled back (connection gone, an InnoDB deadlock that rolled back the whole transaction and its
    savepoints): Django marks the transaction for rollback and the outer ``atomic()`` would roll it back
    *without raising*: a QUIT would answer +OK with nothing deleted, a login hold a lock it does not have."""
    connection = transaction.get_connection()
    if connection.in_atomic_block and connection.needs_rollback:
        raise exc
    if isinstance(exc, OperationalError):
        database_unavailable(exc, what)
    elif not isinstance(exc, ServerBusy):  # the gate logged that one
        logger.exception("audit: %s failed", what)


def session_record(
    *, mailbox, username: str, peer_ip: str, started_at, duration: float, end_reason: str, stats
) -> dict:
    """A SessionRecord's fields, for ``record_session`` or ``session_record_statement``."""
    return {
        "mailbox_id": None if mailbox is None else mailbox.pk,
        "username": username[:255],
        "peer_ip": _ip_or_none(peer_ip),
        "started_at": started_at,
        "duration": duration,
        "end_reason": end_reason[:64],
        "node": node_name(),
        "retrieved_count": stats.retr_count,
        "retrieved_bytes": stats.retr_bytes,
        "deleted_count": stats.deleted_count,
        "deleted_bytes": stats.deleted_bytes,
    }


def record_session(record: dict) -> bool:
    """Write a ``session_record``; True if written. Inside a transaction (QUIT's) the row commits with it,
    behind a savepoint of its own."""
    try:
        with using_database(), one_writer():  # in a transaction: behind a savepoint (CompiledInsert)
            _SESSION_RECORD.insert(**record)
        return True
    except Exception as exc:
        _not_written(exc, "recording a session")
    return False


def session_record_statement(record: dict) -> Statement | None:
    """A ``session_record`` as a statement for a lock's one statement (``storage.lock.LockWrites``)."""
    return _SESSION_RECORD.statement(**record)


def session_ended(
    *,
    mailbox,
    username: str,
    peer: str,
    peer_ip: str,
    started_at,
    duration: float,
    end_reason: str,
    stats,
    recorded: bool = False,
) -> None:
    """A logged-in session is over, however it ended: its SessionRecord (unless ``recorded`` already, in
    QUIT's transaction), then the ``session_closed`` signal (whose receivers may query: within the connection
    budget)."""
    try:
        with using_database():
            _session_ended(
                mailbox, username, peer, peer_ip, started_at, duration, end_reason, stats, recorded
            )
    except ServerBusy:
        pass  # the gate logged it


def _session_ended(
    mailbox, username, peer, peer_ip, started_at, duration, end_reason, stats, recorded
) -> None:
    if not recorded:
        record_session(
            session_record(
                mailbox=mailbox,
                username=username,
                peer_ip=peer_ip,
                started_at=started_at,
                duration=duration,
                end_reason=end_reason,
                stats=stats,
            )
        )
    send_safely(
        session_closed,
        mailbox=mailbox,
        peer=peer,
        stats={
            "reason": end_reason,
            "duration": duration,
            "top_count": stats.top_count,
            "top_bytes": stats.top_bytes,
            "retr_count": stats.retr_count,
            "retr_bytes": stats.retr_bytes,
            "deleted_count": stats.deleted_count,
            "deleted_bytes": stats.deleted_bytes,
            "messages": stats.messages,
            "mailbox_size": stats.mailbox_size,
        },
    )


def prune(days: int | None = None, now=None) -> tuple[int, int]:
    """Delete login events and session records older than ``days`` (POPSERVER_AUDIT_RETENTION_DAYS), and the
    hourly delivery counts of that age."""
    days = get_setting("AUDIT_RETENTION_DAYS") if days is None else days
    cutoff = (now or timezone.now()) - timedelta(days=days)
    events = LoginEvent.objects.filter(time__lt=cutoff).delete()[0]
    sessions = SessionRecord.objects.filter(started_at__lt=cutoff).delete()[0]
    DeliveryCount.objects.filter(hour__lt=cutoff).delete()
    return events, sessions
