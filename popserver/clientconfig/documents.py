"""The documents mail clients read: Thunderbird's autoconfig XML, Microsoft's autodiscover XML (request and
response) and Apple's configuration profile. Built with ElementTree and plistlib, so every value is escaped.
Pure functions of a ``DomainConfig`` and a login name: no database, no request.
"""

from __future__ import annotations

import plistlib
import uuid
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime

from .published import DomainConfig, Endpoint

# Thunderbird's placeholder, replaced by the address the user typed (for requests without one).
EMAILADDRESS = "%EMAILADDRESS%"

# Thunderbird's socketType for each security.
SOCKET_TYPES = {"tls": "SSL", "starttls": "STARTTLS", "none": "plain"}

# Microsoft's POX autodiscover (MS-OXDSCLI s.2.2.4): the response is in the outer namespace, the Response
# element in the schema the client accepts. SSL on = implicit TLS; Encryption TLS = STARTTLS.
AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
MOBILESYNC_SCHEMA = "http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/2006"
OUTLOOK_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
ENCRYPTION = {"tls": "SSL", "starttls": "TLS", "none": "None"}
# MS-OXDSCLI s.2.2.4.1.1.3.1 error codes.
INVALID_REQUEST = 600  # the XML request was improperly formatted
SCHEMA_UNAVAILABLE = 601  # no configuration of the requested type
MAX_REQUEST_BYTES = 16 * 1024  # Outlook's request is about 400 octets

MOBILECONFIG_TYPE = "application/x-apple-aspen-config"


