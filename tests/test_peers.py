"""Trusted networks and the unit that limits count by."""

from django.test import override_settings

from popserver.logins.peers import is_trusted_peer, peer_group


def test_trusted_networks():
    assert is_trusted_peer("127.0.0.1") and is_trusted_peer("::1") and is_trusted_peer("::ffff:127.0.0.1")
    assert not is_trusted_peer("203.0.113.5") and not is_trusted_peer("not an address")
    with override_settings(POPSERVER_TRUSTED_NETWORKS=["10.0.0.0/8"]):
        assert is_trusted_peer("10.1.2.3") and not is_trusted_peer("127.0.0.1")


def test_ipv6_counts_by_64_and_mapped_ipv4_as_ipv4():
    assert peer_group("2001:db8:1:2:aaaa::1") == peer_group("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert peer_group("2001:db8:1:3::1") != peer_group("2001:db8:1:2::1")
    assert peer_group("::ffff:198.51.100.7") == "198.51.100.7"
    assert peer_group("198.51.100.7") == "198.51.100.7"
    assert peer_group("fe80::1%eth0") == "fe80::/64"
