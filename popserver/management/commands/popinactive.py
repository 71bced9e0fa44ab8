"""``manage.py popinactive --days N [--disable-pop3]``: mailboxes nobody has logged in to for N days."""

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from popserver.mailin.mailboxes import inactive_mailboxes
from popserver.mailin.quota import format_octets
from popserver.models import Mailbox


def _when(moment) -> str:
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M") if moment else "never"


class Command(BaseCommand):
    help = (
        "List mailboxes with no successful POP3 login for N days (or none at all, if older than that), with "
        "their size and last login; --disable-pop3 switches POP3 off for them (on again in the admin)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--days", type=int, required=True, metavar="N", help="days without a login")
        parser.add_argument(
            "--disable-pop3",
            action="store_true",
            help="turn POP3 off for the mailboxes listed (the admin's action turns it on again)",
        )

    def handle(self, *args, days, disable_pop3, **options):
        if days < 1:
            raise CommandError("--days must be 1 or more")
        mailboxes = list(inactive_mailboxes(days))
        period = "1 day" if days == 1 else f"{days} days"
        if not mailboxes:
            self.stdout.write(f"no mailbox without a login for {period}")
            return
        width = max(len("mailbox"), *(len(str(mailbox)) for mailbox in mailboxes))
        self.stdout.write(f"{'mailbox':<{width}}  {'messages':>8}  {'size':>10}  {'last login':<16}  POP3")
        for mailbox in mailboxes:
            self.stdout.write(
                f"{mailbox!s:<{width}}  {mailbox.message_count:>8}  "
                f"{format_octets(mailbox.message_octets or 0):>10}  {_when(mailbox.last_login):<16}  "
                f"{'on' if mailbox.pop3_enabled else 'off'}"
            )
        total = len(mailboxes)
        self.stdout.write(f"{total} mailbox{'es' if total != 1 else ''} without a login for {period}")
        if disable_pop3:
            turned_off = Mailbox.objects.filter(
                pk__in=[mailbox.pk for mailbox in mailboxes], pop3_enabled=True
            ).update(pop3_enabled=False)
            self.stdout.write(
                f"POP3 turned off for {turned_off} of them (the admin's mailbox list turns it on again: "
                '"Turn POP3 on for the selected mailboxes")'
            )
