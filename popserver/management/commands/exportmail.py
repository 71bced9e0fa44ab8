"""``manage.py exportmail RECIPIENT PATH``: a mailbox as an mbox file (mboxrd), in POP3 order.

The file is written beside PATH under a temporary name and renamed when complete; an existing PATH is left
alone unless ``--force``. PATH ``-`` writes to standard output. ``importmail`` reads the file back.
"""

import contextlib
import os
import sys
import tempfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from popserver.exceptions import MessageExpunged, UnknownRecipient
from popserver.mailin.delivery import resolve_mailbox
from popserver.mailin.exporting import export_mbox
from popserver.management.progress import Progress
from popserver.models import Message


class Command(BaseCommand):
    help = "Write RECIPIENT's mailbox to PATH as an mbox file, in order (PATH '-': standard output)."

    def add_arguments(self, parser):
        parser.add_argument("recipient", help="a login name or one of a mailbox's addresses")
        parser.add_argument("path", help="the mbox file to write, or - for standard output")
        parser.add_argument("--force", action="store_true", help="replace PATH if it exists")
        parser.add_argument(
            "--x-uidl",
            action="store_true",
            help="start each message with an X-UIDL header holding its unique id (for importmail --x-uidl)",
        )

    def handle(self, *args, recipient, path, **options):
        try:
            mailbox = resolve_mailbox(recipient)
        except UnknownRecipient as exc:
            raise CommandError(str(exc)) from exc
        progress = Progress(
            self.stderr, Message.objects.visible().filter(mailbox=mailbox).count(), "exporting"
        )
        try:
            if path == "-":
                written, gone = export_mbox(
                    mailbox, sys.stdout.buffer, x_uidl=options["x_uidl"], progress=progress
                )
                sys.stdout.buffer.flush()
            else:
                written, gone = self._export_to_file(mailbox, Path(path), options, progress)
        except MessageExpunged as exc:
            raise CommandError(
                f"message {exc} was deleted while it was being written; run exportmail again"
            ) from exc
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from exc
        finally:
            progress.finish()
        if gone:
            self.stderr.write(f"note: {gone} messages were deleted during the export and are not in it")
        if path != "-":
            self.stdout.write(f"exported {written} messages to {path}")

    @staticmethod
    def _export_to_file(mailbox, path: Path, options, progress) -> tuple[int, int]:
        if path.exists() and not options["force"]:
            raise CommandError(f"{path} exists (use --force to replace it)")
        fd, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.", dir=path.parent
        )  # mode 0600: mail is private
        try:
            with os.fdopen(fd, "wb") as out:
                result = export_mbox(mailbox, out, x_uidl=options["x_uidl"], progress=progress)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        return result
