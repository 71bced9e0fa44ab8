"""The DNS records that let mail clients find a domain's POP3 server and this site's configuration, in
zone-file syntax (RFC 1035 s.5.1): RFC 6186 SRV records, the autoconfig and autodiscover host names, and
Outlook's ``_autodiscover._tcp`` SRV record."""

from __future__ import annotations

from .published import DomainConfig, domain_config, normalize_domain, served_domains

# RFC 6186 s.3.2: "_pop3s" for implicit TLS (port 995), "_pop3" for the plain port (STLS or none).
POP3_SERVICES = {"tls": "_pop3s._tcp", "starttls": "_pop3._tcp", "none": "_pop3._tcp"}
# RFC 8314 s.5.1 / RFC 6186 s.3.1: "_submissions" for implicit TLS (465), "_submission" otherwise (587).
SUBMISSION_SERVICES = {"tls": "_submissions._tcp", "starttls": "_submission._tcp", "none": "_submission._tcp"}


def absolute(name: str) -> str:
    """``name`` as a fully qualified, IDNA-encoded zone-file name (trailing dot)."""
    name = name.strip().rstrip(".")
    return name.encode("idna").decode("ascii") + "."


def zone_records(config: DomainConfig, *, web_host: str, ttl: int = 3600) -> list[str]:
    """Zone-file lines for ``config.domain``. ``web_host`` is the web server that runs this Django site over
    HTTPS: ``autoconfig.<domain>`` and ``autodiscover.<domain>`` must reach it."""
    domain = config.domain or ""
    lines = [f"; {domain}: POP3 for mail clients (RFC 6186), Thunderbird autoconfig, Outlook autodiscover"]

    def record(owner: str, kind: str, data: str) -> None:
        lines.append(f"{absolute(owner):<40} {ttl:>6} IN {kind:<5} {data}")

    # RFC 6186 s.3.4: lower priority is preferred; the operator's order of preference.
    for priority, endpoint in enumerate(config.endpoints):
        record(
            f"{POP3_SERVICES[endpoint.security]}.{domain}",
            "SRV",
            f"{priority * 10} 1 {endpoint.port} {absolute(endpoint.host)}",
        )
    if config.outgoing is not None:
        record(
            f"{SUBMISSION_SERVICES[config.outgoing.security]}.{domain}",
            "SRV",
            f"0 1 {config.outgoing.port} {absolute(config.outgoing.host)}",
        )
    web = absolute(web_host)
    record(f"autoconfig.{domain}", "CNAME", web)
    record(f"autodiscover.{domain}", "CNAME", web)
    record(f"_autodiscover._tcp.{domain}", "SRV", f"0 1 443 {web}")
    return lines


class NothingToPublish(Exception):
    """What ``popdns`` cannot print, with the reason for the operator."""


def zone_for_domains(domains: list[str], *, web_host: str = "", ttl: int = 3600) -> list[str]:
    """``zone_records`` for each of ``domains`` (none given: every served domain), blank-line separated.
    ``web_host`` defaults to each domain's first published POP3 host. Raises ``NothingToPublish``."""
    wanted = [normalize_domain(d) for d in domains] or served_domains()
    if not wanted:
        raise NothingToPublish(
            "No mail domain is served: no mailbox has an address and POPSERVER_DOMAINS is unset."
        )
    lines: list[str] = []
    for domain in wanted:
        config = domain_config(domain)
        if config is None:
            raise NothingToPublish(
                f"Nothing is published for {domain}: it is not in POPSERVER_DOMAINS or no mailbox has an address "
                "there, or POPSERVER_PUBLIC_HOSTNAME is empty."
            )
        if lines:
            lines.append("")
        try:
            lines += zone_records(config, web_host=web_host or config.endpoints[0].host, ttl=ttl)
        except UnicodeError as exc:  # a name IDNA cannot encode
            raise NothingToPublish(f"{domain}: {exc}") from None
    return lines
