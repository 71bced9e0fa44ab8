"""Who is on the other end: trusted networks, and the unit that limits count by."""
import ipaddress

from .conf import get_setting


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
