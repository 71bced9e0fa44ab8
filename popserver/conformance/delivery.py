"""Putting known messages into the mailbox under test: an MDA command, LMTP or SMTP.

``--deliver-command`` hands the corpus to an MDA byte for byte (``manage.py deliver {user}``, ``dovecot-lda
-d {user}``, ``procmail``), so stored messages keep a missing final newline or bare LFs. LMTP and SMTP
(RFC 2033, RFC 5321) cannot carry those: the kit sends CRLF lines with a final CRLF, and an MTA may add
trace fields on top; the byte checks allow for both.
"""

from __future__ import annotations

import shlex
import smtplib
import subprocess

from popserver.conformance.corpus import smtp_form


class DeliveryError(Exception):
    pass


class Deliverer:
    """Delivers one message to the mailbox under test; ``deliver()`` returns once it is accepted."""

    name = "deliverer"
    preserves_raw = True  # stored as given (an MDA), so an unterminated last line stays unterminated
    synchronous = True  # accepted means stored (not queued for later)

    def deliver(self, message: bytes) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class CommandDeliverer(Deliverer):
    """Runs ``template`` (split like a shell line, no shell) with the message on standard input.

    ``{user}`` and ``{recipient}`` in the template become the POP3 user and the recipient address."""

    name = "command"

    def __init__(self, template: str, user: str, recipient: str, timeout: float = 120):
        self.template = template
        self.argv = [
            arg.replace("{user}", user).replace("{recipient}", recipient) for arg in shlex.split(template)
        ]
        if not self.argv:
            raise DeliveryError("the delivery command is empty")
        self.timeout = timeout

    def deliver(self, message: bytes) -> None:
        try:
            result = subprocess.run(
                self.argv, input=message, capture_output=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            raise DeliveryError(f"delivery command not found: {self.argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise DeliveryError(f"the delivery command ran over {self.timeout:g} s") from None
        if result.returncode != 0:
            error = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise DeliveryError(
                f"the delivery command exited {result.returncode}: {error[-1] if error else '(no output)'}"
            )

    def describe(self) -> str:
        return f"command {self.template!r}"


class SmtpDeliverer(Deliverer):
    """SMTP (RFC 5321) or LMTP (RFC 2033) to ``host:port`` (LMTP also to a Unix socket path)."""

    preserves_raw = False

    def __init__(self, address: str, recipient: str, sender: str, lmtp: bool = False, timeout: float = 60):
        self.address = address
        self.recipient = recipient
        self.sender = sender
        self.lmtp = lmtp
        self.timeout = timeout
        self.name = "LMTP" if lmtp else "SMTP"
        self.synchronous = lmtp  # an SMTP server may queue; an LMTP server answers once it has stored
        self.host, self.port = parse_host_port(address, 24 if lmtp else 25, allow_path=lmtp)

    def deliver(self, message: bytes) -> None:
        data = smtp_form(message)
        try:
            if self.lmtp:
                client = smtplib.LMTP(self.host, self.port or 0, timeout=self.timeout)
            else:
                client = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        except OSError as exc:
            raise DeliveryError(f"cannot connect to {self.name} at {self.address}: {exc}") from None
        try:
            client.ehlo_or_helo_if_needed()
            options = ["BODY=8BITMIME"] if client.has_extn("8bitmime") else []
            refused = client.sendmail(self.sender, [self.recipient], data, mail_options=options)
            if refused:
                raise DeliveryError(f"{self.name} refused {self.recipient}: {refused}")
        except smtplib.SMTPException as exc:
            raise DeliveryError(f"{self.name} delivery failed: {exc}") from None
        except OSError as exc:
            raise DeliveryError(f"{self.name} connection failed: {exc}") from None
        finally:
            try:
                client.quit()
            except (smtplib.SMTPException, OSError):
                client.close()

    def describe(self) -> str:
        return f"{self.name} to {self.address} (RCPT TO:<{self.recipient}>)"


def parse_host_port(text: str, default_port: int, allow_path: bool = False) -> tuple[str, int | None]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``HOST`` (default port), or a Unix socket path if allowed."""
    if allow_path and text.startswith("/"):
        return text, None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()):
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port) if port else default_port
