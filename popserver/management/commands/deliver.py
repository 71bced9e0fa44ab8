"""``manage.py deliver [-f SENDER] [--delivered-to ADDRESS] RECIPIENT < message.eml``: an MDA for Postfix
``pipe``, Exim and procmail.

The message is stored as given (a leading mbox ``From `` line dropped, bare LF as CRLF). ``-f SENDER`` puts
``Return-Path: <SENDER>`` on top and ``--delivered-to ADDRESS`` puts ``Delivered-To: ADDRESS`` below it, as
Postfix's pipe flags R and D and dovecot-lda do; each only when given.

The exit status follows sysexits(3), which is what MTAs act on: Exim's pipe transport retries 75 (and 73)
and bounces everything else, Python's own 1 included. So every failure, also one before ``handle()`` runs
(a usage error, a broken settings module, an app that fails to load), becomes a sysexits code with a
one-line reason on stderr and never a traceback:

    0   delivered
    64  EX_USAGE        the command line is wrong (no recipient, two, an unknown option): fix the MTA's
                        configuration (an MTA bounces the message)
    65  EX_DATAERR      empty input
    67  EX_NOUSER       unknown recipient
    69  EX_UNAVAILABLE  over POPSERVER_MAX_MESSAGE_SIZE; over quota with POPSERVER_QUOTA_EXCEEDED_PERMANENT
    75  EX_TEMPFAIL     over quota (the default), database unavailable or busy, and any unexpected error:
                        the MTA retries later

The default project's ``manage.py`` hands ``deliver`` to ``main()`` below before Django is set up, so that
even a settings module that cannot be imported exits 75.
"""

import contextlib
import sys
import traceback
from typing import ClassVar

from django.core.management.base import BaseCommand, CommandError, handle_default_options

from popserver.exceptions import DeliveryError, EmptyMessage, MessageTooLarge, QuotaExceeded, UnknownRecipient

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOUSER = 67
EX_UNAVAILABLE = 69
EX_TEMPFAIL = 75
SYSEXITS = {EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_TEMPFAIL}
DELIVERY_STATUS = {EmptyMessage: EX_DATAERR, UnknownRecipient: EX_NOUSER, MessageTooLarge: EX_UNAVAILABLE}
USAGE = "manage.py deliver [-f SENDER] [--delivered-to ADDRESS] RECIPIENT < message"
REASON_LIMIT = 500  # characters of the one-line reason (it ends up in bounces and MTA logs)


class Command(BaseCommand):
    help = "Deliver the message on standard input to RECIPIENT (a login name or an address); sysexits status."
    requires_system_checks: ClassVar[list[str]] = []  # another app's failing check must not bounce mail
    requires_migrations_checks = False
    stealth_options = ("stdin",)  # call_command("deliver", "bob", stdin=io.BytesIO(b"..."))

    def add_arguments(self, parser):
        parser.add_argument("recipient", help="a login name or one of a mailbox's addresses")
        parser.add_argument(
            "-f",
            "--from",
            dest="sender",
            metavar="SENDER",
            default=None,
            help='the envelope sender: adds "Return-Path: <SENDER>" on top ("" or "<>" for the null sender)',
        )
        parser.add_argument(
            "--delivered-to",
            dest="delivered_to",
            metavar="ADDRESS",
            default=None,
            help='adds "Delivered-To: ADDRESS" (below a Return-Path)',
        )

    def handle(self, *args, recipient, **options):
        from popserver.conf import get_setting
        from popserver.mailin.delivery import deliver

        stream = options.get("stdin") or sys.stdin.buffer
        try:
            message = deliver(
                recipient,
                read_message(stream, get_setting("MAX_MESSAGE_SIZE")),
                return_path=options.get("sender"),
                delivered_to=options.get("delivered_to"),
            )
        except DeliveryError as exc:
            raise CommandError(str(exc), returncode=_delivery_status(exc)) from exc
        except ValueError as exc:  # a -f or --delivered-to that cannot be a header: fix the MTA's command
            raise CommandError(f"usage error: {exc}", returncode=EX_USAGE) from exc
        if options.get("verbosity", 1) > 1:
            self.stdout.write(f"delivered {message.size} octets to {message.mailbox} as {message.uid}")

    def run_from_argv(self, argv):
        """Parse, set Django up, deliver; exit with a sysexits code and a one-line reason, whatever fails."""
        self._called_from_command_line = False  # usage errors raise CommandError instead of exiting 2
        stage = "usage"
        wants_traceback = "--traceback" in argv
        try:
            parser = self.create_parser(argv[0], argv[1])
            options = parser.parse_args(argv[2:])
            cmd_options = vars(options)
            args = cmd_options.pop("args", ())
            handle_default_options(options)  # --settings, --pythonpath
            stage = "setup"
            _setup_django()
            stage = "delivery"
            self.execute(*args, **cmd_options)
            status, reason = EX_OK, ""
        except SystemExit as exc:  # --help and --version exit 0; anything else is unexpected
            if exc.code in (None, 0):
                raise
            status, reason = EX_TEMPFAIL, f"exited with status {exc.code}"
        except BaseException as exc:  # noqa: BLE001  (an MDA turns every failure into a sysexits status)
            status, reason = exit_status(exc, stage)
            if wants_traceback:
                traceback.print_exc()
        finally:
            _close_connections()
        if reason:
            reason = " ".join(reason.split())[:REASON_LIMIT]
            sys.stderr.write(f"deliver: {reason}\n")
            sys.stderr.flush()
        sys.exit(status)


