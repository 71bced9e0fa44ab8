"""The discovery endpoints mail clients ask before the user types any server name. Include
``popserver.clientconfig.urls`` at the root of the site: the paths are fixed by the clients.

Bad input never raises: a malformed address is a 400 (autoconfig) or an ``Error`` response (autodiscover).
"""

from __future__ import annotations

import logging

from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.http.request import split_domain_port
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods, require_safe

from . import documents
from .logins import is_plausible_address, login_for_address
from .published import SettingsError, domain_config, domain_of

logger = logging.getLogger(__name__)

XML = "application/xml; charset=utf-8"
AUTOCONFIG_PREFIX = "autoconfig."


@require_safe
def autoconfig(request: HttpRequest) -> HttpResponse:
    """Thunderbird's ``config-v1.1.xml``, at ``/mail/config-v1.1.xml`` (host ``autoconfig.<domain>``) and
    ``/.well-known/autoconfig/mail/config-v1.1.xml``.

    With ``?emailaddress=`` the domain is the address's and ``username`` the login that works for it;
    without (Thunderbird for Android asks so), the domain is the host's (less ``autoconfig.``) and
    ``username`` is ``%EMAILADDRESS%``, which the client fills in. A domain the site does not serve: 404.
    """
    address = request.GET.get("emailaddress", "").strip()
    if address:
        if not is_plausible_address(address):
            return HttpResponseBadRequest("emailaddress is not a mail address\n", content_type="text/plain")
        domain = domain_of(address)
    else:
        domain = split_domain_port(request.get_host())[0].removeprefix(AUTOCONFIG_PREFIX)
    config = _config_or_404(domain)
    username = login_for_address(address) if address else documents.EMAILADDRESS
    return HttpResponse(documents.autoconfig_xml(config, username), content_type=XML)


@csrf_exempt  # clients POST without a session; the answer reveals nothing a GET would not
@require_http_methods(["GET", "POST"])
def autodiscover(request: HttpRequest) -> HttpResponse:
    """Outlook's POX autodiscover (MS-OXDSCLI s.2.2): POST the request XML; GET with ``?emailaddress=`` is
    answered the same way. Every address of a served domain gets the same shape of answer, known or not;
    errors are ``Error`` responses with HTTP 200, as Exchange sends them."""
    server_name = request.get_host()
    schema = documents.OUTLOOK_SCHEMA
    try:
        if request.method == "POST":
            parsed = documents.parse_autodiscover_request(request.read(documents.MAX_REQUEST_BYTES + 1))
            address, schema = parsed.email_address, parsed.response_schema
        else:
            address = request.GET.get("emailaddress", "").strip()
    except documents.BadAutodiscoverRequest as exc:
        logger.info("autodiscover: bad request from %s: %s", request.META.get("REMOTE_ADDR"), exc)
        return _autodiscover_error(documents.INVALID_REQUEST, "Invalid Request", server_name, schema)
    if schema != documents.OUTLOOK_SCHEMA:
        return _autodiscover_error(
            documents.SCHEMA_UNAVAILABLE, "Provider is not available", server_name, schema
        )
    if not is_plausible_address(address):
        return _autodiscover_error(documents.INVALID_REQUEST, "Invalid Request", server_name, schema)
    try:
        config = domain_config(domain_of(address))
    except SettingsError:
        logger.exception("autodiscover: the client-configuration settings are broken")
        config = None
    if config is None:  # a domain this site does not serve
        return _autodiscover_error(documents.INVALID_REQUEST, "Invalid Request", server_name, schema)
    return HttpResponse(documents.autodiscover_xml(config, login_for_address(address)), content_type=XML)


def _autodiscover_error(code: int, message: str, server_name: str, schema: str) -> HttpResponse:
    return HttpResponse(
        documents.autodiscover_error_xml(code, message, server_name, schema), content_type=XML
    )


def _config_or_404(domain: str):
    try:
        config = domain_config(domain)
    except SettingsError:
        logger.exception("autoconfig: the client-configuration settings are broken")
        config = None
    if config is None:
        raise Http404("No mail configuration is published for this domain.")
    return config
