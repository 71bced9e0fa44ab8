"""``python -m popserver.conformance pop3://USER:PASSWORD@HOST:PORT``: the command line, and ``run()``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from popserver.conformance import __version__
from popserver.conformance.checks import CHECKS, SECTIONS, unknown_patterns
from popserver.conformance.client import ProtocolError
from popserver.conformance.delivery import CommandDeliverer, Deliverer, DeliveryError, SmtpDeliverer
from popserver.conformance.probes import PROBES, deliver_corpus, first_contact, first_login, global_checks
from popserver.conformance.report import as_json, as_markdown, terminal
from popserver.conformance.runner import NOT_RUN, SKIP, Config, Context, Report, SetupError

PASSWORD_ENV = "POP3_CONFORMANCE_PASSWORD"
EXIT_OK, EXIT_MUST_FAILED, EXIT_ERROR = 0, 1, 2


def run(config: Config, deliverer: Deliverer | None, say: Callable[[str], None] | None = None) -> Report:
    """Run every selected check against the server; never raises for what the server does."""
    ctx = Context(config, deliverer, say)
    started, clock = time.time(), time.monotonic()
    error = ""
    try:
        first_contact(ctx)
        first_login(ctx)
        probes = [p for p in PROBES if ctx.wants(*p.ids)]
        if deliverer is None:
            for p in probes:
                for check_id in p.ids if p.needs_corpus else ():
                    ctx.skip(check_id, "needs mail: give --deliver-command, --lmtp or --smtp")
            probes = [p for p in probes if not p.needs_corpus]
        elif any(p.needs_corpus for p in probes):
            deliver_corpus(ctx)
        for p in probes:
            try:
                p.function(ctx)
            except (ProtocolError, DeliveryError, OSError) as exc:
                stopped(ctx, p.ids, f"{p.name} stopped: {exc}")
            except Exception as exc:  # a reply so far off that the probe could not follow it
                stopped(ctx, p.ids, f"{p.name} stopped on a reply it could not follow ({exc!r})")
            finally:
                ctx.drop_connections()  # a probe cut short must not leave a session holding the lock
        global_checks(ctx)
    except SetupError as exc:
        error = str(exc)
    except DeliveryError as exc:
        error = f"delivery failed: {exc}"
    except (ProtocolError, OSError) as exc:
        error = str(exc)
    finally:
        ctx.drop_connections()
        if ctx.mail_delivered and not config.keep_mail:
            try:
                ctx.empty_mailbox("Cleaning up")
            except (ProtocolError, SetupError, OSError) as exc:
                ctx.say(f"Cleaning up failed: {exc}")
    for result in ctx.results.values():
        if result.status == NOT_RUN:
            result.status = SKIP
            result.reason = f"not reached: {error}" if error else "not run"
    return Report(
        config=config,
        delivery=deliverer.describe() if deliverer is not None else "none",
        results=list(ctx.results.values()),
        greeting=ctx.greeting.show(200) if ctx.greeting is not None else "",
        capabilities=ctx.capa_before,
        tls_capabilities=ctx.capa_tls,
        started=started,
        duration=time.monotonic() - clock,
        error=error,
    )


def stopped(ctx: Context, ids: tuple[str, ...], why: str) -> None:
    for check_id in ids:
        if ctx.status(check_id) == NOT_RUN:
            ctx.fail(check_id, f"not reached: {why}")


def parse_url(url: str) -> tuple[str, int, str, str | None, bool]:
    """(host, port, user, password or None, implicit TLS) from ``pop3://USER:PASSWORD@HOST:PORT``."""
    parts = urlsplit(url)
    if parts.scheme not in ("pop3", "pop3s"):
        raise ValueError("the URL must start with pop3:// or pop3s://")
    if not parts.hostname or parts.username is None:
        raise ValueError("the URL needs a user and a host: pop3://USER:PASSWORD@HOST:PORT")
    implicit = parts.scheme == "pop3s"
    port = parts.port or (995 if implicit else 110)
    password = unquote(parts.password) if parts.password is not None else None
    return parts.hostname, port, unquote(parts.username), password, implicit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m popserver.conformance",
        description="A black-box POP3 conformance kit: RFC 1939, 2449, 2595/8314, 5034, 6856 and UIDL rules, "
        "with byte-exact checks of a corpus of tricky messages. It empties the mailbox first.",
        epilog=f"The password may also come from ${PASSWORD_ENV}. Exit status: 0 when every MUST passed, "
        "1 when a MUST failed, 2 when the run could not be completed.",
    )
    parser.add_argument("url", nargs="?", help="pop3://USER:PASSWORD@HOST:PORT or pop3s://... (implicit TLS)")
    parser.add_argument(
        "--i-understand-this-deletes-mail",
        dest="consent",
        action="store_true",
        help="required with a delivery option: the kit then deletes every message in the mailbox, before and "
        "after its checks (without one it runs only the checks that need no mail, and deletes nothing)",
    )
    delivery = parser.add_argument_group("delivery of the test messages (one is required)")
    group = delivery.add_mutually_exclusive_group()
    group.add_argument(
        "--deliver-command",
        metavar="CMD",
        help="an MDA fed each message on stdin; {user} "
        "and {recipient} are replaced (e.g. 'python manage.py deliver {user}', "
        "'dovecot-lda -d {user}')",
    )
    group.add_argument("--lmtp", metavar="HOST:PORT", help="LMTP server (RFC 2033), or a Unix socket path")
    group.add_argument(
        "--smtp", metavar="HOST:PORT", help="SMTP server (RFC 5321) that delivers to the mailbox"
    )
    delivery.add_argument("--recipient", help="RCPT TO address for LMTP/SMTP (default: the POP3 user)")
    delivery.add_argument("--sender", default="conformance@example.invalid", help="MAIL FROM address")
    delivery.add_argument(
        "--delivery-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for delivered mail to show up (default 60)",
    )
    tls = parser.add_argument_group("TLS")
    tls.add_argument("--stls", action="store_true", help="STLS (RFC 2595) before every login")
    tls.add_argument("--cafile", help="trust the CA certificates in this PEM file")
    tls.add_argument("--insecure", action="store_true", help="do not verify the server's certificate")
    tuning = parser.add_argument_group("the run")
    tuning.add_argument(
        "--auth",
        choices=("auto", "user", "plain"),
        default="auto",
        help="log in with USER/PASS or AUTH PLAIN (default: what CAPA offers)",
    )
    tuning.add_argument("--only", metavar="IDS", help="comma-separated check ids, sections or prefixes")
    tuning.add_argument("--skip", metavar="IDS", help="comma-separated check ids, sections or prefixes")
    tuning.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds to wait for the server to send anything (default 20)",
    )
    tuning.add_argument(
        "--lock-wait",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds to retry a login refused because a dropped session still holds the lock (default 10)",
    )
    tuning.add_argument(
        "--no-failed-login",
        action="store_true",
        help="skip the wrong-password check (it counts towards lock-outs)",
    )
    tuning.add_argument(
        "--autologout-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="idle this long in a session, then check it still works (600 tests RFC 1939's "
        "ten minutes; default: not tried)",
    )
    tuning.add_argument("--keep-mail", action="store_true", help="leave the test messages in the mailbox")
    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="FILE", help="write a JSON report to FILE ('-' for stdout)")
    output.add_argument("--markdown", metavar="FILE", help="write a Markdown report to FILE ('-' for stdout)")
    output.add_argument(
        "-v", "--verbose", action="store_true", help="show reasons and notes of passed checks"
    )
    output.add_argument(
        "--trace", action="store_true", help="show the conversation on stderr (passwords masked)"
    )
    output.add_argument("--list-checks", action="store_true", help="list the checks and exit")
    output.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def list_checks() -> str:
    lines = []
    for section, title in SECTIONS.items():
        lines.append(title)
        for check in CHECKS:
            if check.section == section:
                lines.append(f"  {check.level:16}  {check.id:34} {check.title} [{check.citation}]")
    return "\n".join(lines) + "\n"


