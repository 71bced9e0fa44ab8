"""``manage.py popgc``: remove stored bodies nothing refers to (run it daily from cron or a systemd timer)."""

from django.core.management.base import BaseCommand, CommandError

from popserver.conf import get_setting
from popserver.management.progress import Progress
from popserver.storage.body_upkeep import collect_garbage


class Command(BaseCommand):
    help = (
        "Repair the body storage after crashes and deletions by other code: recount references, remove "
        "objects without references, and objects without a row that are older than the grace period. "
        "Safe while servers and deliveries run; running it again changes nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--grace",
            type=float,
            default=None,
            help="seconds an object without a row is left alone (default: POPSERVER_BODY_GC_GRACE, 3600)",
        )
        parser.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")

    def handle(self, *args, **options):
        grace = get_setting("BODY_GC_GRACE") if options["grace"] is None else options["grace"]
        if grace < 0:
            raise CommandError("--grace must be 0 or more seconds")
        progress = Progress(self.stderr, 256, "shards")
        try:
            report = collect_garbage(
                grace=grace, dry_run=options["dry_run"], progress=lambda done, total: progress(done)
            )
        except KeyError as exc:  # STORAGES has no such alias
            raise CommandError(f"no body storage: {exc}") from None
        finally:
            progress.finish()
        for problem in report.problems:
            self.stderr.write(problem)
        would = "would be " if options["dry_run"] else ""
        self.stdout.write(
            f"{report.recounted} reference count(s) {would}corrected, "
            f"{report.unreferenced_rows} unreferenced body(ies) {would}removed, "
            f"{report.orphans} object(s) without a row {would}removed, "
            f"{report.young} younger than {grace:g} s left alone, "
            f"{report.leftovers} interrupted write(s) {would}removed."
        )
