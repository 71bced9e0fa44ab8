"""``manage.py runpop3 [ADDR:PORT] [--workers N|auto]``: run the POP3 server in the foreground until SIGINT or
SIGTERM (one process, or N worker processes under a supervisor: ``popserver.server.workers``)."""

import errno
import threading

from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from popserver.checks.database import connection_budget_warnings
from popserver.conf import get_setting, worker_share
from popserver.server import metrics
from popserver.server.listener import bind_listeners, parse_address, start_servers, stop_servers
from popserver.server.node import NodeHeartbeat, NodeNameInUse, claim_node_name, release_node_name
from popserver.server.tls import TlsConfigError, TlsContextHolder
from popserver.server.workers import SignalFlags, Supervisor, use_connection_pool, workers_option

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
            "--workers",
            default="1",
            help="worker processes serving the same listeners (default 1; 'auto': one per core). The "
            "server's limits and POPSERVER_DB_CONNECTIONS are split between them.",
        )
        parser.add_argument(
            "--metrics",
            metavar="ADDR:PORT",
            help="serve Prometheus metrics on http://ADDR:PORT/metrics (PORT alone: on 127.0.0.1), the sums "
            "of every worker; needs the prometheus-client package (pip install 'popserver[metrics]').",
        )

    def handle(self, *args, **options):
        try:
            address = parse_address(options["addrport"] or get_setting("LISTEN"))
            tls_listen = options["tls_port"] or get_setting("TLS_LISTEN")
            tls_addresses = [self.tls_address(tls_listen, address[0])] if tls_listen else []
            metrics_address = self.metrics_address(options["metrics"]) if options["metrics"] else None
        except ValueError as exc:
            raise CommandError(f"Invalid address: {exc}") from None
        try:
            workers = workers_option(options["workers"])
        except ValueError as exc:
            raise CommandError(str(exc)) from None
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
        self.metrics_server = None
        try:
            self.check_body_storage()
            for line in connection_budget_warnings():
                self.stderr.write(line)
            if metrics_address:
                # Before the listeners (the first connection counts) and before any fork (workers inherit
                # the multiprocess directory and write their own files in it).
                self.metrics_server = self.start_metrics(metrics_address, multiprocess=workers > 1)
            if workers == 1:
                self.serve_in_this_process(address, tls_addresses, tls, options["proxy_protocol"])
            else:
                self.serve_with_workers(address, tls_addresses, tls, workers, options["proxy_protocol"])
        finally:
            metrics.disable()
            release_node_name()

    @staticmethod
    def check_body_storage() -> None:
        """Bodies in a Django storage: it must take an object and give it back before we serve (issue 21)."""
        from popserver.checks.bodies import storage_store_selected
        from popserver.storage.bodies import probe_body_storage

        if storage_store_selected():
            problem = probe_body_storage()
            if problem:
                raise CommandError(f"The body storage cannot be used: {problem}")

    def serve_in_this_process(self, address, tls_addresses, tls, proxy_protocol: bool) -> None:
        # Signal handlers only set flags: shutdown() must run outside the serving threads.
        signals = SignalFlags()
        use_connection_pool(worker_share("DB_CONNECTIONS"), get_setting("DB_CONNECTION_WAIT"))
        stop = threading.Event()
        try:
            servers = start_servers(
                [address], stop, tls=tls, implicit_tls_addresses=tls_addresses, proxy_protocol=proxy_protocol
            )
        except OSError as exc:
            signals.close()
            raise CommandError(f"Error: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None
        NodeHeartbeat(stop).start()
        self.announce([(s.display_address, s.implicit_tls) for s in servers])
        try:
            signals.wait_for_stop(tls)  # SIGHUP (logrotate, systemctl reload) reloads the certificate
        finally:
            signals.close()
        stop.set()
        stop_servers(servers)
        self.stdout.write("popserver: stopped.")

    def serve_with_workers(self, address, tls_addresses, tls, workers: int, proxy_protocol: bool) -> None:
        try:
            bound = bind_listeners([address, *tls_addresses])
        except OSError as exc:
            raise CommandError(f"Error: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None
        listeners = [(listener.sock, index > 0) for index, listener in enumerate(bound)]  # then implicit TLS

        def start(stop_event, room):
            return start_servers(
                [], stop_event, tls=tls, sockets=listeners, proxy_protocol=proxy_protocol, room=room
            )

        stop = threading.Event()

        def ready():
            NodeHeartbeat(stop).start()  # the node's claim is the parent's (its pid and instance)
            self.announce([(b.display_address, index > 0) for index, b in enumerate(bound)], workers=workers)

        try:
            Supervisor(start, workers, tls=tls).run(ready)
        finally:
            stop.set()
            for listener in bound:
                listener.close()
        self.stdout.write("popserver: stopped.")

    def announce(self, listeners, workers: int = 1) -> None:
        serving = [f"{'POP3S' if implicit else 'POP3'} on {where}" for where, implicit in listeners]
        if self.metrics_server is not None:
            serving.append(f"metrics on http://{self.metrics_server.display_address}/metrics")
        self.stdout.write(
            "popserver: "
            + ", ".join(serving)
            + (f" ({workers} workers)" if workers > 1 else "")
            + ". Quit with CONTROL-C."
        )
        self.stdout.flush()

    @staticmethod
    def metrics_address(text: str) -> tuple[str, int]:
        text = str(text).strip()
        bare_ipv6 = text.count(":") > 1 and not text.startswith("[")
        if bare_ipv6 or not (text.isdigit() or text.rpartition(":")[2].isdigit()):
            raise ValueError(f"--metrics {text!r} needs a port (ADDR:PORT or PORT)")
        return parse_address(text)

    @staticmethod
    def start_metrics(address: tuple[str, int], *, multiprocess: bool) -> metrics.MetricsHttpServer:
        """One process: its own registry. Workers: prometheus-client's multiprocess mode, served by this
        (the supervising) process from the files of every worker."""
        try:
            metrics.enable(multiprocess=multiprocess)
            return metrics.serve(address)
        except metrics.MetricsUnavailable as exc:
            metrics.disable()
            raise CommandError(str(exc)) from None
        except OSError as exc:
            metrics.disable()
            raise CommandError(f"Metrics: {ERRORS.get(exc.errno, exc.strerror or exc)}") from None

    @staticmethod
    def tls_address(text: str, default_host: str) -> tuple[str, int]:
        if str(text).isdigit():
            return default_host, int(text)
        return parse_address(str(text), default_port=995)
