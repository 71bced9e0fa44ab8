"""``manage.py runpop3 [ADDR:PORT]``: run the POP3 server in the foreground until SIGINT or SIGTERM."""

import errno
import signal
import threading

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from popserver.conf import get_setting
from popserver.server import metrics
from popserver.server.listener import parse_address, start_servers, stop_servers
from popserver.server.node import NodeHeartbeat, NodeNameInUse, claim_node_name, release_node_name
from popserver.server.tls import TlsConfigError, TlsContextHolder

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
            "--proxy-protocol",
            action="store_true",
            help="every listener expects a PROXY protocol header (v1 or v2, as HAProxy's send-proxy-v2 sends) "
            "from the load balancers in POPSERVER_PROXY_TRUSTED_NETWORKS, and closes other connections.",
        )
        parser.add_argument(
            "--metrics",
            metavar="ADDR:PORT",
            help="serve Prometheus metrics on http://ADDR:PORT/metrics (PORT alone: on 127.0.0.1); needs "
            "the prometheus-client package (pip install 'popserver[metrics]').",
        )

    def handle(self, *args, **options):
        try:
            address = parse_address(options["addrport"] or get_setting("LISTEN"))
            tls_listen = options["tls_port"] or get_setting("TLS_LISTEN")
            tls_addresses = [self.tls_address(tls_listen, address[0])] if tls_listen else []
            metrics_address = self.metrics_address(options["metrics"]) if options["metrics"] else None
        except ValueError as exc:
            raise CommandError(f"Invalid address: {exc}") from None
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

        if options["proxy_protocol"] and not get_setting("PROXY_TRUSTED_NETWORKS"):
            raise CommandError(
                "--proxy-protocol: POPSERVER_PROXY_TRUSTED_NETWORKS is empty, so every connection would be "
                'refused. Set it to your load balancers\' addresses, e.g. ["10.0.0.5/32"].'
            )
        try:
            claim_node_name()  # before anything frees "this node's" dead locks
        except NodeNameInUse as exc:
            raise CommandError(str(exc)) from None
        except DatabaseError as exc:
            raise CommandError(f"Database: {exc} (has 'manage.py migrate' run?)") from None

        self.check_body_storage()
        try:
            metrics_server = self.start_metrics(metrics_address) if metrics_address else None
        except CommandError:
            release_node_name()
            raise
        stop = threading.Event()
        # Signal handlers only set flags: shutdown() must run outside the serving threads.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        reload_requested = threading.Event()
        # SIGHUP (logrotate, systemctl reload) reloads the certificate; without TLS it is ignored, never fatal.
        signal.signal(signal.SIGHUP, lambda *_: reload_requested.set())
        try:
            servers = start_servers(
                [address],
                stop,
                tls=tls,
                implicit_tls_addresses=tls_addresses,
                proxy_protocol=options["proxy_protocol"],
            )
        except OSError as exc:
            release_node_name()
            metrics.disable()
            raise CommandError(f"Error: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None
        NodeHeartbeat(stop).start()
        listening = [f"{'POP3S' if s.implicit_tls else 'POP3'} on {s.display_address}" for s in servers]
        if metrics_server is not None:
            listening.append(f"metrics on http://{metrics_server.display_address}/metrics")
        self.stdout.write("popserver: " + ", ".join(listening) + ". Quit with CONTROL-C.")
        self.stdout.flush()
        while not stop.wait(0.5):
            if reload_requested.is_set():
                reload_requested.clear()
                if tls is not None:
                    tls.reload()
        stop_servers(servers)
        metrics.disable()
        release_node_name()
        self.stdout.write("popserver: stopped.")

    @staticmethod
    def metrics_address(text: str) -> tuple[str, int]:
        text = str(text).strip()
        bare_ipv6 = text.count(":") > 1 and not text.startswith("[")
        if bare_ipv6 or not (text.isdigit() or text.rpartition(":")[2].isdigit()):
            raise ValueError(f"--metrics {text!r} needs a port (ADDR:PORT or PORT)")
        return parse_address(text)

    @staticmethod
    def start_metrics(address: tuple[str, int]) -> metrics.MetricsHttpServer:
        """Metrics before the listeners: the first connection is counted. One process: its own registry."""
        try:
            metrics.enable()
            return metrics.serve(address)
        except metrics.MetricsUnavailable as exc:
            metrics.disable()
            raise CommandError(str(exc)) from None
        except OSError as exc:
            metrics.disable()
            raise CommandError(f"Metrics: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None

    @staticmethod
    def check_body_storage() -> None:
        """Bodies in a Django storage: it must take an object and give it back before we serve (issue 21)."""
        from popserver.checks.bodies import storage_store_selected
        from popserver.storage.bodies import probe_body_storage

        if storage_store_selected():
            problem = probe_body_storage()
            if problem:
                raise CommandError(f"The body storage cannot be used: {problem}")

    @staticmethod
    def tls_address(text: str, default_host: str) -> tuple[str, int]:
        if str(text).isdigit():
            return default_host, int(text)
        return parse_address(str(text), default_port=995)
