"""``manage.py runpop3 [ADDR:PORT] [--workers N|auto]``: run the POP3 server in the foreground until SIGINT or
SIGTERM (one process, or N worker processes under a supervisor: ``popserver.server.workers``)."""

import errno
import threading

from django.core.checks import Warning as CheckWarning
from django.core.management.base import BaseCommand, CommandError

from popserver.checks.database import check_connection_budget
from popserver.conf import get_setting, worker_share
from popserver.server.listener import bind_listener, parse_address, start_servers, stop_servers
from popserver.server.tls import TlsConfigError, TlsContextHolder
from popserver.server.workers import SignalFlags, Supervisor, parse_workers, use_connection_pool

ERRORS = {
    errno.EACCES: "You don't have permission to access that port.",
    errno.EADDRINUSE: "That port is already in use.",
    errno.EADDRNOTAVAIL: "That IP address can't be assigned to.",
}


class Command(BaseCommand):
    help = "Run the POP3 server (default address: POPSERVER_LISTEN, 127.0.0.1:8110)."

    def add_arguments(self, parser):
        parser.add_argument("addrport", nargs="?", help="ADDR:PORT, PORT or [IPv6]:PORT to listen on.")
        parser.add_argument("--certfile", help="PEM certificate (chain): enables STLS (RFC 2595).")
        parser.add_argument("--keyfile", help="PEM private key, if not in the certificate file.")
        parser.add_argument(
            "--tls-port",
            help="also listen with implicit TLS (RFC 8314; 995 by convention) on PORT or ADDR:PORT.",
        )
        parser.add_argument(
            "--workers",
            default="1",
            help="worker processes serving the same listeners (default 1; 'auto': one per core). The "
            "server's limits and POPSERVER_DB_CONNECTIONS are split between them.",
        )

    def handle(self, *args, **options):
        try:
            address = parse_address(options["addrport"] or get_setting("LISTEN"))
            tls_listen = options["tls_port"] or get_setting("TLS_LISTEN")
            tls_addresses = [self.tls_address(tls_listen, address[0])] if tls_listen else []
        except ValueError as exc:
            raise CommandError(f"Invalid address: {exc}") from None
        try:
            workers = parse_workers(options["workers"])
        except ValueError:
            raise CommandError(f"--workers: {options['workers']!r} is not a number >= 1 or 'auto'.") from None
        if workers > get_setting("DB_CONNECTIONS"):
            raise CommandError(
                f"--workers {workers}: POPSERVER_DB_CONNECTIONS ({get_setting('DB_CONNECTIONS')}) is the budget of "
                "all workers together, and each needs at least one connection."
            )
        certfile = options["certfile"] or get_setting("TLS_CERTFILE")
        keyfile = options["keyfile"] or get_setting("TLS_KEYFILE")
        tls = None
        if certfile:
            try:
                tls = TlsContextHolder(certfile, keyfile)
            except TlsConfigError as exc:
                raise CommandError(f"TLS: {exc}") from None
        elif tls_addresses or keyfile:
            raise CommandError("TLS: --tls-port and --keyfile need --certfile (or POPSERVER_TLS_CERTFILE).")
        for warning in check_connection_budget(databases=["default"]):
            if isinstance(warning, CheckWarning):
                self.stderr.write(f"{warning.id}: {warning.msg} {warning.hint or ''}".strip())
        if workers == 1:
            self.serve_in_this_process(address, tls_addresses, tls)
        else:
            self.serve_with_workers(address, tls_addresses, tls, workers)

    def serve_in_this_process(self, address, tls_addresses, tls) -> None:
        # Signal handlers only set flags: shutdown() must run outside the serving threads.
        signals = SignalFlags()
        use_connection_pool(worker_share("DB_CONNECTIONS"), get_setting("DB_CONNECTION_WAIT"))
        stop = threading.Event()
        try:
            servers = start_servers([address], stop, tls=tls, implicit_tls_addresses=tls_addresses)
        except OSError as exc:
            signals.close()
            raise CommandError(f"Error: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None
        self.announce([(s.display_address, s.implicit_tls) for s in servers])
        # SIGHUP (logrotate, systemctl reload) reloads the certificate; without TLS it is ignored, never fatal.
        try:
            while not signals.stop_requested:
                signals.wait(0.5)
                if signals.take_reload() and tls is not None:
                    tls.reload()
        finally:
            signals.close()
        stop_servers(servers)
        self.stdout.write("popserver: stopped.")

    def serve_with_workers(self, address, tls_addresses, tls, workers: int) -> None:
        listeners = []
        try:
            for listen, implicit_tls in [(address, False)] + [(a, True) for a in tls_addresses]:
                listeners.append((bind_listener(listen), implicit_tls))
        except OSError as exc:
            for sock, _ in listeners:
                sock.close()
            raise CommandError(f"Error: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None
        supervisor = Supervisor(listeners, workers, tls=tls)

        def ready():
            self.announce([(display(sock), implicit) for sock, implicit in listeners], workers=workers)

        supervisor.run(ready)
        for sock, _ in listeners:
            sock.close()
        self.stdout.write("popserver: stopped.")

    def announce(self, listeners, workers: int = 1) -> None:
        self.stdout.write(
            "popserver: "
            + ", ".join(f"{'POP3S' if implicit else 'POP3'} on {where}" for where, implicit in listeners)
            + (f" ({workers} workers)" if workers > 1 else "")
            + ". Quit with CONTROL-C."
        )
        self.stdout.flush()

    @staticmethod
    def tls_address(text: str, default_host: str) -> tuple[str, int]:
        if str(text).isdigit():
            return default_host, int(text)
        return parse_address(str(text), default_port=995)


def display(sock) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
