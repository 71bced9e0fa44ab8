"""``manage.py runlmtp [ADDR:PORT | unix:PATH]``: run the LMTP server (RFC 2033) in the foreground until SIGINT
or SIGTERM, for the local MTA (Postfix's ``lmtp:``, Exim's ``lmtp`` transport)."""

import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from popserver.conf import get_setting
from popserver.mailin.lmtp import MailboxDeliveryHandler
from popserver.management.commands.runpop3 import ERRORS
from popserver.server.listener import stop_servers
from popserver.server.lmtp import parse_lmtp_address, start_lmtp_servers
from popserver.server.tls import TlsConfigError, TlsContextHolder


def socket_mode(text: str) -> int:
    """An octal file mode such as 660 or 0o660."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r} is not a file mode")
    return mode


class Command(BaseCommand):
    help = (
        "Run the LMTP server for the local MTA (default address: POPSERVER_LMTP_LISTEN, 127.0.0.1:8024; "
        "unix:PATH for a UNIX socket)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "addrport", nargs="?", help="ADDR:PORT, PORT, [IPv6]:PORT or unix:PATH to listen on."
        )
        parser.add_argument(
            "--socket-mode",
            default="660",
            help="permissions of a UNIX socket, in octal (default 660: the owner and its group, e.g. postfix).",
        )
        parser.add_argument("--certfile", help="PEM certificate (chain): enables STARTTLS (RFC 3207).")
        parser.add_argument("--keyfile", help="PEM private key, if not in the certificate file.")

    def handle(self, *args, **options):
        try:
            address = parse_lmtp_address(options["addrport"] or get_setting("LMTP_LISTEN"))
            mode = socket_mode(options["socket_mode"])
        except ValueError as exc:
            raise CommandError(f"Invalid address or mode: {exc}") from None
        tls = None
        if options["certfile"]:
            try:
                tls = TlsContextHolder(options["certfile"], options["keyfile"])
            except TlsConfigError as exc:
                raise CommandError(f"TLS: {exc}") from None
        elif options["keyfile"]:
            raise CommandError("TLS: --keyfile needs --certfile.")

        stop = threading.Event()
        # Signal handlers only set flags: shutdown() must run outside the serving threads.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        reload_requested = threading.Event()
        signal.signal(
            signal.SIGHUP, lambda *_: reload_requested.set()
        )  # reloads the certificate, never fatal
        try:
            servers = start_lmtp_servers(
                [address], stop, handler_factory=MailboxDeliveryHandler, tls=tls, socket_mode=mode
            )
        except OSError as exc:
            known = None if isinstance(address, str) else ERRORS.get(exc.errno)  # port wording, for TCP only
            raise CommandError(f"Error: {known or exc.strerror or exc}") from None
        self.stdout.write(
            "popserver: "
            + ", ".join(f"LMTP on {s.display_address}" for s in servers)
            + ". Quit with CONTROL-C."
        )
        self.stdout.flush()
        while not stop.wait(0.5):
            if reload_requested.is_set():
                reload_requested.clear()
                if tls is not None:
                    tls.reload()
        stop_servers(servers)
        self.stdout.write("popserver: stopped.")
