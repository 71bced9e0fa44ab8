"""``manage.py popmovebodies --to STORE``: move message bodies between the database and the body storage."""

from django.core.management.base import BaseCommand, CommandError

from popserver.management.progress import Progress
from popserver.models import Mailbox
from popserver.storage.body_upkeep import STORES, messages_to_move, move_bodies


class Command(BaseCommand):
    help = (
        "Move message bodies into STORE: 'storage' (objects in STORAGES[POPSERVER_BODY_STORAGE], once per "
        "content) or 'database' (chunk rows). In batches, each under the mailbox's lock as a POP3 session "
        "takes it, so it is safe while servers run; mailboxes in use are left for the next run, and an "
        "interrupted run resumes where it stopped. Set POPSERVER_BODY_STORE to match, for new mail."
    )

    def add_arguments(self, parser):
        parser.add_argument("--to", required=True, choices=sorted(STORES), help="where the bodies go")
        parser.add_argument("--batch", type=int, default=100, help="messages per batch (default 100)")
        parser.add_argument("--mailbox", action="append", help="only this mailbox (login name); repeatable")

    def handle(self, *args, **options):
        if options["batch"] < 1:
            raise CommandError("--batch must be 1 or more")
        mailbox_ids = None
        if options["mailbox"]:
            from popserver.mailin.mailboxes import find_mailbox

            mailbox_ids = []
            for name in options["mailbox"]:
                mailbox = find_mailbox(name, auto_create=False)
                if mailbox is None:
                    raise CommandError(f"no mailbox {name!r}")
                mailbox_ids.append(mailbox.pk)
        pending = messages_to_move(options["to"])
        if mailbox_ids is not None:
            pending = pending.filter(mailbox_id__in=mailbox_ids)
        progress = Progress(self.stderr, pending.count(), "messages")
        try:
            report = move_bodies(
                options["to"],
                batch_messages=options["batch"],
                mailbox_ids=mailbox_ids,
                progress=lambda done, total: progress(done),
            )
        except KeyError as exc:
            raise CommandError(f"no body storage: {exc}") from None
        finally:
            progress.finish()
        self.stdout.write(
            f"{report.moved} message(s) moved to the {options['to']} store ({report.octets} octets); "
            f"{report.gone} deleted meanwhile."
        )
        for problem in report.problems:
            self.stderr.write(problem)
        if report.busy_mailboxes:
            names = Mailbox.objects.filter(pk__in=report.busy_mailboxes).select_related("user")
            for mailbox in names:
                self.stderr.write(f"skipped {mailbox}: in use by a POP3 session (run again to move it)")
            raise CommandError(f"{len(report.busy_mailboxes)} mailbox(es) in use: run again", returncode=75)
        if report.unreadable:
            raise CommandError(
                f"{len(report.unreadable)} body(ies) could not be read: see above", returncode=1
            )