def _sub(parent: ET.Element, tag: str, text: str | int | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = str(text)
    return element


def _serialize(root: ET.Element) -> bytes:
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8") + b"\n"


# Thunderbird ---------------------------------------------------------------------------------------------
def autoconfig_xml(config: DomainConfig, username: str = EMAILADDRESS) -> bytes:
    """Thunderbird's ``config-v1.1.xml``: one ``incomingServer type="pop3"`` per published endpoint, in the
    operator's order; ``username`` the login to send (``%EMAILADDRESS%`` when the client did not say)."""
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider", id=config.domain or config.provider_name)
    if config.domain:
        _sub(provider, "domain", config.domain)
    _sub(provider, "displayName", config.provider_name)
    _sub(provider, "displayShortName", config.provider_name)
    for endpoint in config.endpoints:
        server = _sub(provider, "incomingServer", type="pop3")
        _server_fields(server, endpoint, username)
        pop3 = _sub(server, "pop3")
        _sub(pop3, "leaveMessagesOnServer", "true" if config.leave_messages_on_server else "false")
        if config.days_to_leave_messages:
            _sub(pop3, "daysToLeaveMessagesOnServer", config.days_to_leave_messages)
    if config.outgoing is not None:
        server = _sub(provider, "outgoingServer", type="smtp")
        _server_fields(server, config.outgoing, username)
    return _serialize(root)


def _server_fields(server: ET.Element, endpoint: Endpoint, username: str) -> None:
    _sub(server, "hostname", endpoint.host)
    _sub(server, "port", endpoint.port)
    _sub(server, "socketType", SOCKET_TYPES[endpoint.security])
    if endpoint.authentication == "none":
        _sub(server, "authentication", "none")
    else:
        _sub(server, "username", username)
        _sub(server, "authentication", "password-cleartext")


# Microsoft -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AutodiscoverRequest:
    email_address: str
    response_schema: str


class BadAutodiscoverRequest(ValueError):
    pass


class _NoDoctype(ET.TreeBuilder):
    """Refuses any DTD, so no entity is ever declared or expanded (billion laughs, external entities)."""

    def doctype(self, name, pubid, system):
        raise BadAutodiscoverRequest("a DTD in the request")


def parse_autodiscover_request(body: bytes) -> AutodiscoverRequest:
    """The address and accepted schema of a POX autodiscover request (MS-OXDSCLI s.2.2.3), whatever the
    namespace the client used; raises ``BadAutodiscoverRequest``."""
    if len(body) > MAX_REQUEST_BYTES:
        raise BadAutodiscoverRequest("request too large")
    parser = ET.XMLParser(target=_NoDoctype())
    try:
        parser.feed(body)
        root = parser.close()
    except (ET.ParseError, ValueError) as exc:
        raise BadAutodiscoverRequest(str(exc)) from None
    fields: dict[str, str] = {}
    for element in root.iter():
        name = element.tag.rpartition("}")[2] if isinstance(element.tag, str) else ""
        if name in ("EMailAddress", "AcceptableResponseSchema") and name not in fields:
            fields[name] = (element.text or "").strip()
    if not fields.get("EMailAddress"):
        raise BadAutodiscoverRequest("no EMailAddress")
    return AutodiscoverRequest(
        fields["EMailAddress"], fields.get("AcceptableResponseSchema") or OUTLOOK_SCHEMA
    )


def autodiscover_request_xml(address: str, schema: str = OUTLOOK_SCHEMA) -> bytes:
    """The request Outlook POSTs (for tests and for operators checking their site)."""
    root = ET.Element("Autodiscover", xmlns=OUTLOOK_REQUEST_NS)
    request = _sub(root, "Request")
    _sub(request, "EMailAddress", address)
    _sub(request, "AcceptableResponseSchema", schema)
    return _serialize(root)


def autodiscover_xml(config: DomainConfig, login_name: str) -> bytes:
    """The 2006a "outlook" response: a ``POP3`` Protocol per published endpoint, then ``SMTP`` when an
    outgoing server is configured. The same shape for every address of a served domain."""
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = _sub(root, "Response", xmlns=OUTLOOK_SCHEMA)
    account = _sub(response, "Account")
    _sub(account, "AccountType", "email")
    _sub(account, "Action", "settings")
    for endpoint in config.endpoints:
        protocol = _protocol(account, "POP3", endpoint, login_name)
        _sub(protocol, "AuthRequired", "on")
    if config.outgoing is not None:
        protocol = _protocol(account, "SMTP", config.outgoing, login_name)
        password = config.outgoing.authentication == "password"
        _sub(protocol, "AuthRequired", "on" if password else "off")
        _sub(protocol, "UsePOPAuth", "on" if password else "off")
        _sub(protocol, "SMTPLast", "off")
    return _serialize(root)


def _protocol(account: ET.Element, kind: str, endpoint: Endpoint, login_name: str) -> ET.Element:
    protocol = _sub(account, "Protocol")
    _sub(protocol, "Type", kind)
    _sub(protocol, "Server", endpoint.host)
    _sub(protocol, "Port", endpoint.port)
    _sub(protocol, "LoginName", login_name)
    _sub(protocol, "DomainRequired", "off")
    _sub(protocol, "SPA", "off")
    _sub(protocol, "SSL", "on" if endpoint.security == "tls" else "off")
    _sub(protocol, "Encryption", ENCRYPTION[endpoint.security])
    return protocol


def autodiscover_error_xml(
    code: int, message: str, server_name: str = "", schema: str = OUTLOOK_SCHEMA
) -> bytes:
    """An ``Error`` response (MS-OXDSCLI s.2.2.4.1.1.3): Time is the time of day, Id a hash of the server's
    name, as Exchange sends them."""
    if schema not in (OUTLOOK_SCHEMA, MOBILESYNC_SCHEMA):
        schema = OUTLOOK_SCHEMA
    root = ET.Element("Autodiscover", xmlns=AUTODISCOVER_NS)
    response = _sub(root, "Response", xmlns=schema)
    error = _sub(
        response,
        "Error",
        Time=datetime.now(UTC).strftime("%H:%M:%S.%f"),
        Id=str(zlib.crc32(server_name.encode())),
    )
    _sub(error, "ErrorCode", code)
    _sub(error, "Message", message)
    _sub(error, "DebugData")
    return _serialize(root)


# Apple ---------------------------------------------------------------------------------------------------
def mobileconfig(
    config: DomainConfig, *, account_key: str, username: str, address: str | None, full_name: str = ""
) -> bytes:
    """An unsigned configuration profile with one ``com.apple.mail.managed`` payload (POP). Apple requires an
    outgoing server, so ``config.outgoing`` must be set. ``account_key`` identifies the account on this site:
    installing a newer profile for it replaces the older one."""
    if config.outgoing is None:
        raise ValueError("Apple's Mail payload requires an outgoing (SMTP) server")
    incoming = config.preferred
    if incoming is None:
        raise ValueError("nothing is published")
    identifier = ".".join(reversed(incoming.host.split("."))) + ".popserver." + account_key
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"popserver:{incoming.host}:{account_key}")
    outgoing = config.outgoing
    mail = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier + ".mail",
        "PayloadUUID": str(uuid.uuid5(namespace, "mail")).upper(),
        "PayloadDisplayName": f"{config.provider_name} mail",
        "EmailAccountDescription": f"{config.provider_name} ({address or username})",
        "EmailAccountType": "EmailTypePOP",
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": incoming.host,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": incoming.security != "none",
        "IncomingMailServerUsername": username,
        "OutgoingMailServerAuthentication": (
            "EmailAuthPassword" if outgoing.authentication == "password" else "EmailAuthNone"
        ),
        "OutgoingMailServerHostName": outgoing.host,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": outgoing.security != "none",
    }
    if address:
        mail["EmailAddress"] = address
    if full_name:
        mail["EmailAccountName"] = full_name
    if outgoing.authentication == "password":
        mail["OutgoingMailServerUsername"] = username
        mail["OutgoingPasswordSameAsIncomingPassword"] = True
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": identifier,
        "PayloadUUID": str(uuid.uuid5(namespace, "profile")).upper(),
        "PayloadDisplayName": f"{config.provider_name}: {address or username}",
        "PayloadDescription": f"Sets up the POP3 account {address or username} in Mail.",
        "PayloadOrganization": config.provider_name,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [mail],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML, sort_keys=True)
