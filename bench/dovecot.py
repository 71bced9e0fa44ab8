"""A private Dovecot (POP3 + LMTP) on free loopback ports, for side-by-side benchmarks.

    with Dovecot(password="bench-password") as dovecot:
        seed_maildir(dovecot.maildir("user0"), [message] * 1000)
        ... POP3 on 127.0.0.1:dovecot.pop3_port, LMTP on 127.0.0.1:dovecot.lmtp_port ...

Debian's ``dovecot-pop3d`` and ``dovecot-lmtpd`` are installed with apt-get when missing (run as root; never
by the test command). The instance runs in the foreground with a configuration of its own written to a
temporary directory (its own base_dir, state_dir and log file), so it neither reads nor disturbs
/etc/dovecot; a system instance the package may have started is stopped first, because it would hold ports
110/995 and its own auth processes would compete for the CPU.

The configuration is Dovecot's compiled-in defaults plus what a loopback benchmark needs:
- a static passdb (every name, one password, ``PLAIN`` scheme) and a static userdb with the uid/gid of the
  unprivileged ``mail`` user, home ``<tmp>/home/<name>``, Maildir ``~/Maildir``; names are taken without a
  domain (``auth_username_format = %Ln``), so LMTP's ``user0@localhost`` is POP3's ``user0``;
- ``ssl = no`` and plaintext logins allowed (``disable_plaintext_auth = no`` on 2.3,
  ``auth_allow_cleartext = yes`` on 2.4), as popserver allows them from loopback;
- ``pop3_uidl_format = %08Xu%08Xv``, popserver's UIDL format;
- everything else (``mail_fsync = optimized``, one login process per connection, no auth cache, a log line
  per session) is Debian's default deployment, so the figures are what a stock install does, not a tuned
  one. ``tuned=True`` switches the login services to Dovecot's documented "high-performance mode" (login
  processes serve many connections); ``mail_fsync="never"`` drops the fsync of each delivered message,
  which is the like-for-like setting beside popserver on SQLite (the project runs it with
  ``synchronous=NORMAL``: no fsync per commit); PostgreSQL fsyncs each commit, like the default.

Options for the conformance comparison (bench/conformance_dovecot.py): ``tls=(certfile, keyfile)`` turns on
``ssl = yes`` (STLS on the POP3 port, implicit TLS on ``pop3s_port``); ``pop3_lock_session=True`` sets
Dovecot's ``pop3_lock_session = yes`` (off by default: two sessions may then hold the same mailbox).
``lda_command()`` is the ``dovecot-lda`` command line that delivers to a user of this instance (it reads the
same configuration, so it finds the same userdb through the instance's auth socket).
"""

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Self

PACKAGES = ("dovecot-pop3d", "dovecot-lmtpd")
BINARY = "/usr/sbin/dovecot"
LDA = "/usr/lib/dovecot/dovecot-lda"  # in dovecot-core, which dovecot-pop3d depends on
START_TIMEOUT = 30.0  # seconds for the listeners to accept after start


def ensure_installed() -> None:
    """apt-get install the packages that are missing (one ``apt-get update`` first), then stop any system
    instance the install started."""
    missing = [p for p in PACKAGES if not _installed(p)]
    if missing:
        if os.geteuid() != 0:
            raise RuntimeError(
                f"Dovecot is not installed and this is not root: apt-get install {' '.join(missing)}"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    stop_system_instance()


def _installed(package: str) -> bool:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False
    )
    return result.returncode == 0 and result.stdout.endswith(" installed")


def version() -> str:
    """``dovecot --version``, e.g. ``2.3.19.1 (9b53102964)``."""
    return subprocess.run([BINARY, "--version"], capture_output=True, text=True, check=True).stdout.strip()


def stop_system_instance() -> None:
    """Stop the dovecot service of /etc/dovecot if it runs (a package install on a systemd host starts it)."""
    if not _system_running():
        return
    for command in (["systemctl", "stop", "dovecot"], ["service", "dovecot", "stop"], [BINARY, "stop"]):
        if shutil.which(command[0]):
            subprocess.run(command, capture_output=True, check=False)
        if not _system_running():
            return
    raise RuntimeError("the system's dovecot service is running and could not be stopped")


