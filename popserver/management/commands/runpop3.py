"""``manage.py runpop3 [ADDR:PORT]``: run the POP3 server in the foreground until SIGINT or SIGTERM."""
import errno
import signal
import threading

from django.core.management.base import BaseCommand, CommandError

from popserver.conf import get_setting
from popserver.server.listener import parse_address, start_servers

ERRORS = {
    errno.EACCES: "You don't have permission to access that port.",
    errno.EADDRINUSE: "That port is already in use.",
    errno.EADDRNOTAVAIL: "That IP address can't be assigned to.",
}


class Command(BaseCommand):
    help = "Run the POP3 server (default address: POPSERVER_LISTEN, 127.0.0.1:8110)."

    def add_arguments(self, parser):
        parser.add_argument("addrport", nargs="?", help="ADDR:PORT, PORT or [IPv6]:PORT to listen on.")

    def handle(self, *args, **options):
        try:
            address = parse_address(options["addrport"] or get_setting("LISTEN"))
        except ValueError as exc:
            raise CommandError(f"Invalid address: {exc}") from None
        stop = threading.Event()
        # Signal handlers only set the event: shutdown() must run outside the serving threads.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        try:
            servers = start_servers([address], stop)
        except OSError as exc:
            raise CommandError(f"Error: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None
        self.stdout.write(f"popserver: POP3 on {', '.join(s.display_address for s in servers)}. "
                          "Quit with CONTROL-C.")
        self.stdout.flush()
        while not stop.wait(1.0):
            pass
        for server in servers:
            server.stop()
        self.stdout.write("popserver: stopped.")
