"""Checks of the settings for several nodes behind a load balancer: trusted proxies, the node's name."""

import ipaddress

from django.core.checks import Error, register

from popserver.conf import get_setting


@register()
def check_proxy_trusted_networks(app_configs=None, **kwargs):
    """A typo would refuse every proxied client, or trust a network nobody meant to."""
    networks = get_setting("PROXY_TRUSTED_NETWORKS")
    try:
        if isinstance(networks, str):
            raise TypeError("a string, not a list")
        for network in networks:
            ipaddress.ip_network(network, strict=False)
    except (TypeError, ValueError) as exc:
        return [
            Error(
                f"POPSERVER_PROXY_TRUSTED_NETWORKS is not a list of networks: {exc}",
                hint='For example ["10.0.0.5/32", "2001:db8::/64"]: the addresses of your load balancers.',
                id="popserver.E014",
            )
        ]
    return []


@register()
def check_node_name(app_configs=None, **kwargs):
    """The name goes into log lines and lock rows: one printable word."""
    name = get_setting("NODE_NAME")
    if (
        not isinstance(name, str)
        or len(name) > 64
        or any(not ch.isprintable() or ch.isspace() for ch in name)
    ):
        return [
            Error(
                f"POPSERVER_NODE_NAME must be at most 64 printable characters without spaces, not {name!r}.",
                hint="Leave it empty to use the host name.",
                id="popserver.E015",
            )
        ]
    return []
