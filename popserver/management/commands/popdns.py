"""``manage.py popdns [DOMAIN...]``: the DNS records mail clients need, in zone-file syntax."""

from django.core.management.base import BaseCommand, CommandError

from popserver.clientconfig.dns import NothingToPublish, zone_for_domains
from popserver.clientconfig.published import SettingsError


class Command(BaseCommand):
    help = (
        "Print the DNS records that let mail clients find the POP3 server and their settings: RFC 6186 SRV "
        "records, autoconfig and autodiscover host names, Outlook's _autodiscover._tcp SRV record."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "domains", nargs="*", metavar="DOMAIN", help="mail domains (default: every one served)"
        )
        parser.add_argument(
            "--web-host",
            default="",
            help="the web server that runs this site over HTTPS (default: the POP3 host)",
        )
        parser.add_argument("--ttl", type=int, default=3600, help="seconds (default 3600)")

    def handle(self, *args, **options):
        if options["ttl"] < 0:
            raise CommandError("--ttl must be 0 or more.")
        try:
            lines = zone_for_domains(options["domains"], web_host=options["web_host"], ttl=options["ttl"])
        except (NothingToPublish, SettingsError) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write("\n".join(lines))
