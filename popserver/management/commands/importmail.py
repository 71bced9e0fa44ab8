"""``manage.py importmail RECIPIENT PATH``: bring mail over from another server, keeping its POP3 unique ids.

PATH is an mbox file or a Maildir folder; a Maildir with a ``dovecot-uidlist`` is imported in Dovecot's POP3
order with the UIDLs Dovecot showed (see ``popserver.mailin.importing``), so POP3 clients that leave mail on the
server do not download everything again. Running it again adds nothing it already imported.

Prints "imported N, skipped M duplicates, K errors"; exits 1 when K > 0 (each error is on stderr).
"""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from popserver.exceptions import UnknownRecipient
from popserver.mailin.delivery import resolve_mailbox
from popserver.mailin.importing import DEFAULT_UIDL_FORMAT, SourceError, import_messages, open_source
from popserver.management.progress import Progress


class Command(BaseCommand):
    help = (
        "Import an mbox file or a Maildir folder into RECIPIENT's mailbox, keeping the UIDLs of a Dovecot "
        "Maildir; a second run adds no duplicates."
    )

    def add_arguments(self, parser):
        parser.add_argument("recipient", help="a login name or one of a mailbox's addresses")
        parser.add_argument("path", help="an mbox file, or a Maildir folder (with cur/ and new/)")
        parser.add_argument(
            "--uidl-format",
            default=DEFAULT_UIDL_FORMAT,
            metavar="FORMAT",
            help="Dovecot's pop3_uidl_format on the old server: %%u IMAP UID, %%v UIDVALIDITY, %%f file name, "
            "with Dovecot's modifiers (%%08Xu: at least 8 lower-case hex digits, as Dovecot shows them; "
            "%%08XUu: upper case). Default: %(default)s.",
        )
        parser.add_argument(
            "--x-uidl",
            action="store_true",
            help="take a message's UIDL from its X-UIDL header when it has one (Dovecot's pop3_reuse_xuidl)",
        )
        parser.add_argument(
            "--enforce-quota",
            action="store_true",
            help="refuse messages over the mailbox's quota and stop there (by default an import ignores quotas)",
        )
        parser.add_argument(
            "--keep-from-quoting",
            action="store_true",
            help="mbox: keep '>From ' lines as they are (by default one '>' is taken off, as mboxrd wants)",
        )

    def handle(self, *args, recipient, path, **options):
        try:
            mailbox = resolve_mailbox(recipient)
        except UnknownRecipient as exc:
            raise CommandError(str(exc)) from exc
        try:
            source = open_source(
                Path(path), uidl_format=options["uidl_format"], unquote=not options["keep_from_quoting"]
            )
        except SourceError as exc:
            raise CommandError(str(exc)) from exc
        try:
            if options["verbosity"] > 1:
                self.stdout.write(f"{source.kind} {path}: {len(source)} messages for mailbox {mailbox}")
            for note in source.notes:
                self.stderr.write(f"note: {note}")
            progress = Progress(self.stderr, len(source), "importing")
            result = import_messages(
                mailbox,
                source,
                x_uidl=options["x_uidl"],
                enforce_quota=options["enforce_quota"],
                progress=progress,
            )
            progress.finish()
        finally:
            source.close()
        for label, reason in result.errors:
            self.stderr.write(f"error: {label}: {reason}")
        if result.stopped:
            self.stderr.write(f"stopped: {result.stopped}")
        self.stdout.write(
            f"imported {result.imported}, skipped {result.duplicates} duplicates, {len(result.errors)} errors"
        )
        if result.errors:
            raise CommandError(f"{len(result.errors)} messages not imported (see above)")
