"""Checks against the database itself (tagged ``database``: they run in ``migrate``, ``check --database`` and
at ``runpop3``'s and ``runlmtp``'s start, never where the database may be out of reach)."""

from django.core.checks import Tags, Warning, register
from django.db import DatabaseError, connections

from popserver.conf import get_setting


def max_connections(alias: str) -> int | None:
    """What the database allows at once (PostgreSQL, MariaDB/MySQL), or None where there is no such limit."""
    connection = connections[alias]
    query = {"postgresql": "SHOW max_connections", "mysql": "SELECT @@max_connections"}.get(connection.vendor)
    if query is None:
        return None
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return int(cursor.fetchone()[0])
    except (DatabaseError, TypeError, ValueError):
        return None


@register(Tags.database)
def check_connection_budget(app_configs=None, databases=None, **kwargs):
    budget = get_setting("DB_CONNECTIONS")
    if not databases or isinstance(budget, bool) or not isinstance(budget, int):
        return []
    warnings = []
    for alias in databases:
        limit = max_connections(alias)
        if limit is not None and budget > limit:
            warnings.append(
                Warning(
                    f"POPSERVER_DB_CONNECTIONS is {budget}, but database {alias!r} allows {limit} connections "
                    "in all: one server (runpop3 or runlmtp) alone could exhaust it.",
                    hint="Keep servers x POPSERVER_DB_CONNECTIONS + the site's own workers + deliver/LMTP "
                    "processes below the database's max_connections.",
                    id="popserver.W006",
                )
            )
    return warnings


def connection_budget_warnings(alias: str = "default") -> list[str]:
    """W006 as lines for a server's start (``runpop3``, ``runlmtp``), which runs without Django's checks."""
    return [f"{w.id}: {w.msg} {w.hint or ''}".strip() for w in check_connection_budget(databases=[alias])]
