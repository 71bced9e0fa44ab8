"""Checks of numeric settings: limits, delays, quotas, timeouts."""

from django.core.checks import Error, Warning, register

from popserver.conf import DEFAULTS, get_setting

POSITIVE_NUMBERS = (
    "MAX_MESSAGE_SIZE",
    "BODY_CHUNK_SIZE",
    "MAX_SESSIONS",
    "MAX_UNAUTHENTICATED_PER_IP",
    "LISTEN_BACKLOG",
    "AUTOLOGOUT",
    "LOGIN_TIMEOUT",
    "MAX_PASSWORD_CHECKS",
    "DB_CONNECTIONS",
    "DB_CONNECTION_WAIT",
    "LOCK_HEARTBEAT",
    "LOCK_STALE_AFTER",
    "THROTTLE_WINDOW",
    "THROTTLE_ACCOUNT_FAILURES",
    "THROTTLE_IP_FAILURES",
    "THROTTLE_LOCKOUT",
    "AUDIT_RETENTION_DAYS",
    "SHUTDOWN_GRACE",
    "PROXY_HEADER_TIMEOUT",
    "LMTP_MAX_RECIPIENTS",
    "LMTP_TIMEOUT",
)
WHOLE_NUMBERS = (
    "MAX_SESSIONS",
    "MAX_UNAUTHENTICATED_PER_IP",
    "LISTEN_BACKLOG",
    "MAX_PASSWORD_CHECKS",
    "LOGIN_DELAY",
    "LMTP_MAX_RECIPIENTS",
)
NON_NEGATIVE_NUMBERS = ("AUTH_FAILURE_DELAY", "LOGIN_DELAY", "PRELOGIN_PENALTY", "PRELOGIN_PENALTY_MAX")
QUOTAS = ("QUOTA_BYTES", "QUOTA_MESSAGES")  # whole numbers; 0 is unlimited
MAX_CHUNK_SIZE = 8 * 1024 * 1024  # MariaDB's default max_allowed_packet is 16 MiB


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


@register()
def check_positive_numbers(app_configs=None, **kwargs):
    return [
        Error(
            f"POPSERVER_{name} must be a positive number, not {value!r}.",
            hint=f"Remove it to use the default, {DEFAULTS[name]!r}.",
            id="popserver.E001",
        )
        for name in POSITIVE_NUMBERS
        if not _is_number(value := get_setting(name)) or value <= 0
    ]


@register()
def check_whole_numbers(app_configs=None, **kwargs):
    return [
        Error(f"POPSERVER_{name} must be a whole number, not {value!r}.", id="popserver.E012")
        for name in WHOLE_NUMBERS
        if _is_number(value := get_setting(name)) and not isinstance(value, int)
    ]


@register()
def check_delays(app_configs=None, **kwargs):
    return [
        Error(f"POPSERVER_{name} must be a number >= 0, not {value!r}.", id="popserver.E007")
        for name in NON_NEGATIVE_NUMBERS
        if not _is_number(value := get_setting(name)) or value < 0
    ]


# Mail clients give up on a greeting that does not come: Outlook after 60 s by default (Thunderbird 100 s).
CLIENT_GREETING_PATIENCE = 60


@register()
def check_prelogin_penalty(app_configs=None, **kwargs):
    first, longest = get_setting("PRELOGIN_PENALTY"), get_setting("PRELOGIN_PENALTY_MAX")
    if not (_is_number(first) and _is_number(longest)) or first <= 0:
        return []  # E007 speaks of values that are not numbers; 0 turns penalties off
    if longest < first:
        return [
            Error(
                f"POPSERVER_PRELOGIN_PENALTY_MAX ({longest!r}) is below POPSERVER_PRELOGIN_PENALTY ({first!r}).",
                hint="The first penalty doubles up to the longest: make the longest at least the first.",
                id="popserver.E060",
            )
        ]
    if longest > CLIENT_GREETING_PATIENCE:
        return [
            Warning(
                f"POPSERVER_PRELOGIN_PENALTY_MAX is {longest!r} seconds: a mail client sharing an address with "
                f"an abuser gives up waiting for the greeting after about {CLIENT_GREETING_PATIENCE} seconds.",
                hint="Dovecot's penalties stop at 15 seconds.",
                id="popserver.W060",
            )
        ]
    return []


@register()
def check_quotas(app_configs=None, **kwargs):
    return [
        Error(
            f"POPSERVER_{name} must be a whole number >= 0 (0: unlimited), not {value!r}.",
            id="popserver.E008",
        )
        for name in QUOTAS
        if isinstance(value := get_setting(name), bool) or not isinstance(value, int) or value < 0
    ]


@register()
def check_quota_warnings(app_configs=None, **kwargs):
    shares = get_setting("QUOTA_WARNINGS")
    if isinstance(shares, list | tuple) and all(_is_number(share) and 0 < share <= 100 for share in shares):
        return []
    return [
        Error(
            f"POPSERVER_QUOTA_WARNINGS must be a list of percentages over 0 and up to 100, not {shares!r}.",
            hint="e.g. [80, 95]; [] for no warnings.",
            id="popserver.E016",
        )
    ]


@register()
def check_autologout(app_configs=None, **kwargs):
    autologout = get_setting("AUTOLOGOUT")
    if _is_number(autologout) and 0 < autologout < 600:
        return [
            Warning(
                f"POPSERVER_AUTOLOGOUT is {autologout} seconds; RFC 1939 s.3 requires at least 10 minutes.",
                id="popserver.W002",
            )
        ]
    return []


@register()
def check_chunk_size(app_configs=None, **kwargs):
    size = get_setting("BODY_CHUNK_SIZE")
    if not isinstance(size, int) or size > MAX_CHUNK_SIZE:
        return [
            Warning(
                "POPSERVER_BODY_CHUNK_SIZE over 8 MiB may exceed MariaDB's max_allowed_packet.",
                id="popserver.W003",
            )
        ]
    return []


@register()
def check_retention(app_configs=None, **kwargs):
    messages = []
    keep = get_setting("KEEP_DELETED_DAYS")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        messages.append(
            Error(
                f"POPSERVER_KEEP_DELETED_DAYS must be a whole number >= 0, not {keep!r}.", id="popserver.E010"
            )
        )
    expire = get_setting("EXPIRE_RETRIEVED_DAYS")
    if expire is not None and (isinstance(expire, bool) or not isinstance(expire, int) or expire < 0):
        messages.append(
            Error(
                f"POPSERVER_EXPIRE_RETRIEVED_DAYS must be None (never) or a whole number >= 0, not {expire!r}.",
                id="popserver.E010",
            )
        )
    return messages
