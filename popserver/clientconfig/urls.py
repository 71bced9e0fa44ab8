"""Include at the ROOT of the site (the clients ask fixed paths): ``path("", include("popserver.clientconfig.urls"))``.

Serve it on ``autoconfig.<domain>`` and ``autodiscover.<domain>`` too, over HTTPS (README: DNS and web server).
"""

import re

from django.urls import path, re_path

from . import views


def case_insensitive(text: str) -> str:
    """A regex matching ``text`` in any case, that Django can still reverse (it cannot reverse ``(?i)``)."""
    return "".join(f"[{ch.lower()}{ch.upper()}]" if ch.isalpha() else re.escape(ch) for ch in text)


app_name = "popserver_clientconfig"
urlpatterns = [
    path("mail/config-v1.1.xml", views.autoconfig, name="autoconfig"),
    path(".well-known/autoconfig/mail/config-v1.1.xml", views.autoconfig, name="autoconfig-well-known"),
    # Outlook asks /Autodiscover/Autodiscover.xml and /autodiscover/autodiscover.xml.
    re_path(
        f"^{case_insensitive('autodiscover/autodiscover.xml')}$", views.autodiscover, name="autodiscover"
    ),
]
