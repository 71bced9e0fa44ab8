"""``manage.py prunepopaudit [--days N]``: delete login events and session records older than the retention."""

from django.core.management.base import BaseCommand

from popserver.logins.audit import prune


class Command(BaseCommand):
    help = "Delete POP3 login events and session records older than POPSERVER_AUDIT_RETENTION_DAYS."

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, help="override the retention setting")

    def handle(self, *args, **options):
        events, sessions = prune(options["days"])
        self.stdout.write(f"deleted {events} login event(s) and {sessions} session record(s)")
