"""Checks of the login settings: trusted networks, the plaintext policy, passwords, throttling."""

import ipaddress

from django.conf import settings
from django.core.checks import Error, Warning, register

from popserver.conf import get_setting

# Caches that live inside one process: every runpop3 process would count failures on its own.
PROCESS_LOCAL_CACHES = (
    "django.core.cache.backends.locmem.LocMemCache",
    "django.core.cache.backends.dummy.DummyCache",
)


@register()
def check_trusted_networks(app_configs=None, **kwargs):
    errors = []
    for name in ("TRUSTED_NETWORKS", "LMTP_TRUSTED_NETWORKS"):
        try:
            networks = get_setting(name)
            if isinstance(networks, str):  # a string is iterable too, one character at a time
                raise TypeError(f"a list is needed, not the string {networks!r}")
            for network in networks:
                ipaddress.ip_network(network, strict=False)
        except (TypeError, ValueError) as exc:
            errors.append(Error(f"POPSERVER_{name} is not a list of networks: {exc}", id="popserver.E002"))
    return errors


@register()
def check_plaintext_policy(app_configs=None, **kwargs):
    policy = get_setting("PLAINTEXT_AUTH")
    if policy not in ("trusted", "always", "never"):
        return [
            Error(
                f"POPSERVER_PLAINTEXT_AUTH must be 'trusted', 'always' or 'never', not {policy!r}.",
                id="popserver.E003",
            )
        ]
    if policy == "always":
        return [
            Warning(
                "POPSERVER_PLAINTEXT_AUTH = 'always': passwords are accepted in the clear from any network.",
                hint="Use 'trusted' (the default) and give runpop3 a certificate for STLS and POP3S.",
                id="popserver.W004",
            )
        ]
    return []


@register()
def check_accepted_passwords(app_configs=None, **kwargs):
    accepted = get_setting("ACCEPTED_PASSWORDS")
    if accepted not in ("account", "app", "both"):
        return [
            Error(
                f"POPSERVER_ACCEPTED_PASSWORDS must be 'account', 'app' or 'both', not {accepted!r}.",
                id="popserver.E005",
            )
        ]
    return []


@register()
def check_password_hasher(app_configs=None, **kwargs):
    hashers = getattr(settings, "PASSWORD_HASHERS", [])
    if hashers and not hashers[0].endswith("Argon2PasswordHasher"):
        return [
            Warning(
                "Argon2 is not the first of PASSWORD_HASHERS: POP3 passwords are hashed with "
                f"{hashers[0].rsplit('.', 1)[-1]}.",
                hint="Put 'django.contrib.auth.hashers.Argon2PasswordHasher' first.",
                id="popserver.W001",
            )
        ]
    return []


@register()
def check_throttle_cache(app_configs=None, **kwargs):
    if not str(get_setting("THROTTLE")).endswith("CacheThrottle"):
        return []
    alias = get_setting("THROTTLE_CACHE")
    backend = getattr(settings, "CACHES", {}).get(alias, {}).get("BACKEND")
    if backend is None:
        return [
            Error(
                f"POPSERVER_THROTTLE_CACHE names the cache {alias!r}, which CACHES does not define.",
                id="popserver.E004",
            )
        ]
    if backend in PROCESS_LOCAL_CACHES:
        return [
            Warning(
                f"The throttle cache {alias!r} ({backend.rsplit('.', 1)[-1]}) is not shared between processes: "
                "each runpop3 process counts failed logins on its own.",
                hint="Use Redis or Memcached, or the database throttle (the default).",
                id="popserver.W005",
            )
        ]
    return []


@register()
def check_client_workarounds(app_configs=None, **kwargs):
    from popserver.protocol.session import CLIENT_WORKAROUNDS

    value = get_setting("CLIENT_WORKAROUNDS")
    if not isinstance(value, list | tuple | set | frozenset) or not all(
        isinstance(item, str) for item in value
    ):
        return [Error("POPSERVER_CLIENT_WORKAROUNDS must be a list of names.", id="popserver.E011")]
    if unknown := sorted(set(value) - set(CLIENT_WORKAROUNDS)):
        return [
            Error(
                f"POPSERVER_CLIENT_WORKAROUNDS has unknown workarounds: {', '.join(unknown)}.",
                hint=f"Known: {', '.join(CLIENT_WORKAROUNDS)}.",
                id="popserver.E011",
            )
        ]
    return []


@register()
def check_protocol_texts(app_configs=None, **kwargs):
    """The greeting and the CAPA IMPLEMENTATION tag go on the wire as they are: one line of text."""
    messages = []
    for name in ("GREETING", "IMPLEMENTATION"):
        value = get_setting(name)
        if not isinstance(value, str) or any(ch in value for ch in "\r\n\0") or len(value) > 200:
            messages.append(
                Error(
                    f"POPSERVER_{name} must be one line of text (at most 200 characters), not {value!r}.",
                    id="popserver.E013",
                )
            )
    return messages
