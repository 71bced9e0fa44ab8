"""``manage.py popexpire``: apply the retention policies (run it from cron or a systemd timer)."""

from django.core.management.base import BaseCommand, CommandError

from popserver.management.progress import Progress
from popserver.storage.retention import apply_policies, mailboxes_with_work


class Command(BaseCommand):
    help = (
        "Purge deleted messages kept past POPSERVER_KEEP_DELETED_DAYS and delete retrieved messages past "
        "POPSERVER_EXPIRE_RETRIEVED_DAYS (or each mailbox's own policy). Locked mailboxes are skipped."
    )

    def handle(self, *args, **options):
        mailbox_ids = mailboxes_with_work()
        progress = Progress(self.stderr, len(mailbox_ids), "mailboxes")
        report = apply_policies(mailbox_ids, progress=progress)
        progress.finish()
        for name in report.skipped_locked:
            self.stderr.write(f"skipped {name}: locked by a POP3 session (done on the next run)")
        self.stdout.write(report.summary())
        if report.failed:
            raise CommandError(f"{report.failed} mailbox(es) failed: see the log", returncode=1)
