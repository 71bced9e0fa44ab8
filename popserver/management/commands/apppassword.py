"""``manage.py apppassword USERNAME [--name NAME | --revoke NAME | --list]``: manage POP3 app passwords."""

from django.core.management.base import BaseCommand, CommandError

from popserver.logins.app_passwords import create_app_password, revoke_app_password
from popserver.mailin.mailboxes import find_mailbox


class Command(BaseCommand):
    help = "Create (the secret is shown once), list or revoke a mailbox's POP3 app passwords."

    def add_arguments(self, parser):
        parser.add_argument("username", help="the owner's login name")
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--name", help="create an app password with this name and print its secret")
        group.add_argument("--revoke", metavar="NAME", help="revoke the active app passwords with this name")
        group.add_argument("--list", action="store_true", help="list the app passwords")

    def handle(self, *args, username, **options):
        mailbox = find_mailbox(username, auto_create=False)
        if mailbox is None:
            raise CommandError(f"no mailbox for {username!r}")
        if options["name"]:
            _, secret = create_app_password(mailbox, options["name"])
            self.stdout.write(secret)
        elif options["revoke"]:
            revoked = 0
            for app_password in mailbox.app_passwords.filter(name=options["revoke"], revoked_at=None):
                revoke_app_password(app_password)
                revoked += 1
            if not revoked:
                raise CommandError(f"no active app password named {options['revoke']!r}")
            self.stdout.write(f"revoked {revoked}")
        else:
            for app_password in mailbox.app_passwords.all():
                state = "active" if app_password.is_active else f"revoked {app_password.revoked_at:%Y-%m-%d}"
                used = (
                    f"last used {app_password.last_used_at:%Y-%m-%d %H:%M} from {app_password.last_used_peer}"
                    if app_password.last_used_at
                    else "never used"
                )
                self.stdout.write(f"{app_password.name}\t{state}\t{used}")