def _split(text: str | None) -> list[str] | None:
    return [p.strip() for p in text.split(",") if p.strip()] if text else None


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
    else:
        with open(target, "w", encoding="utf-8") as handle:
            handle.write(text)


def main(argv: list[str] | None = None, deliverer: Deliverer | None = None) -> int:
    """The command line. ``deliverer`` (for embedding and tests) replaces the delivery options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_checks:
        sys.stdout.write(list_checks())
        return EXIT_OK
    if not args.url:
        parser.error("the server's URL is required: pop3://USER:PASSWORD@HOST:PORT")
    try:
        host, port, user, password, implicit = parse_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    if password is None:
        password = os.environ.get(PASSWORD_ENV)
        if password is None:
            parser.error(f"no password: put it in the URL or in ${PASSWORD_ENV}")
    delivers = deliverer is not None or args.deliver_command or args.lmtp or args.smtp
    if delivers and not args.consent:
        parser.error(
            f"this kit deletes every message in {user}'s mailbox (before and after its checks); "
            "add --i-understand-this-deletes-mail to go on"
        )
    if implicit and args.stls:
        parser.error("--stls and pop3s:// do not go together")
    if args.json == "-" and args.markdown == "-":
        parser.error("only one report can go to stdout")
    only, skip = _split(args.only), _split(args.skip)
    unknown = unknown_patterns((only or []) + (skip or []))
    if unknown:
        parser.error(f"no such checks or sections: {', '.join(unknown)} (see --list-checks)")
    recipient = args.recipient or user
    if deliverer is None:
        try:
            if args.deliver_command:
                deliverer = CommandDeliverer(args.deliver_command, user, recipient)
            elif args.lmtp:
                deliverer = SmtpDeliverer(args.lmtp, recipient, args.sender, lmtp=True)
            elif args.smtp:
                deliverer = SmtpDeliverer(args.smtp, recipient, args.sender)
        except (ValueError, DeliveryError) as exc:
            parser.error(str(exc))
    config = Config(
        host=host,
        port=port,
        user=user,
        password=password,
        implicit_tls=implicit,
        stls=args.stls,
        cafile=args.cafile,
        insecure=args.insecure,
        auth=args.auth,
        timeout=args.timeout,
        delivery_timeout=args.delivery_timeout,
        lock_wait=args.lock_wait,
        failed_login=not args.no_failed_login,
        autologout_wait=args.autologout_wait,
        keep_mail=args.keep_mail,
        only=only,
        skip=skip,
        trace=args.trace,
    )
    report = run(config, deliverer)
    to_stdout = "-" in (args.json, args.markdown)
    summary = terminal(report, verbose=args.verbose)
    (sys.stderr if to_stdout else sys.stdout).write(summary)
    if args.json:
        _write(args.json, as_json(report))
    if args.markdown:
        _write(args.markdown, as_markdown(report))
    if report.error:
        return EXIT_ERROR
    return EXIT_OK if report.ok else EXIT_MUST_FAILED
