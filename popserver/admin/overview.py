"""The "POP3 overview" admin page: what an operator looks at every morning.

Sessions open now (the mailbox locks, per node), per hour over the last day or week: logins by outcome,
sessions, messages delivered, retrieved and deleted, octets sent; the largest mailboxes and those closest to
their quota; active lock-outs; the addresses and accounts with the most failed logins.

Every figure is one aggregate query over indexed columns (a fixed number of queries, whatever the size of
the tables; ``tests/test_overview.py`` counts them, ``bench/dashboard.py`` times the page on a million login
events). Hours are UTC hours, labelled in the current time zone.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncHour
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.http import urlencode

from popserver.admin import charts
from popserver.conf import get_setting
from popserver.logins.throttle import DatabaseThrottle, get_throttle
from popserver.mailin import quota
from popserver.models import (
    DeliveryCount,
    LoginEvent,
    LoginThrottle,
    Mailbox,
    Message,
    Overview,
    SessionRecord,
)

RANGES = {"1": ("Last 24 hours", 24), "7": ("Last 7 days", 24 * 7)}
TOP = 10  # rows of each "top" list
FAILED_WINDOW = timedelta(hours=24)

# Outcomes of a login (LoginEvent.outcome) as the logins chart stacks them, with their colours.
LOGIN_SERIES = [
    (LoginEvent.SUCCESS, "successful", "ok"),
    (LoginEvent.FAILED, "wrong name or password", "bad"),
    (LoginEvent.LOCKED_OUT, "refused: locked out", "lock"),
    (LoginEvent.IN_USE, "refused: mailbox in use", "busy"),
    (LoginEvent.LOGIN_DELAY, "refused: too soon (LOGIN-DELAY)", "other"),
    (LoginEvent.ERROR, "server error", "main"),
]


# What counts as a failed login: every outcome but success (an IN list: the (time, outcome) index takes it).
FAILURES = [outcome for outcome, _, _ in LOGIN_SERIES if outcome != LoginEvent.SUCCESS]


@dataclass
class NodeSessions:
    node: str
    live: int
    overdue: int


@dataclass
class MailboxUse:
    mailbox: Mailbox | None
    messages: int
    octets: int
    usage: str  # against the limit
    percent: int = 0


@dataclass
class Failing:
    value: str
    failures: int
    url: str


@dataclass
class Data:
    now: datetime
    days: str
    hours: list[datetime]
    nodes: list[NodeSessions] = field(default_factory=list)
    charts: list = field(default_factory=list)
    largest: list[MailboxUse] = field(default_factory=list)
    fullest: list[MailboxUse] = field(default_factory=list)
    lockouts: list[LoginThrottle] = field(default_factory=list)
    lockouts_more: bool = False
    lockouts_listed: bool = True
    failing_ips: list[Failing] = field(default_factory=list)
    failing_accounts: list[Failing] = field(default_factory=list)

    @property
    def open_sessions(self) -> int:
        return sum(node.live + node.overdue for node in self.nodes)


def hour_starts(now: datetime, count: int) -> list[datetime]:
    """The starts of the last ``count`` UTC hours, the current one last."""
    current = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return [current - timedelta(hours=count - 1 - n) for n in range(count)]


def _per_hour(rows, hours: list[datetime], key: str) -> list[int]:
    index = {hour: n for n, hour in enumerate(hours)}
    values = [0] * len(hours)
    for row in rows:
        n = index.get(row["hour"].astimezone(UTC))
        if n is not None:
            values[n] += row[key] or 0
    return values


# The queries ---------------------------------------------------------------------------------------------------
def open_sessions(now: datetime) -> list[NodeSessions]:
    """Logged-in sessions hold their mailbox's lock, which names the node (``lock_host``); a lock whose
    heartbeat is overdue is counted apart (its holder may be gone)."""
    overdue = now - timedelta(seconds=get_setting("LOCK_STALE_AFTER"))
    rows = (
        Mailbox.objects.exclude(lock_token="")
        .values("lock_host")
        .annotate(
            live=Count("pk", filter=Q(lock_heartbeat__gte=overdue)),
            overdue=Count("pk", filter=Q(lock_heartbeat__lt=overdue) | Q(lock_heartbeat=None)),
        )
        .order_by("lock_host")
    )
    return [NodeSessions(row["lock_host"] or "?", row["live"], row["overdue"]) for row in rows]


def login_chart(hours: list[datetime]) -> list[charts.Series]:
    rows = (
        LoginEvent.objects.filter(time__gte=hours[0])
        .annotate(hour=TruncHour("time", tzinfo=UTC))
        .values("hour", "outcome")
        .annotate(n=Count("*"))  # from the (time, outcome) index alone
        .order_by()
    )
    rows = list(rows)
    return [
        charts.Series(label, _per_hour([r for r in rows if r["outcome"] == outcome], hours, "n"), colour)
        for outcome, label, colour in LOGIN_SERIES
    ]


def session_rows(hours: list[datetime]) -> list[dict]:
    return list(
        SessionRecord.objects.filter(started_at__gte=hours[0])
        .annotate(hour=TruncHour("started_at", tzinfo=UTC))
        .values("hour")
        .annotate(
            sessions=Count("pk"),
            retrieved=Sum("retrieved_count"),
            deleted=Sum("deleted_count"),
            sent=Sum("retrieved_bytes"),
        )
        .order_by()
    )


def delivery_rows(hours: list[datetime]) -> list[dict]:
    return list(DeliveryCount.objects.filter(hour__gte=hours[0]).values("hour", "messages", "octets"))


def mailbox_use() -> tuple[list[MailboxUse], list[MailboxUse]]:
    """The TOP largest mailboxes (all their messages) and the TOP closest to a limit (what counts against
    it): one aggregate per mailbox over the (mailbox, server_notice, size) index, the limits of the mailboxes
    that have their own, and the owners of the ones listed."""
    rows = list(
        Message.objects.values("mailbox")
        .order_by()
        .annotate(
            octets=Sum("size"),
            messages=Count("pk"),
            q_octets=Sum("size", filter=Q(server_notice=False, deleted_at__isnull=True)),
            q_messages=Count("pk", filter=Q(server_notice=False, deleted_at__isnull=True)),
        )
        .values_list("mailbox", "octets", "messages", "q_octets", "q_messages")
    )
    own = {
        pk: quota.limits(quota_bytes, quota_messages)
        for pk, quota_bytes, quota_messages in Mailbox.objects.filter(
            Q(quota_bytes__isnull=False) | Q(quota_messages__isnull=False)
        ).values_list("pk", "quota_bytes", "quota_messages")
    }
    default = quota.limits(None, None)

    def share(row) -> float:
        applying = own.get(row[0], default)
        return max(
            (row[3] or 0) / applying.octets if applying.octets else 0.0,
            row[4] / applying.messages if applying.messages else 0.0,
        )

    largest = heapq.nlargest(TOP, rows, key=lambda row: (row[1], -row[0]))
    fullest = [row for row in heapq.nlargest(TOP, rows, key=lambda row: (share(row), -row[0])) if share(row)]
    listed = {row[0] for row in largest + fullest}
    mailboxes = Mailbox.objects.select_related("user").in_bulk(listed) if listed else {}

    def use(row, messages: int, octets: int) -> MailboxUse:
        applying = own.get(row[0], default)
        used_octets, used_messages = row[3] or 0, row[4]
        parts = quota.usage_parts(used_messages, used_octets, applying)
        return MailboxUse(
            mailboxes.get(row[0]),
            messages,
            octets,
            quota.describe_usage(used_messages, used_octets, applying, short=True),
            max((percent for percent, _ in parts), default=0),
        )

    return (
        [use(row, row[2], row[1]) for row in largest],
        [use(row, row[4], row[3] or 0) for row in fullest],
    )


def active_lockouts(now: datetime) -> tuple[list[LoginThrottle], bool]:
    rows = list(LoginThrottle.objects.filter(locked_until__gt=now).order_by("-locked_until", "pk")[: TOP + 1])
    return rows[:TOP], len(rows) > TOP


def most_failed(now: datetime, column: str, parameter: str) -> list[Failing]:
    """The TOP values of ``column`` with the most failed logins in the last 24 hours, each with a link to
    the login events it counts."""
    since = now - FAILED_WINDOW
    rows = (
        LoginEvent.objects.filter(time__gte=since, outcome__in=FAILURES)
        .exclude(**{column: None})
        .values(column)
        .annotate(n=Count("pk"))
        .order_by("-n", column)[:TOP]
    )
    changelist = reverse("admin:popserver_loginevent_changelist")
    return [
        Failing(
            str(row[column]),
            row["n"],
            f"{changelist}?"
            + urlencode(
                {
                    parameter: row[column],
                    "outcome": "failures",
                    "time__gte": since.isoformat(timespec="seconds"),
                }
            ),
        )
        for row in rows
    ]


def gather(now: datetime, days: str) -> Data:
    hours = hour_starts(now, RANGES[days][1])
    data = Data(now=now, days=days, hours=hours)
    data.nodes = open_sessions(now)

    columns = charts.Hours.of(hours)
    logins = login_chart(hours)
    sessions = session_rows(hours)
    deliveries = delivery_rows(hours)
    data.charts = [
        ("logins", "Logins", charts.bar_chart("chart-logins", "Logins per hour by outcome", columns, logins)),
        (
            "sessions",
            "Sessions",
            charts.bar_chart(
                "chart-sessions",
                "Sessions per hour",
                columns,
                [charts.Series("sessions", _per_hour(sessions, hours, "sessions"), "main")],
            ),
        ),
        (
            "delivered",
            "Messages delivered",
            charts.bar_chart(
                "chart-delivered",
                "Messages delivered per hour",
                columns,
                [charts.Series("delivered", _per_hour(deliveries, hours, "messages"), "ok")],
            ),
        ),
        (
            "retrieved",
            "Messages retrieved and deleted",
            charts.bar_chart(
                "chart-retrieved",
                "Messages retrieved and deleted per hour",
                columns,
                [
                    charts.Series("retrieved (RETR)", _per_hour(sessions, hours, "retrieved"), "main"),
                    charts.Series("deleted at QUIT", _per_hour(sessions, hours, "deleted"), "lock"),
                ],
            ),
        ),
        (
            "sent",
            "Octets sent",
            charts.bar_chart(
                "chart-sent",
                "Octets sent per hour",
                columns,
                [charts.Series("sent by RETR", _per_hour(sessions, hours, "sent"), "busy")],
                charts.OCTETS,
            ),
        ),
    ]
    data.largest, data.fullest = mailbox_use()
    data.lockouts_listed = isinstance(
        get_throttle(), DatabaseThrottle
    )  # the cache throttle's are not listable
    if data.lockouts_listed:
        data.lockouts, data.lockouts_more = active_lockouts(now)
    data.failing_ips = most_failed(now, "peer_ip", "peer_ip")
    data.failing_accounts = most_failed(now, "username", "username")
    return data


# The page -------------------------------------------------------------------------------------------------------
VIEW_PERMISSIONS = (
    "popserver.view_mailbox",
    "popserver.view_loginevent",
    "popserver.view_sessionrecord",
    "popserver.view_loginthrottle",
)


@admin.register(Overview)
class OverviewAdmin(admin.ModelAdmin):
    """Listed on the admin index as "POP3 overview"; its list page is the overview. Staff who may view
    mailboxes, login events, session records and lock-outs may see it."""

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.has_perms(VIEW_PERMISSIONS)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_urls(self):
        return [
            path("", self.admin_site.admin_view(self.changelist_view), name="popserver_overview_changelist")
        ]

    def changelist_view(self, request, extra_context=None):
        if not self.has_view_permission(request):
            raise PermissionDenied
        days = request.GET.get("days", "1")
        if days not in RANGES:
            days = "1"
        data = gather(timezone.now(), days)
        context = {
            **self.admin_site.each_context(request),
            "title": "POP3 overview",
            "subtitle": None,
            "opts": self.opts,
            "data": data,
            "ranges": [(key, label, key == days) for key, (label, _) in RANGES.items()],
            "mailbox_change": "admin:popserver_mailbox_change",
            "lockouts_url": reverse("admin:popserver_loginthrottle_changelist") + "?locked=yes",
            "sessions_url": reverse("admin:popserver_mailbox_changelist") + "?locked=yes",
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/popserver/overview.html", context)
