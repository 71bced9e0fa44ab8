"""System checks of what is published to mail clients (registered in ``PopserverConfig.ready()``).

Ids ``popserver.E180`` and ``popserver.W180``-``W181`` (a block of their own, clear of ``popserver/checks.py``).
No database access: checks also run before ``migrate``.
"""

from django.core.checks import Error, Warning
from django.core.exceptions import ImproperlyConfigured
from django.urls import NoReverseMatch, reverse

from ..conf import get_setting
from .published import SettingsError, build_config, domains_setting

PLAINTEXT_POLICY_HINT = {
    "always": "",
    "trusted": " POPSERVER_PLAINTEXT_AUTH = 'trusted' refuses those passwords from outside "
    "POPSERVER_TRUSTED_NETWORKS, so such clients cannot log in at all.",
    "never": " POPSERVER_PLAINTEXT_AUTH = 'never' refuses every password there.",
}


def views_installed() -> bool:
    try:
        reverse("popserver_clientconfig:autoconfig")
    except (NoReverseMatch, ImproperlyConfigured, AttributeError, ImportError):  # also: no URLconf at all
        return False
    return True


def _configs():
    """(label, DomainConfig) for the site-wide settings and each domain of POPSERVER_DOMAINS."""
    configs = [("POPSERVER_PUBLIC_*", build_config(None))]
    for domain, overrides in (domains_setting() or {}).items():
        configs.append((f"POPSERVER_DOMAINS[{domain!r}]", build_config(domain, overrides)))
    return configs


def check_client_configuration(app_configs=None, **kwargs):
    try:
        configs = _configs()
    except SettingsError as exc:
        return [Error(f"Mail-client configuration: {exc}.", id="popserver.E180")]
    messages = []
    installed = views_installed()
    if installed and not any(config.endpoints for _, config in configs):
        messages.append(
            Warning(
                "popserver.clientconfig.urls is installed but publishes nothing: mail clients asking for their "
                "settings get 404.",
                hint="Set POPSERVER_PUBLIC_HOSTNAME (and POPSERVER_PUBLIC_ENDPOINTS if not 995/110).",
                id="popserver.W180",
            )
        )
    policy_hint = PLAINTEXT_POLICY_HINT.get(get_setting("PLAINTEXT_AUTH"), "")
    for label, config in configs:
        plain = [e for e in config.endpoints if e.security == "none" and not e.is_loopback]
        if (
            config.outgoing is not None
            and config.outgoing.security == "none"
            and not config.outgoing.is_loopback
        ):
            plain.append(config.outgoing)
        for endpoint in plain:
            messages.append(
                Warning(
                    f"{label} publishes {endpoint.host}:{endpoint.port} without TLS: clients will send "
                    f"passwords in the clear.{policy_hint if endpoint in config.endpoints else ''}",
                    hint="Publish 'tls' (port 995) or 'starttls' endpoints, with a certificate for runpop3.",
                    id="popserver.W181",
                )
            )
    return messages
