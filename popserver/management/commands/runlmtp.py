"""``manage.py runlmtp [ADDR:PORT | unix:PATH] [--workers N|auto]``: run the LMTP server (RFC 2033) in the
foreground until SIGINT or SIGTERM, for the local MTA (Postfix's ``lmtp:``, Exim's ``lmtp`` transport): one
process, or N worker processes under the supervisor ``runpop3 --workers`` uses (``popserver.server.workers``)."""

import threading

from django.core.management.base import BaseCommand, CommandError

from popserver.checks.database import connection_budget_warnings
from popserver.conf import get_setting, worker_share
from popserver.mailin.lmtp import MailboxDeliveryHandler
from popserver.management.commands.runpop3 import ERRORS
from popserver.server.listener import bind_listeners, stop_servers
from popserver.server.lmtp import parse_lmtp_address, start_lmtp_servers
from popserver.server.tls import TlsConfigError, TlsContextHolder
from popserver.server.workers import SignalFlags, Supervisor, use_connection_pool, workers_option


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
        parser.add_argument(
            "--workers",
            default="1",
            help="worker processes serving the same listener (default 1; 'auto': one per core), as runpop3's: "
            "POPSERVER_MAX_SESSIONS and POPSERVER_DB_CONNECTIONS are split between them.",
        )

    def handle(self, *args, **options):
        try:
            address = parse_lmtp_address(options["addrport"] or get_setting("LMTP_LISTEN"))
            mode = socket_mode(options["socket_mode"])
        except ValueError as exc:
            raise CommandError(f"Invalid address or mode: {exc}") from None
        try:
            workers = workers_option(options["workers"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        tls = None
        if options["certfile"]:
            try:
                tls = TlsContextHolder(options["certfile"], options["keyfile"])
            except TlsConfigError as exc:
                raise CommandError(f"TLS: {exc}") from None
        elif options["keyfile"]:
            raise CommandError("TLS: --keyfile needs --certfile.")
        for line in connection_budget_warnings():  # W006: this server's budget against max_connections
            self.stderr.write(line)
        if workers == 1:
            self.serve_in_this_process(address, mode, tls)
        else:
            self.serve_with_workers(address, mode, tls, workers)
        self.stdout.write("popserver: stopped.")

    def serve_in_this_process(self, address, mode: int, tls) -> None:
        # Signal handlers only set flags: shutdown() must run outside the serving threads.
        signals = SignalFlags()
        use_connection_pool(worker_share("DB_CONNECTIONS"), get_setting("DB_CONNECTION_WAIT"))
        stop = threading.Event()
        try:
            servers = start_lmtp_servers(
                [address], stop, handler_factory=MailboxDeliveryHandler, tls=tls, socket_mode=mode
            )
        except OSError as exc:
            signals.close()
            raise CommandError(f"Error: {bind_error(address, exc)}") from None
        self.announce([s.display_address for s in servers])
        try:
            signals.wait_for_stop(tls)  # SIGHUP (logrotate, systemctl reload) reloads the certificate
        finally:
            signals.close()
        stop.set()
        stop_servers(servers)

    def serve_with_workers(self, address, mode: int, tls, workers: int) -> None:
        try:
            (bound,) = bind_listeners([address], socket_mode=mode)
        except OSError as exc:
            raise CommandError(f"Error: {bind_error(address, exc)}") from None

        def start(stop_event, room):
            return start_lmtp_servers(
                [],
                stop_event,
                handler_factory=MailboxDeliveryHandler,
                tls=tls,
                sockets=[bound.sock],
                room=room,
            )

        try:
            Supervisor(start, workers, tls=tls).run(lambda: self.announce([bound.display_address], workers))
        finally:
            bound.close()

    def announce(self, addresses: list[str], workers: int = 1) -> None:
        self.stdout.write(
            "popserver: "
            + ", ".join(f"LMTP on {where}" for where in addresses)
            + (f" ({workers} workers)" if workers > 1 else "")
            + ". Quit with CONTROL-C."
        )
        self.stdout.flush()


def bind_error(address, exc: OSError) -> str:
    known = None if isinstance(address, str) else ERRORS.get(exc.errno)  # port wording, for TCP only
    return known or exc.strerror or str(exc)
