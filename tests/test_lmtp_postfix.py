"""End to end with a real MTA: mail submitted to Debian's Postfix over SMTP, handed to popserver over LMTP
(``virtual_transport = lmtp:inet:...`` or ``lmtp:unix:...``, the README's snippet), fetched back with POP3.

Postfix runs as its own instance: its own config_directory, queue_directory and data_directory in a temporary
folder, no chroot, loopback only, free ports, a log file of its own (PITFALLS, "Postfix in a test"). It needs
root (its master runs as root and drops to ``postfix``); ``.ci/run`` installs it.
"""

import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from popserver.delivery import deliver
from popserver.models import Message
from tests import mta
from tests.mta import free_port, message_through, pop3_retr_all

pytestmark = [pytest.mark.live, pytest.mark.slow]

POSTFIX = shutil.which(
    "postfix", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/lib/postfix"])
)
DEADLINE = 60  # seconds for Postfix to deliver or defer (it usually takes well under one)

# The services of Debian's master.cf that this instance needs, without chroot (the queue is in a temporary
# folder) and with smtpd on a loopback port. {smtp} is filled in.
MASTER_CF = """\
{smtp} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
lmtp      unix  - - n -     - lmtp
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

# The README's Postfix snippet (runlmtp section), plus what a throw-away instance needs.
MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = mx.popserver.test
mydomain = popserver.test
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
alias_maps =
alias_database =
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
biff = no
# A deferred message is retried at once when asked (postfix flush), and soon anyway.
minimal_backoff_time = 2s
maximal_backoff_time = 4s
queue_run_delay = 2s
# --- README: popserver receives the mail of these domains over LMTP ---
virtual_mailbox_domains = example.org
virtual_transport = {transport}
"""