def _system_running() -> bool:
    """Whether the master of the system's instance (base_dir /run/dovecot) is alive."""
    try:
        words = Path("/run/dovecot/master.pid").read_text().split()
    except OSError:
        return False
    return bool(words) and words[0].isdigit() and _alive(int(words[0]))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Dovecot:
    """A foreground Dovecot with its own configuration; a context manager that stops it and removes its files."""

    def __init__(
        self,
        password: str = "bench-password",
        *,
        user: str = "mail",
        tuned: bool = False,
        mail_fsync: str | None = None,
        directory: str | None = None,
        tls: tuple[str, str] | None = None,
        pop3_lock_session: bool = False,
    ):
        """``mail_fsync``: ``optimized`` (Dovecot's default: each delivered message is fsynced), ``always``
        or ``never``; None leaves the default. ``tls``: (certificate file, key file), both PEM."""
        self.password = password
        self.tls = tls
        self.pop3_lock_session = pop3_lock_session
        self.mail_fsync = mail_fsync
        self.user = pwd.getpwnam(user)
        self.tuned = tuned
        self._directory = directory
        self.proc: subprocess.Popen | None = None
        self.pop3_port = self.lmtp_port = self.pop3s_port = 0

    # -- life cycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        ensure_installed()
        self.version = version()
        self.root = Path(self._directory or tempfile.mkdtemp(prefix="bench-dovecot-"))
        self.root.chmod(0o755)  # the mail user must reach its home below it
        self.home = self.root / "home"
        self.home.mkdir(exist_ok=True)
        os.chown(self.home, self.user.pw_uid, self.user.pw_gid)
        self.log_path = self.root / "dovecot.log"
        self.config_path = self.root / "dovecot.conf"
        self.pop3_port, self.lmtp_port = free_port(), free_port()
        self.pop3s_port = free_port() if self.tls else 0
        self.config_path.write_text(self.config())
        try:
            with open(self.root / "master.err", "wb") as errors:
                self.proc = subprocess.Popen(
                    [BINARY, "-F", "-c", str(self.config_path)],
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                )
            self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM the master (it stops its children), wait, and remove the directory if we made it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only processes we started
                self.proc.wait(timeout=5)
        self.proc = None
        if self._directory is None and getattr(self, "root", None) is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        pending = {self.pop3_port, self.lmtp_port} | ({self.pop3s_port} if self.pop3s_port else set())
        while pending:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}: {self.errors()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"dovecot did not listen within {START_TIMEOUT:.0f} s: {self.errors()}")
            for port in sorted(pending):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    pending.discard(port)
                except OSError:
                    time.sleep(0.05)  # sync-ok: polling for the listener, bounded by the deadline

    def errors(self) -> str:
        texts = [
            p.read_text(errors="replace")[-2000:]
            for p in (self.root / "master.err", self.log_path)
            if p.exists()
        ]
        return " | ".join(t.strip() for t in texts if t.strip()) or "(no output)"

    # -- configuration ------------------------------------------------------------------------------------

    def config(self) -> str:
        """The configuration file's text for the installed version (2.3; 2.4's new syntax is best effort)."""
        v24 = tuple(int(n) for n in re.findall(r"\d+", self.version)[:2]) >= (2, 4)
        uid, gid, home = self.user.pw_uid, self.user.pw_gid, self.home
        if v24:  # the version settings must come first
            head = ["dovecot_config_version = 2.4.0", "dovecot_storage_version = 2.4.0"]
            auth = [
                "auth_allow_cleartext = yes",
                "auth_username_format = %{user | username | lower}",
                "mail_driver = maildir",
                "mail_path = ~/Maildir",
                "pop3_uidl_format = %{uid | hex(8)}%{uidvalidity | hex(8)}",
                "userdb_static_allow_all_users = yes",
                f"passdb static {{\n  password = {self.password}\n}}",
                "userdb static {",
                f"  fields {{\n    uid = {uid}\n    gid = {gid}\n    home = {home}/%{{user | username}}\n  }}",
                "}",
            ]
        else:
            head = []
            auth = [
                "disable_plaintext_auth = no",
                "auth_username_format = %Ln",
                "mail_location = maildir:~/Maildir",
                "pop3_uidl_format = %08Xu%08Xv",
                f"passdb {{\n  driver = static\n  args = password={self.password}\n}}",
                f"userdb {{\n  driver = static\n  args = uid={uid} gid={gid} home={home}/%n allow_all_users=yes\n}}",
            ]
        tls = ["ssl = no"]
        if self.tls:
            cert, key = self.tls
            tls = (
                ["ssl = yes", f"ssl_server_cert_file = {cert}", f"ssl_server_key_file = {key}"]
                if v24
                else ["ssl = yes", f"ssl_cert = <{cert}", f"ssl_key = <{key}"]
            )
        login_tuning = []
        if self.tuned:  # "high-performance mode": a login process serves many connections
            login_tuning = [
                "  restart_request_count = 0" if v24 else "  service_count = 0",
                f"  process_min_avail = {os.cpu_count() or 1}",
            ]
        lines = [
            *head,
            f"base_dir = {self.root / 'run'}",
            f"state_dir = {self.root / 'state'}",
            f"instance_name = bench-{os.getpid()}-{self.pop3_port}",
            f"log_path = {self.log_path}",
            "protocols = pop3 lmtp",
            "listen = 127.0.0.1",
            *tls,
            "auth_mechanisms = plain",
            f"first_valid_uid = {uid}",
            f"first_valid_gid = {gid}",
            *auth,
            *([f"mail_fsync = {self.mail_fsync}"] if self.mail_fsync else []),
            *(["pop3_lock_session = yes"] if self.pop3_lock_session else []),
            "service pop3-login {",
            f"  inet_listener pop3 {{\n    port = {self.pop3_port}\n  }}",
            f"  inet_listener pop3s {{\n    port = {self.pop3s_port}\n  }}",
            *login_tuning,
            "}",
            "service lmtp {",
            f"  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {self.lmtp_port}\n  }}",
            "}",
        ]
        return "\n".join(lines) + "\n"

    # -- mail ---------------------------------------------------------------------------------------------

    def maildir(self, username: str) -> Path:
        return self.home / username / "Maildir"

    def lda_command(self, user: str = "{user}") -> list[str]:
        """``dovecot-lda`` delivering the message on its standard input to ``user`` of this instance."""
        return [LDA, "-c", str(self.config_path), "-d", user]


