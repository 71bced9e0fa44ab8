"""System checks for popserver's settings, with stable ids.

Errors only where the server truly cannot run; everything else is a warning, so a stock ``startproject`` site
(PBKDF2 first) starts. Server-only resources (certificates) are checked when ``runpop3`` starts, not here.
"""
import ipaddress

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.utils.module_loading import import_string

from .conf import DEFAULTS, get_setting

POSITIVE_NUMBERS = (
    "MAX_MESSAGE_SIZE",
    "BODY_CHUNK_SIZE",
    "MAX_SESSIONS",
    "MAX_UNAUTHENTICATED_PER_IP",
    "LISTEN_BACKLOG",
    "AUTOLOGOUT",
    "LOGIN_TIMEOUT",
    "MAX_PASSWORD_CHECKS",
    "LOCK_HEARTBEAT",
    "LOCK_STALE_AFTER",
    "THROTTLE_WINDOW",
    "THROTTLE_ACCOUNT_FAILURES",
    "THROTTLE_IP_FAILURES",
    "THROTTLE_LOCKOUT",
    "AUDIT_RETENTION_DAYS",
    "PROXY_HEADER_TIMEOUT",
)


@register()
def check_settings(app_configs=None, **kwargs):
    messages = []
    for name in POSITIVE_NUMBERS:
        value = get_setting(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            messages.append(
                Error(
                    f"POPSERVER_{name} must be a positive number, not {value!r}.",
                    hint=f"Remove it to use the default, {DEFAULTS[name]!r}.",
                    id="popserver.E001",
                )
            )
    for name in ("AUTH_FAILURE_DELAY", "LOGIN_DELAY"):
        value = get_setting(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            messages.append(Error(f"POPSERVER_{name} must be a number >= 0, not {value!r}.", id="popserver.E001"))
    for name in ("QUOTA_BYTES", "QUOTA_MESSAGES"):  # whole numbers; 0 is unlimited
        value = get_setting(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            messages.append(Error(f"POPSERVER_{name} must be a whole number >= 0 (0: unlimited), not {value!r}.",
                                  id="popserver.E001"))
    messages += check_mail_fallback_backend()
    accepted = get_setting("ACCEPTED_PASSWORDS")
    if accepted not in ("account", "app", "both"):
        messages.append(Error(f"POPSERVER_ACCEPTED_PASSWORDS must be 'account', 'app' or 'both', not {accepted!r}.",
                              id="popserver.E005"))
    try:
        for network in get_setting("TRUSTED_NETWORKS"):
            ipaddress.ip_network(network, strict=False)
    except (TypeError, ValueError) as exc:
        messages.append(Error(f"POPSERVER_TRUSTED_NETWORKS is not a list of networks: {exc}", id="popserver.E002"))
    messages += check_proxy_and_node()
    if not isinstance(get_setting("BODY_CHUNK_SIZE"), int) or get_setting("BODY_CHUNK_SIZE") > 8 * 1024 * 1024:
        messages.append(Warning("POPSERVER_BODY_CHUNK_SIZE over 8 MiB may exceed MariaDB's max_allowed_packet.",
                                id="popserver.W003"))
    autologout = get_setting("AUTOLOGOUT")
    if isinstance(autologout, int | float) and 0 < autologout < 600:
        messages.append(
            Warning(
                f"POPSERVER_AUTOLOGOUT is {autologout} seconds; RFC 1939 s.3 requires at least 10 minutes.",
                id="popserver.W002",
            )
        )
    policy = get_setting("PLAINTEXT_AUTH")
    if policy not in ("trusted", "always", "never"):
        messages.append(
            Error(
                f"POPSERVER_PLAINTEXT_AUTH must be 'trusted', 'always' or 'never', not {policy!r}.",
                id="popserver.E003",
            )
        )
    elif policy == "always":
        messages.append(
            Warning(
                "POPSERVER_PLAINTEXT_AUTH = 'always': passwords are accepted in the clear from any network.",
                hint="Use 'trusted' (the default) and give runpop3 a certificate for STLS and POP3S.",
                id="popserver.W004",
            )
        )
    messages += check_throttle_cache()
    hashers = getattr(settings, "PASSWORD_HASHERS", [])
    if hashers and not hashers[0].endswith(("Argon2PasswordHasher",)):
        messages.append(
            Warning(
                "Argon2 is not the first of PASSWORD_HASHERS: POP3 passwords are hashed with "
                f"{hashers[0].rsplit('.', 1)[-1]}.",
                hint="Put 'django.contrib.auth.hashers.Argon2PasswordHasher' first.",
                id="popserver.W001",
            )
        )
    return messages


# Caches that live inside one process: every runpop3 process would count failures on its own.
PROCESS_LOCAL_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)


def check_throttle_cache() -> list:
    if not str(get_setting("THROTTLE")).endswith("CacheThrottle"):
        return []
    alias = get_setting("THROTTLE_CACHE")
    backend = getattr(settings, "CACHES", {}).get(alias, {}).get("BACKEND")
    if backend is None:
        return [Error(f"POPSERVER_THROTTLE_CACHE names the cache {alias!r}, which CACHES does not define.",
                      id="popserver.E004")]
    if backend in PROCESS_LOCAL_CACHES:
        return [
            Warning(
                f"The throttle cache {alias!r} ({backend.rsplit('.', 1)[-1]}) is not shared between processes: "
                "each runpop3 process counts failed logins on its own.",
                hint="Use Redis or Memcached, or the database throttle (the default).",
                id="popserver.W005",
            )
        ]
    return []


def check_mail_fallback_backend() -> list:
    path = get_setting("MAIL_FALLBACK_BACKEND")
    if not path:
        return []
    try:
        import_string(path)
    except ImportError as exc:
        return [Error(f"POPSERVER_MAIL_FALLBACK_BACKEND {path!r} cannot be imported: {exc}", id="popserver.E006")]
    if path == "popserver.mail.LocalDeliveryBackend":
        return [Error("POPSERVER_MAIL_FALLBACK_BACKEND cannot be LocalDeliveryBackend itself.", id="popserver.E006")]
    return []


def check_proxy_and_node() -> list:
    """POPSERVER_PROXY_TRUSTED_NETWORKS must be CIDRs (a typo would refuse every proxied client, or trust a
    network nobody meant); POPSERVER_NODE_NAME one printable word (it goes into log lines and lock rows)."""
    messages = []
    networks = get_setting("PROXY_TRUSTED_NETWORKS")
    try:
        if isinstance(networks, str):
            raise TypeError("a string, not a list")
        for network in networks:
            ipaddress.ip_network(network, strict=False)
    except (TypeError, ValueError) as exc:
        messages.append(
            Error(
                f"POPSERVER_PROXY_TRUSTED_NETWORKS is not a list of networks: {exc}",
                hint='For example ["10.0.0.5/32", "2001:db8::/64"]: the addresses of your load balancers.',
                id="popserver.E007",
            )
        )
    name = get_setting("NODE_NAME")
    if not isinstance(name, str) or len(name) > 64 or any(not ch.isprintable() or ch.isspace() for ch in name):
        messages.append(
            Error(
                f"POPSERVER_NODE_NAME must be at most 64 printable characters without spaces, not {name!r}.",
                hint="Leave it empty to use the host name.",
                id="popserver.E008",
            )
        )
    return messages