def main(argv: list[str]) -> None:
    """``manage.py deliver ...`` without Django's ManagementUtility, which would print a traceback (or
    "Unknown command", exit 1) for a settings module that fails to import. Never returns."""
    Command().run_from_argv(argv)


def read_message(stream, limit: int) -> bytes:
    """The message on ``stream``, reading at most ``limit`` + 1 octets (plus a leading mbox ``From `` line,
    which is not part of the message): enough to know it is too large without holding more of it."""
    data = stream.read(limit + 1)
    if data.startswith(b"From "):
        end = data.find(b"\n")
        if end >= 0:
            data += stream.read(end + 1)  # the envelope line does not count toward the limit
            if len(data) - (end + 1) > limit:
                raise _too_large(limit)
        elif len(data) > limit:
            raise _too_large(limit)
    elif len(data) > limit:
        raise _too_large(limit)
    return data  # deliver() checks the exact size of what it stores


def _too_large(limit: int) -> MessageTooLarge:
    """Reading stopped one octet past the limit, so the real size is unknown: say so, not a wrong figure."""
    return MessageTooLarge(f"message of more than {limit} octets is over the limit of {limit} octets")


def exit_status(exc: BaseException, stage: str = "delivery") -> tuple[int, str]:
    """The sysexits status and one-line reason for a failure at ``stage`` (usage, setup or delivery)."""
    from django.db import DatabaseError

    if isinstance(exc, DeliveryError):
        return _delivery_status(exc), str(exc) or type(exc).__name__
    if isinstance(exc, CommandError):
        if stage == "usage":
            problem = str(exc).removeprefix("Error: ")
            return EX_USAGE, f"usage error: {problem} (usage: {USAGE})"
        if exc.returncode in SYSEXITS:
            return exc.returncode, str(exc)
        return EX_TEMPFAIL, str(exc)
    if isinstance(exc, DatabaseError):
        return EX_TEMPFAIL, f"database unavailable: {_describe(exc)}"
    if isinstance(exc, KeyboardInterrupt):
        return EX_TEMPFAIL, "interrupted"
    if stage in ("usage", "setup"):
        return EX_TEMPFAIL, f"cannot start Django (settings or an installed app): {_describe(exc)}"
    return EX_TEMPFAIL, f"temporary failure: {_describe(exc)}"


def _delivery_status(exc: DeliveryError) -> int:
    if isinstance(exc, QuotaExceeded):  # a full mailbox may empty: retry, unless the site says bounce
        from popserver.conf import get_setting

        return EX_UNAVAILABLE if get_setting("QUOTA_EXCEEDED_PERMANENT") else EX_TEMPFAIL
    for kind, status in DELIVERY_STATUS.items():
        if isinstance(exc, kind):
            return status
    return EX_TEMPFAIL


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _setup_django() -> None:
    import django
    from django.apps import apps
    from django.conf import settings

    settings.INSTALLED_APPS  # noqa: B018  (imports the settings module: its errors surface here)
    if not apps.ready:
        django.setup()


def _close_connections() -> None:
    with contextlib.suppress(Exception):  # best effort: the exit status is already decided
        from django.apps import apps
        from django.db import connections

        if apps.ready:
            connections.close_all()
