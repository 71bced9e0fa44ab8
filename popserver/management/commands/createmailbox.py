"""``manage.py createmailbox USERNAME [--email ADDRESS] [--password-stdin]``: a user and their mailbox."""

import sys

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from popserver.mailin.mailboxes import set_up_mailbox


class Command(BaseCommand):
    help = (
        "Create the user (by the user model's USERNAME_FIELD) if missing, and their mailbox. Safe to re-run: "
        "it sets the password when one is given and adds the address when it is new."
    )
    stealth_options = ("stdin",)  # call_command(..., stdin=io.StringIO("password\n"))

    def add_arguments(self, parser):
        parser.add_argument("username", help="the login name (the value of the user model's USERNAME_FIELD)")
        parser.add_argument("--email", metavar="ADDRESS", help="an address that delivers into this mailbox")
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="set the password to the first line of standard input (without its line ending)",
        )

    def handle(self, *args, username, email=None, password_stdin=False, **options):
        password = None
        if password_stdin:
            password = _first_line(options.get("stdin") or sys.stdin)
            if password is None:
                raise CommandError("--password-stdin: standard input is empty")
        try:
            setup = set_up_mailbox(username, email=email, password=password)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        for warning in setup.password_warnings:
            self.stderr.write(f"Warning: {warning}")
        user = setup.mailbox.user
        done = [
            f"{'created' if setup.user_created else 'found'} user {user.get_username()}",
            f"{'created' if setup.mailbox_created else 'found'} the mailbox",
        ]
        if setup.password_set and not setup.user_created:
            done.append("set the password")
        if email:
            done.append(f"{'added' if setup.address_added else 'kept'} the address {email}")
        summary = "; ".join(done)
        self.stdout.write(summary[0].upper() + summary[1:] + ".")


def _first_line(stream) -> str | None:
    """The first line of ``stream`` without its line ending, or None at end of input."""
    line = stream.readline()
    if isinstance(line, bytes):
        line = line.decode()
    if not line:
        return None
    return line.removesuffix("\n").removesuffix("\r")
