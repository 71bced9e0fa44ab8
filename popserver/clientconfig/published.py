"""What the site publishes to mail clients, per mail domain, read from settings at call time.

Nothing here looks at a request: the host names, ports and security come from ``POPSERVER_PUBLIC_HOSTNAME``,
``POPSERVER_PUBLIC_ENDPOINTS``, ``POPSERVER_DOMAINS`` and ``POPSERVER_OUTGOING_SERVER``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from django.contrib.auth import get_user_model

from ..conf import get_setting
from ..models import Address, Mailbox

SECURITIES = ("tls", "starttls", "none")
SECURITY_LABELS = {"tls": "SSL/TLS", "starttls": "STARTTLS", "none": "none (no encryption)"}
DOMAIN_OVERRIDES = ("hostname", "endpoints", "outgoing_server", "provider_name")


class SettingsError(ValueError):
    """A client-configuration setting that cannot be read (the system check ``popserver.E180`` says which)."""


@dataclass(frozen=True)
class Endpoint:
    """One listener as clients should reach it."""

    host: str
    port: int
    security: str  # "tls" (implicit TLS), "starttls" or "none"
    authentication: str = "password"  # outgoing servers only: "password" or "none"

    @property
    def security_label(self) -> str:
        """As mail clients' account dialogs name it."""
        return SECURITY_LABELS[self.security]

    @property
    def is_loopback(self) -> bool:
        """A name or address that never leaves the machine (RFC 6761 s.6.3 for ``localhost``)."""
        host = self.host.lower().strip("[]")
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost" or host.endswith(".localhost")


@dataclass(frozen=True)
class DomainConfig:
    """Everything published for one mail domain (``domain`` None: the site-wide settings, for a user
    without an address)."""

    domain: str | None
    provider_name: str
    endpoints: tuple[Endpoint, ...]
    outgoing: Endpoint | None
    leave_setting: bool | None  # POPSERVER_LEAVE_MESSAGES_ON_SERVER
    expire_days: int | None  # the retention policy: retrieved messages are deleted after this (None: never)

    @property
    def leave_messages_on_server(self) -> bool:
        """What clients are told: never when the server deletes what is retrieved (EXPIRE 0); by default
        (the setting None) exactly when retrieved mail expires after some days."""
        if self.expire_days == 0:
            return False
        if self.leave_setting is None:
            return bool(self.expire_days)
        return self.leave_setting

    @property
    def days_to_leave_messages(self) -> int | None:
        """Thunderbird's ``daysToLeaveMessagesOnServer``: the retention policy's days, when messages stay."""
        return self.expire_days if self.leave_messages_on_server and self.expire_days else None

    @property
    def preferred(self) -> Endpoint | None:
        """The endpoint for clients that take only one (Apple's profile): the first implicit-TLS one, else
        the first."""
        return next(
            (e for e in self.endpoints if e.security == "tls"), self.endpoints[0] if self.endpoints else None
        )


def _endpoint(raw: Any, default_host: str, what: str, *, outgoing: bool = False) -> Endpoint:
    if not isinstance(raw, dict):
        raise SettingsError(f"{what} must be a dict with 'port' and 'security', not {raw!r}")
    port, security = raw.get("port"), raw.get("security")
    host = raw.get("host") or default_host
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SettingsError(f"{what}: 'port' must be a number from 1 to 65535, not {port!r}")
    if security not in SECURITIES:
        raise SettingsError(f"{what}: 'security' must be one of {', '.join(SECURITIES)}, not {security!r}")
    if not isinstance(host, str):
        raise SettingsError(f"{what}: 'host' must be a string, not {host!r}")
    authentication = raw.get("authentication", "password")
    if outgoing and authentication not in ("password", "none"):
        raise SettingsError(f"{what}: 'authentication' must be 'password' or 'none', not {authentication!r}")
    unknown = set(raw) - {"host", "port", "security"} - ({"authentication"} if outgoing else set())
    if unknown:
        raise SettingsError(f"{what}: unknown keys {sorted(unknown)}")
    return Endpoint(
        host=host.strip().rstrip("."),
        port=port,
        security=security,
        authentication=authentication if outgoing else "password",
    )


