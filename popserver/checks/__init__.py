"""System checks for popserver's settings, by topic, one stable id per rule (registered in ``apps.ready``).

Errors only where the server truly cannot run; everything else is a warning, so a stock ``startproject`` site
(PBKDF2 first) starts. Server-only resources (certificates) are checked when ``runpop3`` starts, not here.

| id | rule |
|---|---|
| E001 | a setting that must be a positive number is not |
| E002 | POPSERVER_TRUSTED_NETWORKS or POPSERVER_LMTP_TRUSTED_NETWORKS is not a list of networks |
| E003 | POPSERVER_PLAINTEXT_AUTH is not one of its values |
| E004 | POPSERVER_THROTTLE_CACHE names a cache CACHES lacks |
| E005 | POPSERVER_ACCEPTED_PASSWORDS is not one of its values |
| E006 | POPSERVER_MAIL_FALLBACK_BACKEND cannot be imported, or is the local backend itself |
| E007 | a delay that must be a number >= 0 is not |
| E008 | a quota that must be a whole number >= 0 is not |
| E009 | a dotted-path setting (BODY_STORE, THROTTLE) cannot be imported or is not the right kind |
| E010 | POPSERVER_KEEP_DELETED_DAYS or POPSERVER_EXPIRE_RETRIEVED_DAYS is not a whole number >= 0 (or None) |
| E011 | POPSERVER_CLIENT_WORKAROUNDS names a workaround this server does not have |
| E012 | a count that must be a whole number (MAX_SESSIONS, LISTEN_BACKLOG, LOGIN_DELAY, ...) is a fraction |
| E013 | POPSERVER_GREETING or POPSERVER_IMPLEMENTATION is not one line of text |
| E014 | POPSERVER_PROXY_TRUSTED_NETWORKS is not a list of networks |
| E015 | POPSERVER_NODE_NAME is not one printable word of at most 64 characters |
| E016 | POPSERVER_QUOTA_WARNINGS is not a list of percentages in (0, 100] |
| E040 | bodies in a Django storage (POPSERVER_BODY_STORE, or objects already stored) but STORAGES lacks the alias |
| E041 | the body storage is, or shares its place with, the site's public storages or MEDIA_ROOT/STATIC_ROOT |
| E042 | the body storage cannot take and give back an object (``check --deploy``; ``runpop3`` refuses to start) |
| E060 | POPSERVER_PRELOGIN_PENALTY_MAX is below POPSERVER_PRELOGIN_PENALTY |
| W001 | Argon2 is not the first password hasher |
| W002 | POPSERVER_AUTOLOGOUT below RFC 1939's 10 minutes |
| W003 | POPSERVER_BODY_CHUNK_SIZE over 8 MiB |
| W004 | POPSERVER_PLAINTEXT_AUTH = "always" |
| W005 | the throttle cache is not shared between processes |
| W006 | one server's POPSERVER_DB_CONNECTIONS exceeds the database's max_connections (``database`` tag) |
| W060 | POPSERVER_PRELOGIN_PENALTY_MAX over 60 s (clients give up waiting for the greeting) |
| E180 | a mail-client configuration setting cannot be read (``popserver/clientconfig/checks.py``) |
| W180 | ``popserver.clientconfig.urls`` is installed but nothing is published |
| W181 | an endpoint is published to mail clients without TLS on a non-loopback host |
"""

from . import bodies, database, logins, nodes, numbers, paths

__all__ = ["bodies", "database", "logins", "nodes", "numbers", "paths"]
