"""Who is on the other end: trusted networks, the plaintext policy, and the unit that limits count by."""

import ipaddress

from popserver.conf import get_setting


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_trusted_peer(ip: str) -> bool:
    """True if ``ip`` is in POPSERVER_TRUSTED_NETWORKS (loopback by default)."""
    return in_networks(ip, get_setting("TRUSTED_NETWORKS"))


def in_networks(ip: str, networks) -> bool:
    """True if ``ip`` (an IPv4-mapped IPv6 address counts as IPv4) is in one of ``networks`` (CIDR strings)."""
    address = _address(ip)
    if address is None:
        return False
    return any(address in ipaddress.ip_network(net, strict=False) for net in networks)


def peer_group(ip: str) -> str:
    """The unit that connection caps and the login throttle count by: an IPv4 address, or an IPv6 /64 (one
    host's usual allocation, so a /64 cannot pose as billions of clients)."""
    address = _address(ip)
    if address is None:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def plaintext_allowed(*, tls_active: bool, trusted: bool) -> bool:
    """Dovecot's ``disable_plaintext_auth``: passwords in the clear only over TLS or from a trusted network,
    unless POPSERVER_PLAINTEXT_AUTH says "always" (or "never": TLS even from trusted ones)."""
    policy = get_setting("PLAINTEXT_AUTH")
    if tls_active or policy == "always":
        return True
    return policy == "trusted" and trusted