class Postfix:
    """A Postfix instance in ``root`` (a temporary folder), handing example.org to ``transport``."""

    def __init__(self, root: Path, transport: str):
        self.root = root
        self.config = root / "conf"
        self.smtp_port = free_port()
        self.log = root / "maillog"
        self.config.mkdir()
        (root / "queue").mkdir()
        (root / "data").mkdir()
        shutil.chown(root / "data", "postfix")  # master.lock and the caches are written as postfix
        (self.config / "main.cf").write_text(MAIN_CF.format(root=root, transport=transport))
        (self.config / "master.cf").write_text(MASTER_CF.format(smtp=f"127.0.0.1:{self.smtp_port}"))

    def run(self, *args: str) -> subprocess.CompletedProcess:
        # Postfix writes its errors to stderr only when stderr is a terminal; the log file has them too.
        return subprocess.run(
            [POSTFIX, "-c", str(self.config), *args], capture_output=True, text=True, timeout=60
        )

    def start(self) -> None:
        result = self.run("start")
        if result.returncode != 0:
            pytest.fail(f"Postfix could not be started: {result.stdout}{result.stderr}\n{self.log_text()}")
        deadline = time.monotonic() + DEADLINE
        while True:  # started: smtpd's port answers
            try:
                socket.create_connection(("127.0.0.1", self.smtp_port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"Postfix's smtpd never listened on {self.smtp_port}:\n{self.log_text()}")
                time.sleep(0.05)  # sync-ok: polling a port with a bounded deadline

    def stop(self) -> None:
        self.run("stop")
        pid_file = self.root / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while pid_file.exists() and time.monotonic() < deadline:
            try:
                os.kill(int(pid_file.read_text().split()[0]), 0)
            except (ProcessLookupError, ValueError):
                break
            time.sleep(0.05)  # sync-ok: waiting for master to exit, bounded
        if pid_file.exists():
            self.run("abort")

    def submit(self, sender: str, recipients: list[str], message: bytes) -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            refused = client.sendmail(sender, recipients, message)
        assert refused == {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def wait_for_log(self, pattern: str) -> re.Match:
        deadline = time.monotonic() + DEADLINE
        while True:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            assert time.monotonic() < deadline, f"no {pattern!r} in Postfix's log:\n{self.log_text()}"
            time.sleep(0.1)  # sync-ok: Postfix has no event to wait on; bounded poll of its log


@pytest.fixture
def postfix_root():
    if POSTFIX is None:
        pytest.skip("Postfix is not installed (.ci/run installs Debian's postfix)")
    if os.geteuid() != 0:
        pytest.skip("Postfix's master must start as root")
    root = Path(tempfile.mkdtemp(prefix="popserver-postfix-", dir="/tmp"))
    os.chmod(root, 0o755)  # Postfix's processes (user postfix) walk into it
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postfix_factory(postfix_root):
    instances = []

    def start(transport: str) -> Postfix:
        instance = Postfix(postfix_root, transport)
        instances.append(instance)
        instance.start()
        return instance

    yield start
    for instance in instances:
        instance.stop()


MESSAGE = message_through("Postfix")
RECEIVED_BY = b"by mx.popserver.test (Postfix)"


def check_delivered(data: bytes, recipient: str | None) -> None:
    mta.check_delivered(data, recipient, MESSAGE, RECEIVED_BY)


def wait_for_messages(username: str, count: int, postfix: Postfix) -> None:
    mta.wait_for_messages(username, count, postfix.log_text, DEADLINE)


def test_postfix_delivers_over_lmtp_tcp_and_pop3_serves_it(
    postfix_factory, lmtp_server, pop3_server, make_mailbox
):
    make_mailbox("alice", "secret", email="alice@example.org")
    lmtp = lmtp_server(("127.0.0.1", 0))
    postfix = postfix_factory(f"lmtp:inet:127.0.0.1:{lmtp.port}")
    postfix.submit("sender@example.net", ["alice@example.org"], MESSAGE)
    wait_for_messages("alice", 1, postfix)
    postfix.wait_for_log(
        r"to=<alice@example.org>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+.*status=sent "
        r"\(250 2\.0\.0 <alice@example.org> Saved\)"
    )
    [fetched] = pop3_retr_all(pop3_server)
    check_delivered(fetched, "alice@example.org")


def test_postfix_over_a_unix_socket_with_several_recipients(
    postfix_factory, lmtp_server, pop3_server, make_mailbox, postfix_root
):
    """One Postfix delivery with two recipients of one mailbox (an address and its +detail form), and an
    unknown one that Postfix bounces with our 550 5.1.1."""
    make_mailbox("alice", "secret", email="alice@example.org")
    path = str(postfix_root / "lmtp.sock")
    lmtp_server(path)
    postfix = postfix_factory(f"lmtp:unix:{path}")
    postfix.submit(
        "sender@example.net", ["alice@example.org", "alice+news@example.org", "nobody@example.org"], MESSAGE
    )
    wait_for_messages("alice", 2, postfix)
    postfix.wait_for_log(
        r"to=<nobody@example.org>.*status=bounced \(host .* said: 550 5\.1\.1 "
        r"<nobody@example.org> User doesn't exist"
    )
    fetched = pop3_retr_all(pop3_server)
    assert len(fetched) == 2  # one copy per recipient, the same bytes: one transaction, no Delivered-To
    for data in fetched:
        check_delivered(data, None)


def test_a_full_mailbox_makes_postfix_defer_until_space_is_freed(
    postfix_factory, lmtp_server, pop3_server, make_mailbox, settings
):
    settings.POPSERVER_QUOTA_WARNINGS = []  # only the mail itself in this mailbox
    mailbox = make_mailbox("alice", "secret", email="alice@example.org", quota_messages=1)
    old = deliver("alice", b"Subject: old\r\n\r\nfills the mailbox\r\n")
    lmtp = lmtp_server(("127.0.0.1", 0))
    postfix = postfix_factory(f"lmtp:inet:127.0.0.1:{lmtp.port}")
    postfix.submit("sender@example.net", ["alice@example.org"], MESSAGE)
    postfix.wait_for_log(
        r"to=<alice@example.org>.*status=deferred \(host .* said: 452 4\.2\.2 "
        r"<alice@example.org> Quota exceeded \(mailbox for user is full\) \(in reply to RCPT TO"
    )
    assert Message.objects.filter(mailbox=mailbox).count() == 1

    old.delete()  # space is freed (as a POP3 client's QUIT would)
    assert postfix.run("flush").returncode == 0
    wait_for_messages("alice", 1, postfix)
    postfix.wait_for_log(r"to=<alice@example.org>.*status=sent \(250 2\.0\.0 <alice@example.org> Saved\)")
    [fetched] = pop3_retr_all(pop3_server)
    check_delivered(fetched, "alice@example.org")