def seed_maildir(maildir: Path, messages: list[bytes], *, owner: str = "mail") -> None:
    """Write ``messages`` into ``maildir/cur`` as files (the bytes as given), owned by ``owner``.

    The names carry ``S=`` (file size) and ``W=`` (size with CRLF line endings) as Dovecot's own deliveries do,
    so STAT and LIST need no read of the files, as popserver's need no read of the bodies. Messages go to
    ``cur/`` (already seen by a MUA: Dovecot moves nothing at the first login); their order is the order
    given. Call before the first login of that user; Dovecot builds its index (and UIDs 1..N) at that login.
    """
    account = pwd.getpwnam(owner)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    stamp = int(time.time()) - len(messages)
    for n, body in enumerate(messages, start=1):
        vsize = len(body) + body.count(b"\n") - body.count(b"\r\n")
        path = maildir / "cur" / f"{stamp + n}.M{n}P{os.getpid()}.bench,S={len(body)},W={vsize}:2,"
        path.write_bytes(body)
        os.utime(path, (stamp + n, stamp + n))  # Maildir order is by name, but keep the dates monotonic too
    for directory, _, files in os.walk(maildir.parent):
        os.chown(directory, account.pw_uid, account.pw_gid)
        for name in files:
            os.chown(os.path.join(directory, name), account.pw_uid, account.pw_gid)


if __name__ == "__main__":
    # python bench/dovecot.py: install if needed, start, show the version and the ports, stop.
    with Dovecot() as instance:
        print(
            f"dovecot {instance.version}: POP3 on 127.0.0.1:{instance.pop3_port}, "
            f"LMTP on 127.0.0.1:{instance.lmtp_port}; config {instance.config_path}"
        )
