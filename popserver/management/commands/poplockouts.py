"""``manage.py poplockouts [--clear KEY | --clear-all]``: list or lift POP3 login lock-outs."""

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from popserver.logins.throttle import DatabaseThrottle, get_throttle
from popserver.models import LoginThrottle


class Command(BaseCommand):
    help = "List POP3 login lock-outs (database throttle), or clear them."

    def add_arguments(self, parser):
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--clear", metavar="KEY", help='lift the lock-outs of an IP or of "name|ip"')
        group.add_argument("--clear-all", action="store_true", help="lift every lock-out and counter")

    def handle(self, *args, **options):
        throttle = get_throttle()
        if options["clear_all"] or options["clear"]:
            if not isinstance(throttle, DatabaseThrottle):
                if options["clear"] and "|" not in options["clear"]:
                    count = throttle.clear(LoginThrottle.IP, options["clear"])
                elif options["clear"]:
                    count = throttle.clear(LoginThrottle.ACCOUNT_IP, options["clear"])
                else:
                    raise CommandError("--clear-all needs the database throttle; clear one KEY at a time.")
            else:
                count = throttle.clear(key=options["clear"]) if options["clear"] else throttle.clear()
            self.stdout.write(f"cleared {count}")
            return
        if not isinstance(throttle, DatabaseThrottle):
            # A cache cannot be listed by prefix portably (Redis, Memcached): say so rather than "no lock-outs".
            raise CommandError(
                f"{type(throttle).__name__} keeps lock-outs in a cache, which cannot be listed; lift one with "
                '--clear IP or --clear "name|IP" (the database throttle lists them).'
            )
        now = timezone.now()
        rows = LoginThrottle.objects.filter(locked_until__gt=now).order_by("locked_until")
        if not rows:
            self.stdout.write("no lock-outs")
        for row in rows:
            self.stdout.write(f"{row.scope:8} {row.key}  until {row.locked_until:%Y-%m-%d %H:%M:%S %Z}")