def domains_setting() -> dict[str, dict] | None:
    """POPSERVER_DOMAINS as {lower-case domain: overrides}, or None (the domains of mailbox addresses)."""
    raw = get_setting("DOMAINS")
    if raw is None:
        return None
    if isinstance(raw, list | tuple):
        raw = {name: {} for name in raw}
    if not isinstance(raw, dict):
        raise SettingsError(f"POPSERVER_DOMAINS must be None, a list of domains or a dict, not {raw!r}")
    domains = {}
    for name, overrides in raw.items():
        if not isinstance(name, str) or not name.strip() or "@" in name:
            raise SettingsError(f"POPSERVER_DOMAINS: {name!r} is not a domain")
        overrides = overrides or {}
        if not isinstance(overrides, dict) or set(overrides) - set(DOMAIN_OVERRIDES):
            raise SettingsError(f"POPSERVER_DOMAINS[{name!r}] may only set {', '.join(DOMAIN_OVERRIDES)}")
        domains[normalize_domain(name)] = overrides
    return domains


def normalize_domain(domain: str) -> str:
    return domain.strip().rstrip(".").lower()


def domain_of(address: str) -> str:
    return normalize_domain(address.rpartition("@")[2]) if "@" in address else ""


def build_config(domain: str | None, overrides: dict | None = None) -> DomainConfig:
    """The published configuration for ``domain`` with its overrides (no check that it is served)."""
    overrides = overrides or {}
    hostname = overrides.get("hostname", get_setting("PUBLIC_HOSTNAME")) or ""
    if not isinstance(hostname, str):
        raise SettingsError(f"the public host name must be a string, not {hostname!r}")
    hostname = hostname.strip().rstrip(".")
    raw_endpoints = overrides.get("endpoints", get_setting("PUBLIC_ENDPOINTS"))
    if not isinstance(raw_endpoints, list | tuple):
        raise SettingsError(f"POPSERVER_PUBLIC_ENDPOINTS must be a list, not {raw_endpoints!r}")
    endpoints = tuple(_endpoint(raw, hostname, "POPSERVER_PUBLIC_ENDPOINTS") for raw in raw_endpoints)
    endpoints = tuple(e for e in endpoints if e.host)  # without any host name nothing is published
    raw_outgoing = overrides.get("outgoing_server", get_setting("OUTGOING_SERVER"))
    outgoing = None
    if raw_outgoing:
        outgoing = _endpoint(raw_outgoing, "", "POPSERVER_OUTGOING_SERVER", outgoing=True)
        if not outgoing.host:
            raise SettingsError("POPSERVER_OUTGOING_SERVER needs a 'host'")
    leave = get_setting("LEAVE_MESSAGES_ON_SERVER")
    if leave not in (None, True, False):
        raise SettingsError(f"POPSERVER_LEAVE_MESSAGES_ON_SERVER must be None, True or False, not {leave!r}")
    expire = get_setting("EXPIRE_RETRIEVED_DAYS")  # validated by its own check (E010)
    provider = overrides.get("provider_name") or get_setting("PROVIDER_NAME") or domain or hostname
    return DomainConfig(
        domain=domain,
        provider_name=str(provider),
        endpoints=endpoints,
        outgoing=outgoing,
        leave_setting=leave,
        expire_days=expire
        if isinstance(expire, int) and not isinstance(expire, bool) and expire >= 0
        else None,
    )


def domain_config(domain: str | None) -> DomainConfig | None:
    """What is published for mail ``domain``; None when the site does not serve that domain or publishes
    nothing. ``domain`` None: the site-wide settings (for a user without a mailbox address)."""
    if domain is None:
        config = build_config(None)
        return config if config.endpoints else None
    domain = normalize_domain(domain)
    if not domain:
        return None
    domains = domains_setting()
    if domains is None:
        if not domain_has_mailboxes(domain):
            return None
        overrides = {}
    elif domain in domains:
        overrides = domains[domain]
    else:
        return None
    config = build_config(domain, overrides)
    return config if config.endpoints else None


def domain_has_mailboxes(domain: str) -> bool:
    """True if an address of some mailbox (or a login name that is an address) is in ``domain``."""
    suffix = "@" + domain
    if Address.objects.filter(address__iendswith=suffix).exists():
        return True
    field = get_user_model().USERNAME_FIELD
    return Mailbox.objects.filter(**{f"user__{field}__iendswith": suffix}).exists()


def served_domains() -> list[str]:
    """Every mail domain the site publishes a configuration for, sorted."""
    domains = domains_setting()
    if domains is not None:
        return sorted(domains)
    found = {domain_of(address) for address in Address.objects.values_list("address", flat=True)}
    field = get_user_model().USERNAME_FIELD
    logins = Mailbox.objects.filter(**{f"user__{field}__contains": "@"}).values_list(
        f"user__{field}", flat=True
    )
    found.update(domain_of(str(login)) for login in logins)
    return sorted(d for d in found if d)
