"""popserver's settings: every ``POPSERVER_*`` name with its default, read at call time.

Use ``get_setting("MAX_MESSAGE_SIZE")``; never read ``django.conf.settings.POPSERVER_*`` elsewhere, and
never write defaults into ``settings`` (tests change settings with ``override_settings``).
"""

import socket
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

MiB = 1024 * 1024

DEFAULTS: dict[str, Any] = {
    # Delivery
    "MAX_MESSAGE_SIZE": 64 * MiB,  # octets; larger messages are refused (deliver exits 69)
    "AUTO_CREATE_MAILBOX": False,  # create a user's mailbox on first delivery or first POP3 login
    "BODY_STORE": "popserver.storage.bodies.DatabaseBodyStore",
    "BODY_CHUNK_SIZE": 1 * MiB,  # rows of message bytes; MariaDB's default packet limit is 16 MiB
    # The STORAGES alias that holds bodies with popserver.storage.bodies.DjangoStorageBodyStore (and those
    # moved there by popmovebodies); never the default storage, whose files a site may serve.
    "BODY_STORAGE": "popserver",
    "BODY_GC_GRACE": 3600,  # seconds: popgc leaves an object nothing refers to alone this long (a delivery)
    # Quotas, for every mailbox whose own limit is empty (a mailbox's 0 means unlimited). 0: unlimited.
    "QUOTA_BYTES": 0,  # octets of all a mailbox's messages (sizes as LIST shows them)
    "QUOTA_MESSAGES": 0,  # messages in a mailbox
    "QUOTA_EXCEEDED_PERMANENT": False,  # over quota, deliver exits 69 (the MTA bounces) instead of 75 (retries)
    # Shares of a limit (percent) whose upward crossing by a delivery warns: a message into the mailbox
    # (templates popserver/quota_warning*.txt) and the quota_warning signal. []: no warnings.
    "QUOTA_WARNINGS": [80, 95],
    "QUOTA_WARNING_MESSAGE": True,  # False: the signal only (a site that notifies its users otherwise)
    # The email backend popserver.mailin.email_backend.LocalDeliveryBackend: a dotted path of the backend for recipients
    # without a local mailbox (e.g. "django.core.mail.backends.smtp.EmailBackend"); None: they are refused.
    "MAIL_FALLBACK_BACKEND": None,
    # Listener
    "LISTEN": "127.0.0.1:8110",
    "MAX_SESSIONS": 64,  # concurrent sessions per server (split across its workers)
    "MAX_UNAUTHENTICATED_PER_IP": 16,  # over it, the IP's oldest unauthenticated connection is dropped
    # Database connections one runpop3 holds at most, all its workers together (each gets an equal share);
    # a session holds one only while it runs queries, and waits at most DB_CONNECTION_WAIT seconds for one.
    "DB_CONNECTIONS": 20,
    "DB_CONNECTION_WAIT": 10,
    # PostgreSQL: the hot statements of logins, QUIT and delivery are prepared on the server once per connection.
    # False behind a pooler that cannot keep prepared statements (PgBouncer in transaction mode before 1.21, or
    # without max_prepared_statements).
    "DB_PREPARED_STATEMENTS": True,
    "LISTEN_BACKLOG": 128,
    # An address whose client was cut for abuse before login (over the budget of 50 commands, 3 bad commands
    # in a row, an endless line) has its next connections held, unanswered, this many seconds, doubled at
    # each new offence up to PRELOGIN_PENALTY_MAX (Dovecot's auth penalty: 2, 4, 8, 15). 0: no penalty.
    # Never for TRUSTED_NETWORKS.
    "PRELOGIN_PENALTY": 2.0,
    "PRELOGIN_PENALTY_MAX": 15.0,
    # Timeouts (seconds)
    "AUTOLOGOUT": 600,  # idle time per line after login; RFC 1939 s.3: at least 10 minutes
    "LOGIN_TIMEOUT": 180,  # whole time allowed before login (Dovecot: 3 minutes)
    "SHUTDOWN_GRACE": 5,  # seconds to wait for sessions to end at SIGTERM
    # Passwords
    "MAX_PASSWORD_CHECKS": 2,  # concurrent authenticate() calls per server (argon2: ~100 MiB each)
    "AUTH_FAILURE_DELAY": 2.0,  # seconds before answering a failed login (Dovecot's auth_failure_delay)
    "TRUSTED_NETWORKS": ["127.0.0.0/8", "::1/128"],
    # "trusted": passwords in the clear only over TLS or from TRUSTED_NETWORKS (Dovecot's default);
    # "always": also from anywhere without TLS (a system check warns); "never": TLS required everywhere.
    "PLAINTEXT_AUTH": "trusted",
    # TLS (runpop3 --certfile/--keyfile/--tls-port override these)
    "TLS_CERTFILE": "",
    "TLS_KEYFILE": "",
    "TLS_LISTEN": "",  # e.g. "0.0.0.0:995": an implicit-TLS listener (RFC 8314)
    # Throttling of failed logins (shared by every server process)
    "THROTTLE": "popserver.logins.throttle.DatabaseThrottle",  # or "popserver.logins.throttle.CacheThrottle"
    "THROTTLE_CACHE": "default",  # the cache alias CacheThrottle uses; must be shared (Redis, Memcached)
    "THROTTLE_WINDOW": 900,  # seconds in which failures are counted
    "THROTTLE_ACCOUNT_FAILURES": 10,  # failures per (login name, IP) before a lock-out
    "THROTTLE_IP_FAILURES": 30,  # failures per IP (trusted networks exempt) before a lock-out
    "THROTTLE_LOCKOUT": 900,  # seconds a lock-out lasts
    "LOGIN_DELAY": 0,  # RFC 2449 LOGIN-DELAY: minimum seconds between logins of a mailbox (0: off)
    # Which passwords POP3 accepts: "account" (the site password), "app" (app passwords only) or "both"
    "ACCEPTED_PASSWORDS": "both",
    "AUDIT_RETENTION_DAYS": 90,  # prunepopaudit deletes login events and session records older than this
    # Mailbox lock
    "LOCK_HEARTBEAT": 30,  # seconds between a live session's lock heartbeats
    "LOCK_STALE_AFTER": 120,  # a lock whose heartbeat is older than this is free (a crashed server's)
    # What becomes of deleted and retrieved mail (a mailbox's own fields override these; popexpire applies them)
    "KEEP_DELETED_DAYS": 0,  # 0: DELE+QUIT deletes; N: hidden at once, restorable in the admin, purged after N days
    "EXPIRE_RETRIEVED_DAYS": None,  # None: never; N: delete messages N days after their first RETR (CAPA EXPIRE)
    # Dovecot's pop3_client_workarounds: "outlook-no-nuls" (NUL sent as 0x80), "oe-ns-eoh" (a blank line
    # added to a message whose header has none; LIST sizes include it)
    "CLIENT_WORKAROUNDS": [],
    # Several nodes behind a load balancer
    "NODE_NAME": "",  # names this node in lock holders, logs and audit rows; empty: the host name
    "PROXY_TRUSTED_NETWORKS": [],  # proxies whose PROXY headers runpop3 --proxy-protocol accepts (CIDR list)
    "PROXY_HEADER_TIMEOUT": 3,  # seconds a trusted proxy has to send the PROXY header
    # LMTP (runlmtp): mail from the local MTA
    "LMTP_LISTEN": "127.0.0.1:8024",  # or "unix:/path/to/socket"
    "LMTP_TRUSTED_NETWORKS": ["127.0.0.0/8", "::1/128"],  # the only TCP peers runlmtp accepts
    "LMTP_MAX_RECIPIENTS": 50,  # per transaction; more get 452 4.5.3 and the MTA sends them again
    "LMTP_TIMEOUT": 300,  # seconds without a command, or without DATA bytes (RFC 5321 s.4.5.3.2.7: 5 min)
    "LMTP_HOSTNAME": "",  # in the greeting and the LHLO reply; "" is this host's name
    "LMTP_ADD_RETURN_PATH": True,  # "Return-Path: <MAIL FROM>" on top of each copy, as Dovecot's LMTP
    "LMTP_ADD_DELIVERED_TO": True,  # "Delivered-To: <RCPT TO>" below it, as Dovecot's LMTP
    # Protocol
    "GREETING": "popserver ready.",
    "IMPLEMENTATION": "popserver",
    # What mail clients are told (popserver.clientconfig: autoconfig, autodiscover, mobileconfig, popdns).
    # Published as configured, never guessed from requests. Empty hostname: nothing is published.
    "PUBLIC_HOSTNAME": "",  # the POP3 server's name as clients reach it, e.g. "mail.example.com"
    # In order of preference; "security": "tls" (implicit TLS, RFC 8314), "starttls" (STLS) or "none".
    # An endpoint may name its own "host".
    "PUBLIC_ENDPOINTS": [{"port": 995, "security": "tls"}, {"port": 110, "security": "starttls"}],
    # None: every domain of a mailbox address (or of a login name that is an address). Else a list of
    # domains, or a dict domain -> overrides ("hostname", "endpoints", "outgoing_server", "provider_name").
    "DOMAINS": None,
    # popserver sends no mail; clients are told of an SMTP server only when one is given here:
    # {"host": "smtp.example.com", "port": 587, "security": "starttls", "authentication": "password"}.
    "OUTGOING_SERVER": None,
    "PROVIDER_NAME": "",  # the name clients show for the account's provider; empty: the mail domain
    # Tell clients to leave messages on the server (Thunderbird's pop3 block)? None: as the retention policy
    # says (yes, for EXPIRE_RETRIEVED_DAYS days, when retrieved mail expires after N > 0 days; else no).
    "LEAVE_MESSAGES_ON_SERVER": None,
}


