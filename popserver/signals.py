"""popserver's public events. Receivers that raise are logged and never break delivery or a session.

message_delivered(mailbox, message)
    sent after a delivery has been committed.
quota_warning(mailbox, unit, threshold, used, limit, message)
    sent after a delivery that took the mailbox across a share of its quota (POPSERVER_QUOTA_WARNINGS) has
    been committed: ``unit`` is "octets" or "messages", ``threshold`` the share in percent, ``used`` the
    usage after the delivery, ``limit`` the limit; ``message`` is the warning delivered into the mailbox
    (None with POPSERVER_QUOTA_WARNING_MESSAGE off).
messages_deleted(mailbox, count, octets)
    sent after QUIT's UPDATE has been committed (the messages deleted, or hidden under a keep-deleted
    policy), and after popexpire deleted retrieved messages past their days (not for purges of hidden ones).
session_closed(mailbox, peer, stats)
    sent when a logged-in POP3 session ends, however it ends; ``stats`` is a dict of counters.
login_failed(username, peer, mechanism, reason)
    sent for each failed login (wrong credentials, or refused by a lock-out).
login_locked_out(username, peer, scope)
    sent when a login is refused because ``scope`` ("account" or "ip") is locked out.
"""

import logging

from django.dispatch import Signal

logger = logging.getLogger(__name__)

message_delivered = Signal()
quota_warning = Signal()
messages_deleted = Signal()
session_closed = Signal()
login_failed = Signal()
login_locked_out = Signal()


def send_safely(signal: Signal, **kwargs) -> None:
    """Send ``signal``; a receiver that raises is logged and changes nothing for the caller."""
    for receiver, result in signal.send_robust(sender=None, **kwargs):
        if isinstance(result, Exception):
            logger.error("signal receiver %r raised", receiver, exc_info=result)
