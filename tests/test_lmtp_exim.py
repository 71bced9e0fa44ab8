"""End to end with a real Exim: mail submitted to Exim 4 over SMTP, handed to popserver over LMTP by the
README's router and transport (Exim's ``lmtp`` driver on a UNIX socket, or its ``smtp`` driver with
``protocol = lmtp`` on TCP), fetched back with POP3.

Debian's exim4 and postfix packages replace each other, and Postfix is installed for
tests/test_lmtp_postfix.py, so the Exim binary is Debian's ``exim4-daemon-light`` unpacked with
``dpkg-deb -x`` (scripts/unpack-exim.sh, run by ``.ci/run``, puts it in data/tools/exim4;
POPSERVER_TEST_EXIM names another binary, and an installed exim4 is used first). It runs as its own
instance: its own configuration (``-C``, which root may use), spool, logs and loopback port in a temporary
folder, as a foreground daemon (``-bdf``). The binary is built to run as the user ``Debian-exim`` (the
script creates it when missing); ``deliver_drop_privilege`` runs receptions and deliveries as that user, so
the unpacked binary needs no setuid bit and no trusted configuration (TRUSTED_CONFIG_LIST), and Exim's
panic log stays empty (checked after each test).
"""

import os
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
from pathlib import Path

import pytest

from popserver.delivery import deliver
from popserver.models import Message
from tests import mta
from tests.mta import free_port, message_through, pop3_retr_all
from tests.waiting import wait_for

pytestmark = [pytest.mark.live, pytest.mark.slow]

