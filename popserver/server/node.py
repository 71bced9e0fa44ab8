"""Node identity: one ``runpop3`` per POPSERVER_NODE_NAME at a time, across every machine on the database.

Lock holders are named by node, and a starting node frees the locks of its own node's dead processes at once
(``release_dead_locks``: by pid, on this machine). Two live nodes sharing a name would free each other's live
locks, so a node claims its name in the ``Node`` table at start and keeps a heartbeat there; a second node
that finds the name held by a live one refuses to start with a clear error. The holder counts as gone when its
heartbeat is older than POPSERVER_LOCK_STALE_AFTER, or when it ran on this machine and its pid is dead (a
restart after kill -9 needs no wait). A clean stop gives the name back.
"""

from __future__ import annotations

import logging
import socket
import threading
from datetime import timedelta

from django.db import IntegrityError, connections, transaction
from django.utils import timezone

from ..conf import get_setting, node_name
from ..storage.lock import pid_is_alive, this_process
from ..models import Node
from ..storage.writelock import one_writer

logger = logging.getLogger("popserver.server")


class NodeNameInUse(Exception):
    """Another live node has this name: the message says which and what to do."""


def _holder_is_gone(node: Node, now) -> bool:
    if node.heartbeat < now - timedelta(seconds=get_setting("LOCK_STALE_AFTER")):
        return True
    me = this_process()
    if node.host == socket.gethostname():
        # A pid reused by this very process (a container's pid 1) is a dead predecessor too.
        return node.pid == me.pid or not pid_is_alive(node.pid)
    return False


def claim_node_name() -> Node:
    """Claim this process's node name, or raise ``NodeNameInUse`` if a live node holds it."""
    try:
        return _claim()
    except IntegrityError:  # two nodes inserted the name at once: the unique name let one in; look again
        return _claim()


def _claim() -> Node:
    me, now = this_process(), timezone.now()
    with one_writer(), transaction.atomic():
        node = Node.objects.select_for_update().filter(name=me.host).first()
        if node is not None and node.instance != me.instance and not _holder_is_gone(node, now):
            age = (now - node.heartbeat).total_seconds()
            raise NodeNameInUse(
                f"node name {me.host!r} is in use by pid {node.pid} on {node.host} (heartbeat {age:.0f} s ago). "
                "Give every node its own POPSERVER_NODE_NAME; if that node is gone, its name is free "
                f"{max(0, get_setting('LOCK_STALE_AFTER') - age):.0f} s from now."
            )
        fields = {
            "host": socket.gethostname()[:255],
            "pid": me.pid,
            "instance": me.instance,
            "heartbeat": now,
        }
        if node is None:
            return Node.objects.create(name=me.host, started_at=now, **fields)
        if node.instance != me.instance:
            logger.info(
                "node %s: taking over the name from pid %s on %s, which is gone", me.host, node.pid, node.host
            )
            fields["started_at"] = now
        Node.objects.filter(pk=node.pk).update(**fields)
        return Node.objects.get(pk=node.pk)


def refresh_node_heartbeat() -> bool:
    """Stamp this node's heartbeat; False (and an error in the log) if another process has the name now."""
    me = this_process()
    with one_writer():
        touched = Node.objects.filter(name=me.host, instance=me.instance).update(heartbeat=timezone.now())
    if not touched:
        logger.error(
            "node %s: the name is no longer ours (another node claimed it after our heartbeat "
            "lapsed); give every node its own POPSERVER_NODE_NAME",
            me.host,
        )
    return bool(touched)


def release_node_name() -> None:
    me = this_process()
    try:
        with one_writer():
            Node.objects.filter(name=me.host, instance=me.instance).delete()
    except Exception:
        logger.exception("node %s: could not give the name back", me.host)


class NodeHeartbeat(threading.Thread):
    """Keeps the claim alive, every POPSERVER_LOCK_HEARTBEAT seconds, until ``stop_event``."""

    def __init__(self, stop_event: threading.Event):
        super().__init__(daemon=True, name="pop3 node heartbeat")
        self.stop_event = stop_event

    def run(self) -> None:
        while not self.stop_event.wait(get_setting("LOCK_HEARTBEAT")):
            try:
                refresh_node_heartbeat()
            except Exception:
                logger.exception("node %s: could not refresh the heartbeat", node_name())
            finally:
                connections.close_all()
