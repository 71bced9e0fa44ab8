"""``{{ size|octets }}``: sizes in the one unit system of popserver (binary: KiB, MiB, GiB), as the README and
the quota fields use them."""

from django import template

from popserver.mailin.quota import format_octets

register = template.Library()


@register.filter
def octets(value) -> str:
    try:
        return format_octets(int(value))
    except (TypeError, ValueError):
        return ""
