"""Who is on the other end: trusted networks, the plaintext policy, and the unit that limits count by."""

import ipaddress
from functools import lru_cache

from popserver.conf import get_setting


@lru_cache(maxsize=4096)  # every connection asks about its peer several times; most peers come back
def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _in_networks(ip: str, setting: str) -> bool:
    address = _address(ip)
    if address is None:
        return False
    return any(address in _network(net) for net in get_setting(setting))


@lru_cache(maxsize=256)
def _network(net: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(net, strict=False)


def is_trusted_peer(ip: str) -> bool:
    """True if ``ip`` is in POPSERVER_TRUSTED_NETWORKS (loopback by default)."""
    return _in_networks(ip, "TRUSTED_NETWORKS")


def is_trusted_proxy(ip: str) -> bool:
    """True if ``ip`` may send PROXY headers: it is in POPSERVER_PROXY_TRUSTED_NETWORKS (empty by default)."""
    return _in_networks(ip, "PROXY_TRUSTED_NETWORKS")


def is_lmtp_peer(ip: str) -> bool:
    """True if ``ip`` may speak LMTP to runlmtp: it is in POPSERVER_LMTP_TRUSTED_NETWORKS (loopback by default)."""
    return _in_networks(ip, "LMTP_TRUSTED_NETWORKS")


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
