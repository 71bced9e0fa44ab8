"""TLS for runpop3: one server context, loaded at start and reloaded on SIGHUP (ACME clients rotate
certificates). RFC 8314 (implicit TLS) and RFC 2595 s.4 (STLS) both use it."""

from __future__ import annotations

import logging
import ssl
import threading

logger = logging.getLogger("popserver.server")

# A client that connects and never finishes its handshake is dropped after this long (seconds).
HANDSHAKE_TIMEOUT = 30.0


class TlsConfigError(Exception):
    """The certificate or key cannot be used: a one-line reason for the operator."""


def load_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server context with Python's defaults and TLS 1.2 or newer."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile or None)
    except FileNotFoundError as exc:
        raise TlsConfigError(f"certificate or key not found: {exc.filename or certfile}") from None
    except PermissionError as exc:
        raise TlsConfigError(f"certificate or key not readable: {exc.filename or certfile}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(
            f"cannot load certificate {certfile} / key {keyfile or certfile}: {exc}"
        ) from None
    return context


class TlsContextHolder:
    """The current context; ``reload()`` swaps it for new connections, keeping the old one on failure."""

    def __init__(self, certfile: str, keyfile: str | None = None):
        self.certfile, self.keyfile = certfile, keyfile
        self._context = load_context(certfile, keyfile)
        self._guard = threading.Lock()

    @property
    def context(self) -> ssl.SSLContext:
        with self._guard:
            return self._context

    def reload(self) -> bool:
        try:
            context = load_context(self.certfile, self.keyfile)
        except TlsConfigError as exc:
            logger.error("TLS reload failed, keeping the previous certificate: %s", exc)
            return False
        with self._guard:
            self._context = context
        logger.info("TLS certificate reloaded from %s", self.certfile)
        return True