# Values read so far: a session reads dozens, and a default (no POPSERVER_ setting) costs Django a raised
# AttributeError each time. Forgotten whenever a setting changes (override_settings, the tests' fixture).
_resolved: dict[str, Any] = {}


def get_setting(name: str) -> Any:
    """The value of ``POPSERVER_<name>``, or its default."""
    try:
        return _resolved[name]
    except KeyError:
        pass
    if name not in DEFAULTS:
        raise KeyError(f"unknown popserver setting {name!r}")
    value = _resolved[name] = getattr(settings, f"POPSERVER_{name}", DEFAULTS[name])
    return value


def _forget_resolved(*, setting: str, **kwargs) -> None:
    _resolved.clear()


setting_changed.connect(_forget_resolved, dispatch_uid="popserver.conf.forget_resolved")


# Worker processes (runpop3 --workers N): the per-server limits above are split evenly between them.
_workers = 1


def set_worker_count(count: int) -> None:
    """Called once in each worker process of ``runpop3 --workers N`` (and never elsewhere)."""
    global _workers
    _workers = max(1, int(count))


def worker_share(name: str) -> int:
    """This process's share of a per-server limit: the setting divided by the number of workers, at least 1."""
    return max(1, int(get_setting(name)) // _workers)


def node_name() -> str:
    """This node's name: POPSERVER_NODE_NAME, or the host name."""
    return str(get_setting("NODE_NAME") or socket.gethostname())[:64]
