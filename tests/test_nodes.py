"""Node identity (POPSERVER_NODE_NAME): the claim on a name, lock holders, and runpop3's start-up checks."""

import os
import socket
import subprocess
from datetime import timedelta

import pytest
from django.core.checks import run_checks
from django.utils import timezone

from popserver.conf import node_name
from popserver.storage.lock import this_process
from popserver.storage.maildrop import open_maildrop
from popserver.models import Mailbox, Node
from popserver.server.node import NodeNameInUse, claim_node_name, refresh_node_heartbeat, release_node_name
from tests.conftest import manage_py_command, subprocess_env


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def other_node(name: str, *, host: str = "elsewhere.example.org", pid: int = 4242, age: float = 0) -> Node:
    now = timezone.now()
    return Node.objects.create(
        name=name,
        host=host,
        pid=pid,
        instance="x" * 32,
        started_at=now,
        heartbeat=now - timedelta(seconds=age),
    )


def test_node_name_defaults_to_the_host_name(settings):
    assert node_name() == socket.gethostname()[:64]
    settings.POPSERVER_NODE_NAME = "pop-eu-1"
    assert node_name() == "pop-eu-1" and this_process().host == "pop-eu-1"


def test_locks_are_held_in_the_nodes_name(db, settings, make_mailbox):
    settings.POPSERVER_NODE_NAME = "pop-eu-1"
    mailbox = make_mailbox("alice")
    maildrop = open_maildrop(mailbox.pk, "192.0.2.10:50000")
    locked = Mailbox.objects.get(pk=mailbox.pk)
    assert (locked.lock_host, locked.lock_pid, locked.lock_peer) == (
        "pop-eu-1",
        os.getpid(),
        "192.0.2.10:50000",
    )
    maildrop.release()


def test_a_live_lock_of_another_node_on_this_machine_waits_for_its_heartbeat(db, settings, make_mailbox):
    # Two nodes on one machine: the other's pid is not ours to judge (its node name differs).
    from popserver.exceptions import MailboxInUse

    settings.POPSERVER_NODE_NAME = "pop-b"
    settings.POPSERVER_LOCK_STALE_AFTER = 60
    mailbox = make_mailbox("alice")
    now = timezone.now()
    Mailbox.objects.filter(pk=mailbox.pk).update(
        lock_token="t" * 32,
        lock_host="pop-a",
        lock_pid=dead_pid(),
        lock_instance="i" * 32,
        locked_at=now,
        lock_heartbeat=now,
    )
    with pytest.raises(MailboxInUse):
        open_maildrop(mailbox.pk)
    Mailbox.objects.filter(pk=mailbox.pk).update(lock_heartbeat=now - timedelta(seconds=61))
    open_maildrop(mailbox.pk).release()


def test_claim_release_and_claim_again(db, settings):
    settings.POPSERVER_NODE_NAME = "pop-a"
    node = claim_node_name()
    assert (node.name, node.host, node.pid, node.instance) == (
        "pop-a",
        socket.gethostname(),
        os.getpid(),
        this_process().instance,
    )
    assert claim_node_name().pk == node.pk  # the same process may claim again (in-thread test servers)
    assert refresh_node_heartbeat()
    release_node_name()
    assert not Node.objects.exists()


def test_a_live_node_elsewhere_keeps_its_name(db, settings):
    settings.POPSERVER_NODE_NAME = "pop-a"
    settings.POPSERVER_LOCK_STALE_AFTER = 120
    other_node("pop-a", age=10)
    with pytest.raises(
        NodeNameInUse, match=r"node name 'pop-a' is in use by pid 4242 on elsewhere\.example\.org"
    ):
        claim_node_name()
    assert Node.objects.get().host == "elsewhere.example.org"


def test_a_node_whose_heartbeat_is_stale_gives_its_name_up(db, settings):
    settings.POPSERVER_NODE_NAME = "pop-a"
    settings.POPSERVER_LOCK_STALE_AFTER = 120
    other_node("pop-a", age=121)
    assert claim_node_name().instance == this_process().instance


def test_a_dead_process_on_this_machine_gives_its_name_up_at_once(db, settings):
    settings.POPSERVER_NODE_NAME = "pop-a"
    other_node("pop-a", host=socket.gethostname(), pid=dead_pid())
    assert claim_node_name().pid == os.getpid()


def test_a_live_process_on_this_machine_keeps_its_name(db, settings):
    settings.POPSERVER_NODE_NAME = "pop-a"
    other_node("pop-a", host=socket.gethostname(), pid=os.getppid())
    with pytest.raises(NodeNameInUse):
        claim_node_name()


def test_a_node_that_lost_its_name_says_so(db, settings, caplog):
    settings.POPSERVER_NODE_NAME = "pop-a"
    claim_node_name()
    Node.objects.update(instance="y" * 32)  # another node took the name over meanwhile
    assert not refresh_node_heartbeat()
    assert any("no longer ours" in r.getMessage() for r in caplog.records)


def test_a_second_runpop3_with_the_same_name_refuses_to_start(runpop3):
    first = runpop3(POPSERVER_NODE_NAME="twin")
    with pytest.raises(RuntimeError, match=r"node name 'twin' is in use by pid \d+ on "):
        runpop3(POPSERVER_NODE_NAME="twin")
    other = runpop3(POPSERVER_NODE_NAME="twin-2")  # another name is fine
    assert first.terminate() == 0 and other.terminate() == 0
    again = runpop3(POPSERVER_NODE_NAME="twin")  # a clean stop gave the name back
    assert Node.objects.get(name="twin").pid == again.proc.pid
    assert again.terminate() == 0
    assert not Node.objects.exists()


def test_a_killed_runpop3s_name_is_free_for_its_restart(runpop3):
    first = runpop3(POPSERVER_NODE_NAME="phoenix")
    first.kill()
    assert runpop3(POPSERVER_NODE_NAME="phoenix").terminate() == 0


def test_proxy_protocol_without_trusted_proxies_refuses_to_start(transactional_db):
    result = subprocess.run(
        manage_py_command("runpop3", "127.0.0.1:0", "--proxy-protocol"),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "POPSERVER_PROXY_TRUSTED_NETWORKS is empty" in result.stderr


# System checks -----------------------------------------------------------------------------------------------
def check_ids(settings, **overrides) -> list[str]:
    for name, value in overrides.items():
        setattr(settings, f"POPSERVER_{name}", value)
    return [message.id for message in run_checks() if message.id.startswith("popserver.")]


@pytest.mark.parametrize("value", [["10.0.0.0/33"], ["not a network"], "10.0.0.0/8", [None]])
def test_bad_proxy_networks_are_an_error(settings, value):
    assert "popserver.E014" in check_ids(settings, PROXY_TRUSTED_NETWORKS=value)


def test_good_proxy_networks_pass(settings):
    ids = check_ids(settings, PROXY_TRUSTED_NETWORKS=["10.0.0.5/32", "2001:db8::/64"], NODE_NAME="pop-eu-1")
    assert "popserver.E014" not in ids and "popserver.E015" not in ids


@pytest.mark.parametrize("value", ["two words", "x" * 65, "tab\there", 7])
def test_bad_node_names_are_an_error(settings, value):
    assert "popserver.E015" in check_ids(settings, NODE_NAME=value)


def test_proxy_header_timeout_must_be_positive(settings):
    assert "popserver.E001" in check_ids(settings, PROXY_HEADER_TIMEOUT=0)