BASE_DIR = Path(__file__).resolve().parent.parent
EXIM = (
    os.environ.get("POPSERVER_TEST_EXIM")
    or shutil.which("exim4", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    or shutil.which(str(BASE_DIR / "data" / "tools" / "exim4" / "usr" / "sbin" / "exim4"))
)
EXIM_USER = "Debian-exim"  # EXIM_USER of Debian's build (exim4 -bV does not print it)
DEADLINE = 30  # seconds for Exim to deliver or defer (it takes well under one)

# The README's Exim snippet (runlmtp section): the router, and the transport in its two forms. {socket} and
# {port} are filled in; the README has /run/popserver/lmtp and 8024.
ROUTER = """\
popserver:
  driver = accept
  domains = +local_domains
  transport = popserver_lmtp
"""
LMTP_TRANSPORT = """\
popserver_lmtp:
  driver = lmtp
  socket = {socket}
  batch_max = 50
"""
SMTP_TRANSPORT = """\
popserver_lmtp:
  driver = smtp
  protocol = lmtp
  hosts = 127.0.0.1
  port = {port}
  allow_localhost
  max_rcpt = 50
"""

# What a throw-away instance needs around the snippet: loopback only, no DNS or ident look-ups, no TLS, one
# user for every process, an ACL that takes mail for example.org from loopback, and a retry rule (without
# one a temporary error fails the address).
CONFIGURE = """\
primary_hostname = mx.popserver.test
qualify_domain = popserver.test
exim_path = {exim}
spool_directory = {root}/spool
log_file_path = {root}/%slog
pid_file_path = {root}/exim.pid
daemon_smtp_ports = {smtp_port}
local_interfaces = 127.0.0.1
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
keep_environment =
deliver_drop_privilege = true
domainlist local_domains = example.org
acl_smtp_rcpt = acl_check_rcpt

begin acl
acl_check_rcpt:
  accept hosts = 127.0.0.1
         domains = +local_domains
  deny   message = relay not permitted

begin routers
{router}
begin transports
{transport}
begin retry
*  *  F,1h,10m
"""


class Exim:
    """An Exim daemon in ``root`` (a temporary folder) handing example.org to ``transport``."""

    def __init__(self, root: Path, transport: str):
        self.root = root
        self.config = root / "exim.conf"
        self.smtp_port = free_port()
        self.log = root / "mainlog"
        (root / "spool").mkdir()
        shutil.chown(root / "spool", EXIM_USER, EXIM_USER)
        # Root-owned and not writable by others, or Exim refuses it.
        self.config.write_text(
            CONFIGURE.format(
                exim=EXIM, root=root, smtp_port=self.smtp_port, router=ROUTER, transport=transport
            )
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [EXIM, "-C", str(self.config), "-bdf"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        try:
            wait_for(self.listening, timeout=DEADLINE)
        except AssertionError:
            pytest.fail(f"Exim's daemon never listened on {self.smtp_port}:\n{self.log_text()}")

    def listening(self) -> bool:
        if self.process.poll() is not None:
            output = self.process.stdout.read().decode(errors="replace")
            pytest.fail(f"Exim's daemon exited ({self.process.returncode}): {output}\n{self.log_text()}")
        return "listening for SMTP on [127.0.0.1]:%d" % self.smtp_port in self.log_text()

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [EXIM, "-C", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()

    def submit(self, sender: str, recipients: list[str], message: bytes) -> str:
        """Send over SMTP; the id Exim gave the message."""
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as client:
            refused = client.sendmail(sender, recipients, message)
        assert refused == {}
        return self.wait_for_log(r"(\S+) <= " + re.escape(sender)).group(1)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else "(no log)"

    def wait_for_log(self, pattern: str) -> re.Match:
        try:
            return wait_for(lambda: re.search(pattern, self.log_text()), timeout=DEADLINE, interval=0.05)
        except AssertionError:
            pytest.fail(f"no {pattern!r} in Exim's log:\n{self.log_text()}")


@pytest.fixture
def exim_root():
    if EXIM is None:
        pytest.skip(
            "Exim is not here (scripts/unpack-exim.sh, run by .ci/run, unpacks it into data/tools/exim4)"
        )
    if os.geteuid() != 0:
        pytest.skip("Exim's daemon must be started by root (an Exim admin user) with its own configuration")
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        pytest.skip(
            f"Exim runs as the user {EXIM_USER}, which does not exist (scripts/unpack-exim.sh creates it)"
        )
    root = Path(tempfile.mkdtemp(prefix="popserver-exim-", dir="/tmp"))
    os.chmod(root, 0o755)
    shutil.chown(root, EXIM_USER, EXIM_USER)  # its logs and pid file are written as Debian-exim
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["lmtp-unix", "smtp-tcp"])
def exim(request, exim_root, lmtp_server):
    """A started Exim whose transport is the README's: the ``lmtp`` driver on runlmtp's UNIX socket, or the
    ``smtp`` driver speaking LMTP to runlmtp on TCP."""
    if request.param == "lmtp-unix":
        path = exim_root / "lmtp.sock"
        lmtp_server(str(path))
        transport = LMTP_TRANSPORT.format(socket=path)
    else:
        transport = SMTP_TRANSPORT.format(port=lmtp_server(("127.0.0.1", 0)).port)
    instance = Exim(exim_root, transport)
    instance.start()
    yield instance
    instance.stop()
    panic = exim_root / "paniclog"
    assert not panic.exists(), f"Exim's panic log: {panic.read_text(errors='replace')}"


MESSAGE = message_through("Exim")
RECEIVED_BY = b"by mx.popserver.test with esmtp (Exim 4."


def check_delivered(data: bytes, recipient: str | None) -> None:
    mta.check_delivered(data, recipient, MESSAGE, RECEIVED_BY)


def wait_for_messages(username: str, count: int, exim: Exim) -> None:
    mta.wait_for_messages(username, count, exim.log_text, DEADLINE)


def test_exim_delivers_over_lmtp_and_pop3_serves_it(exim, pop3_server, make_mailbox):
    make_mailbox("alice", "secret", email="alice@example.org")
    exim.submit("sender@example.net", ["alice@example.org"], MESSAGE)
    wait_for_messages("alice", 1, exim)
    exim.wait_for_log(
        r"=> (alice <)?alice@example\.org>? R=popserver T=popserver_lmtp .*"
        r'C="250 2\.0\.0 <alice@example\.org> Saved"'
    )
    [fetched] = pop3_retr_all(pop3_server)
    check_delivered(fetched, "alice@example.org")


def test_exim_with_several_recipients_bounces_the_unknown_one(exim, pop3_server, make_mailbox):
    """One Exim delivery with two recipients of one mailbox (an address and its +detail form) in one LMTP
    transaction, and an unknown one that Exim fails with our 550 5.1.1."""
    make_mailbox("alice", "secret", email="alice@example.org")
    exim.submit(
        "sender@example.net", ["alice@example.org", "alice+news@example.org", "nobody@example.org"], MESSAGE
    )
    wait_for_messages("alice", 2, exim)
    exim.wait_for_log(
        r"\*\* nobody@example\.org R=popserver T=popserver_lmtp.*: (LMTP|SMTP) error .*after "
        r"RCPT TO:<nobody@example\.org>: 550 5\.1\.1 <nobody@example\.org> User doesn't exist"
    )
    exim.wait_for_log(r"-> (alice\+news <)?alice\+news@example\.org>? R=popserver T=popserver_lmtp")
    fetched = pop3_retr_all(pop3_server)
    assert len(fetched) == 2  # one copy per recipient, the same bytes: one transaction, no Delivered-To
    for data in fetched:
        check_delivered(data, None)


def test_a_full_mailbox_makes_exim_defer_until_space_is_freed(exim, pop3_server, make_mailbox, settings):
    settings.POPSERVER_QUOTA_WARNINGS = []  # only the mail itself in this mailbox
    mailbox = make_mailbox("alice", "secret", email="alice@example.org", quota_messages=1)
    old = deliver("alice", b"Subject: old\r\n\r\nfills the mailbox\r\n")
    message_id = exim.submit("sender@example.net", ["alice@example.org"], MESSAGE)
    exim.wait_for_log(
        r"== alice@example\.org R=popserver T=popserver_lmtp defer .*: (LMTP|SMTP) error .*after RCPT TO:"
        r"<alice@example\.org>: 452 4\.2\.2 <alice@example\.org> Quota exceeded \(mailbox for user is full\)"
    )
    assert Message.objects.filter(mailbox=mailbox).count() == 1

    old.delete()  # space is freed (as a POP3 client's QUIT would)
    result = exim.run("-M", message_id)  # a forced delivery of that message, in the foreground
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for_messages("alice", 1, exim)
    exim.wait_for_log(r'=> (alice <)?alice@example\.org>? R=popserver T=popserver_lmtp .*C="250 2\.0\.0 ')
    [fetched] = pop3_retr_all(pop3_server)
    check_delivered(fetched, "alice@example.org")


def test_the_readme_shows_the_snippet_this_test_runs():
    """The README's Exim snippet is the router and the two transports above, with the README's socket and
    port (the test fills in its own)."""
    readme = (BASE_DIR / "README.md").read_text()
    snippet = readme[readme.index("\n# routers\npopserver:") :]
    snippet = snippet[: snippet.index("```")]
    parts = re.split(r"\n# .*\n", snippet)
    assert parts[1:] == [
        ROUTER,
        LMTP_TRANSPORT.format(socket="/run/popserver/lmtp"),
        SMTP_TRANSPORT.format(port=8024),
    ]
