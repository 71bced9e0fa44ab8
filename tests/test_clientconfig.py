"""Mail clients configure themselves: Thunderbird autoconfig, Outlook autodiscover, the Apple profile, the
set-up page, ``popdns`` and the system checks. XML is read back with a real parser and every field is checked
against the settings; the login name published for an address is checked to log in."""

import http.client
import io
import plistlib
import shutil
import subprocess
import xml.etree.ElementTree as ET
from urllib.parse import quote

import pytest
from django.core.checks import run_checks
from django.core.management import CommandError, call_command
from django.test import override_settings

from popserver.clientconfig import documents
from popserver.exceptions import AuthenticationFailed
from popserver.logins.authenticator import DjangoAuthenticator
from popserver.models import Address

ENDPOINTS = [{"port": 995, "security": "tls"}, {"port": 110, "security": "starttls"}]
SITE = {
    "POPSERVER_PUBLIC_HOSTNAME": "mail.example.com",
    "POPSERVER_PUBLIC_ENDPOINTS": ENDPOINTS,
    "POPSERVER_DOMAINS": None,
    "ALLOWED_HOSTS": ["testserver", "localhost", "127.0.0.1", ".example.com", ".example.org"],
}
OUTGOING = {"host": "smtp.example.com", "port": 587, "security": "starttls", "authentication": "password"}
AD = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
OUTLOOK = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
AUTOCONFIG = "/mail/config-v1.1.xml"
WELL_KNOWN = "/.well-known/autoconfig/mail/config-v1.1.xml"
AUTODISCOVER = "/autodiscover/autodiscover.xml"

# What Thunderbird 128 sends (FetchConfig: encodeURIComponent of the address; XMLHttpRequest's headers).
THUNDERBIRD_HEADERS = {
    "User-Agent": "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Thunderbird/128.5.0",
    "Accept": "*/*",
    "Accept-Language": "en-US,en;q=0.5",
    "Accept-Encoding": "gzip, deflate, br",
    "Connection": "keep-alive",
}
# What Outlook POSTs (MS-OXDSCLI s.2.2.3, s.4.1).
OUTLOOK_HEADERS = {
    "User-Agent": "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17928; Pro)",
    "Content-Type": "text/xml",
    "Accept": "*/*",
    "Connection": "Keep-Alive",
}


@pytest.fixture
def site(settings):
    for name, value in SITE.items():
        setattr(settings, name, value)
    return settings


@pytest.fixture
def alice(make_mailbox):
    """A login name that is not an address, with one address: clients are told the address."""
    return make_mailbox("alice", "alice-password", email="alice@example.com")


@pytest.fixture
def carol(make_mailbox):
    """A login name that is an address, in mixed case, and no Address row: clients are told the login name."""
    return make_mailbox("Carol@example.com", "carol-password")


def logs_in(username: str, password: str) -> bool:
    """True if a POP3 login with these credentials opens the mailbox (through the real authenticator)."""
    try:
        maildrop = DjangoAuthenticator("127.0.0.1", 40000, trusted=True)(username, password)
    except AuthenticationFailed:
        return False
    maildrop.release()
    return True


def local(tag: str) -> str:
    return tag.rpartition("}")[2]


def incoming_servers(root: ET.Element) -> list[dict[str, str]]:
    """Each incomingServer as {field: text}, with its type and its pop3 block's fields."""
    servers = []
    for server in root.iter("incomingServer"):
        fields = {"type": server.get("type")}
        for child in server:
            if child.tag == "pop3":
                fields.update({f"pop3.{c.tag}": c.text for c in child})
            else:
                fields[child.tag] = child.text
        servers.append(fields)
    return servers


def get_autoconfig(client, path=AUTOCONFIG, host="autoconfig.example.com", **query):
    response = client.get(path, query, HTTP_HOST=host)
    return response, (ET.fromstring(response.content) if response.status_code == 200 else None)


def expected_servers(username, host="mail.example.com", endpoints=ENDPOINTS, leave="false", days=None):
    socket_types = {"tls": "SSL", "starttls": "STARTTLS", "none": "plain"}
    servers = []
    for endpoint in endpoints:
        server = {
            "type": "pop3",
            "hostname": host,
            "port": str(endpoint["port"]),
            "socketType": socket_types[endpoint["security"]],
            "username": username,
            "authentication": "password-cleartext",
            "pop3.leaveMessagesOnServer": leave,
        }
        if days:
            server["pop3.daysToLeaveMessagesOnServer"] = str(days)
        servers.append(server)
    return servers


# Thunderbird autoconfig -----------------------------------------------------------------------------------
def test_autoconfig_for_an_address_login_publishes_the_address_and_it_logs_in(client, site, alice):
    response, root = get_autoconfig(client, emailaddress="alice@example.com")
    assert response.status_code == 200 and response["Content-Type"].startswith("application/xml")
    assert response.content.startswith(
        b'<?xml version="1.0" encoding="UTF-8"?>\n<clientConfig version="1.1">'
    )
    assert root.tag == "clientConfig" and root.get("version") == "1.1"
    provider = root.find("emailProvider")
    assert provider.get("id") == "example.com"
    assert [d.text for d in provider.findall("domain")] == ["example.com"]
    assert provider.findtext("displayName") == "example.com"
    assert incoming_servers(root) == expected_servers("alice@example.com")
    assert root.find(".//outgoingServer") is None  # popserver sends no mail and none is configured
    assert logs_in("alice@example.com", "alice-password")


def test_autoconfig_for_a_login_name_login_publishes_the_stored_login_name(client, site, carol):
    """The address typed in another case than the login name: only the stored form passes authenticate()."""
    _, root = get_autoconfig(client, emailaddress="carol@example.com")
    usernames = {server["username"] for server in incoming_servers(root)}
    assert usernames == {"Carol@example.com"}
    assert logs_in("Carol@example.com", "carol-password")


def test_a_subaddress_publishes_the_address_that_logs_in(client, site, alice):
    _, root = get_autoconfig(client, emailaddress="alice+lists@example.com")
    assert {server["username"] for server in incoming_servers(root)} == {"alice@example.com"}
    assert not logs_in("alice+lists@example.com", "alice-password")  # what a client would otherwise send


def test_autoconfig_without_emailaddress_is_a_template_for_the_hosts_domain(client, site, alice):
    for path, host in (
        (AUTOCONFIG, "autoconfig.example.com"),
        (WELL_KNOWN, "example.com"),
        (WELL_KNOWN, "EXAMPLE.com:443"),
    ):
        response, root = get_autoconfig(client, path, host=host)
        assert response.status_code == 200, (path, host)
        assert root.find("emailProvider").get("id") == "example.com"
        assert incoming_servers(root) == expected_servers("%EMAILADDRESS%")
    response, _ = get_autoconfig(client, host="autoconfig.example.org")  # no mailbox there
    assert response.status_code == 404


def test_autoconfig_well_known_with_emailaddress(client, site, alice):
    _, root = get_autoconfig(client, WELL_KNOWN, host="example.com", emailaddress="alice@example.com")
    assert incoming_servers(root) == expected_servers("alice@example.com")


def test_two_domains_each_with_its_own_settings(client, site, alice, make_mailbox):
    make_mailbox("bob", "bob-password", email="bob@example.org")
    site.POPSERVER_DOMAINS = {
        "example.com": {},
        "Example.ORG": {
            "hostname": "pop.example.org",
            "endpoints": [{"port": 995, "security": "tls"}],
            "provider_name": "Example Org",
        },
    }
    _, com = get_autoconfig(client, emailaddress="alice@example.com")
    _, org = get_autoconfig(client, host="autoconfig.example.org", emailaddress="bob@example.org")
    assert incoming_servers(com) == expected_servers("alice@example.com")
    assert incoming_servers(org) == expected_servers(
        "bob@example.org", host="pop.example.org", endpoints=[{"port": 995, "security": "tls"}]
    )
    assert org.find("emailProvider").get("id") == "example.org"
    assert org.findtext(".//displayName") == "Example Org"
    site.POPSERVER_DOMAINS = ["example.com"]  # a listed domain only: example.org is no longer served
    assert get_autoconfig(client, emailaddress="bob@example.org")[0].status_code == 404


def test_unknown_domain_is_404_and_a_malformed_address_400(client, site, alice):
    assert get_autoconfig(client, emailaddress="alice@example.net")[0].status_code == 404
    for bad in (
        "alice",
        "@example.com",
        "alice@",
        "a b@example.com",
        "x" * 250 + "@example.com",
        "a\x00@example.com",
    ):
        response, _ = get_autoconfig(client, emailaddress=bad)
        assert response.status_code == 400, bad
    site.POPSERVER_PUBLIC_HOSTNAME = ""  # nothing published
    assert get_autoconfig(client, emailaddress="alice@example.com")[0].status_code == 404


@pytest.mark.parametrize(
    "leave,expire,told",
    [
        (None, None, ("false", None)),  # no retention policy: POP3's classic download-and-delete
        (None, 14, ("true", 14)),  # retrieved mail expires after 14 days: leave it, Thunderbird deletes too
        (None, 0, ("false", None)),  # the server deletes what is retrieved at QUIT
        (True, None, ("true", None)),
        (True, 0, ("false", None)),  # cannot leave what the server deletes
        (False, 14, ("false", None)),
    ],
)
def test_leave_on_server_follows_the_retention_policy(client, site, alice, leave, expire, told):
    site.POPSERVER_LEAVE_MESSAGES_ON_SERVER = leave
    site.POPSERVER_EXPIRE_RETRIEVED_DAYS = expire
    _, root = get_autoconfig(client, emailaddress="alice@example.com")
    assert incoming_servers(root) == expected_servers("alice@example.com", leave=told[0], days=told[1])


def test_outgoing_server(client, site, alice):
    site.POPSERVER_OUTGOING_SERVER = OUTGOING
    _, root = get_autoconfig(client, emailaddress="alice@example.com")
    assert incoming_servers(root) == expected_servers("alice@example.com")
    outgoing = root.find(".//outgoingServer")
    assert outgoing.get("type") == "smtp"
    assert {child.tag: child.text for child in outgoing} == {
        "hostname": "smtp.example.com",
        "port": "587",
        "socketType": "STARTTLS",
        "username": "alice@example.com",
        "authentication": "password-cleartext",
    }


def test_values_are_escaped(client, site, alice):
    site.POPSERVER_PROVIDER_NAME = 'Tom & Jerry <"mail">'
    _, root = get_autoconfig(client, emailaddress="alice@example.com")
    assert root.findtext(".//displayName") == 'Tom & Jerry <"mail">'


def test_autoconfig_refuses_post(client, site, alice):
    assert client.post(AUTOCONFIG, HTTP_HOST="autoconfig.example.com").status_code == 405


# Outlook autodiscover -------------------------------------------------------------------------------------
def post_autodiscover(client, body: bytes, path=AUTODISCOVER, host="autodiscover.example.com"):
    response = client.post(path, body, content_type="text/xml", HTTP_HOST=host)
    assert response.status_code == 200 and response["Content-Type"].startswith("application/xml")
    return response, ET.fromstring(response.content)


def protocols(root: ET.Element) -> list[dict[str, str]]:
    return [
        {local(child.tag): child.text for child in protocol} for protocol in root.iter(f"{OUTLOOK}Protocol")
    ]


def expected_protocols(login_name, host="mail.example.com"):
    return [
        {
            "Type": "POP3",
            "Server": host,
            "Port": "995",
            "LoginName": login_name,
            "DomainRequired": "off",
            "SPA": "off",
            "SSL": "on",
            "Encryption": "SSL",
            "AuthRequired": "on",
        },
        {
            "Type": "POP3",
            "Server": host,
            "Port": "110",
            "LoginName": login_name,
            "DomainRequired": "off",
            "SPA": "off",
            "SSL": "off",
            "Encryption": "TLS",
            "AuthRequired": "on",
        },
    ]


def test_autodiscover_answers_outlooks_post_with_pop3_settings(client, site, alice):
    _, root = post_autodiscover(client, documents.autodiscover_request_xml("alice@example.com"))
    assert root.tag == f"{AD}Autodiscover"
    response = root.find(f"{OUTLOOK}Response")
    account = response.find(f"{OUTLOOK}Account")
    assert account.findtext(f"{OUTLOOK}AccountType") == "email"
    assert account.findtext(f"{OUTLOOK}Action") == "settings"
    assert protocols(root) == expected_protocols("alice@example.com")
    assert response.find(f"{OUTLOOK}Error") is None
    assert logs_in("alice@example.com", "alice-password")


def test_autodiscover_login_name_login(client, site, carol):
    _, root = post_autodiscover(client, documents.autodiscover_request_xml("carol@EXAMPLE.com"))
    assert protocols(root) == expected_protocols("Carol@example.com")


def test_autodiscover_smtp_when_an_outgoing_server_is_configured(client, site, alice):
    site.POPSERVER_OUTGOING_SERVER = {**OUTGOING, "port": 465, "security": "tls"}
    _, root = post_autodiscover(client, documents.autodiscover_request_xml("alice@example.com"))
    assert protocols(root)[-1] == {
        "Type": "SMTP",
        "Server": "smtp.example.com",
        "Port": "465",
        "LoginName": "alice@example.com",
        "DomainRequired": "off",
        "SPA": "off",
        "SSL": "on",
        "Encryption": "SSL",
        "AuthRequired": "on",
        "UsePOPAuth": "on",
        "SMTPLast": "off",
    }


def test_autodiscover_answers_an_unknown_address_in_the_same_shape(client, site, alice):
    known, _ = post_autodiscover(client, documents.autodiscover_request_xml("alice@example.com"))
    unknown, _ = post_autodiscover(client, documents.autodiscover_request_xml("nobody@example.com"))
    assert known.content.replace(b"alice@", b"someone@") == unknown.content.replace(b"nobody@", b"someone@")


def test_autodiscover_path_is_case_insensitive_and_get_works(client, site, alice):
    body = documents.autodiscover_request_xml("alice@example.com")
    for path in ("/Autodiscover/Autodiscover.xml", "/AUTODISCOVER/autodiscover.XML"):
        _, root = post_autodiscover(client, body, path=path)
        assert protocols(root) == expected_protocols("alice@example.com")
    response = client.get(
        AUTODISCOVER, {"emailaddress": "alice@example.com"}, HTTP_HOST="autodiscover.example.com"
    )
    assert protocols(ET.fromstring(response.content)) == expected_protocols("alice@example.com")


# An entity that would make a valid request if it were expanded: refused with any DTD.
ENTITY_REQUEST = (
    b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "alice@example.com">]>'
    b"<Autodiscover><Request><EMailAddress>&x;</EMailAddress></Request></Autodiscover>"
)


def error_code(root: ET.Element) -> str | None:
    error = next((e for e in root.iter() if local(e.tag) == "Error"), None)
    return None if error is None else next((c.text for c in error if local(c.tag) == "ErrorCode"), None)


@pytest.mark.parametrize(
    "body,code",
    [
        (b"not xml at all", "600"),
        (b"<Autodiscover><Request></Request></Autodiscover>", "600"),  # no address
        (documents.autodiscover_request_xml("not-an-address"), "600"),
        (documents.autodiscover_request_xml("alice@example.net"), "600"),  # a domain this site does not serve
        (
            ENTITY_REQUEST,
            "600",
        ),
        (b'<!DOCTYPE a SYSTEM "http://203.0.113.9/evil.dtd"><Autodiscover/>', "600"),
        (b"<Autodiscover>" + b"<x/>" * 5000 + b"</Autodiscover>", "600"),  # over 16 KiB
        (documents.autodiscover_request_xml("alice@example.com", documents.MOBILESYNC_SCHEMA), "601"),
    ],
)
def test_autodiscover_errors_are_error_responses(client, site, alice, body, code):
    response, root = post_autodiscover(client, body)
    assert error_code(root) == code
    assert b"mail.example.com" not in response.content  # no settings leaked with an error
    error = next(e for e in root.iter() if local(e.tag) == "Error")
    assert error.get("Time") and error.get("Id")


def test_autodiscover_refuses_other_methods(client, site):
    assert client.put(AUTODISCOVER, b"", HTTP_HOST="autodiscover.example.com").status_code == 405


# The set-up page and the Apple profile -------------------------------------------------------------------
def test_setup_page_needs_a_login(client, site):
    response = client.get("/mail/setup/")
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    assert client.get("/mail/setup/pop3.mobileconfig").status_code == 302


def test_setup_page_shows_the_published_settings(client, site, alice):
    alice.addresses.create(address="al@example.com")
    client.force_login(alice.user)
    response = client.get("/mail/setup/")
    page = response.content.decode()
    assert response.status_code == 200
    for text in (
        "mail.example.com",
        '<td class="port">995</td>',
        '<td class="port">110</td>',
        "SSL/TLS",
        "STARTTLS",
        '<td class="username">alice@example.com</td>',
        '<code class="other-login">al@example.com</code>',
        '<code class="other-login">alice</code>',
        "/mail/config-v1.1.xml?emailaddress=alice%40example.com",
        "This site does not send mail",
    ):
        assert text in page, text
    assert 'id="mobileconfig"' not in page  # no outgoing server: no Apple profile
    assert 'id="app-password-needed"' not in page


def test_setup_page_names_app_passwords_when_the_account_needs_one(client, site, alice):
    site.POPSERVER_ACCEPTED_PASSWORDS = "app"
    client.force_login(alice.user)
    assert 'id="app-password-needed"' in client.get("/mail/setup/").content.decode()
    site.POPSERVER_ACCEPTED_PASSWORDS = "both"
    alice.user.set_unusable_password()  # single sign-on: no password of its own
    alice.user.save()
    client.force_login(alice.user)
    assert 'id="app-password-needed"' in client.get("/mail/setup/").content.decode()


def test_setup_page_tells_the_mailboxs_own_retention_policy(client, site, alice):
    site.POPSERVER_EXPIRE_RETRIEVED_DAYS = 14
    client.force_login(alice.user)
    assert "deletes them 14 days after" in client.get("/mail/setup/").content.decode()
    alice.expire_policy, alice.expire_days = "days", 0
    alice.save()
    assert "deletes messages once your mail program" in client.get("/mail/setup/").content.decode()
    alice.expire_policy = "never"
    alice.save()
    assert 'id="retention"' not in client.get("/mail/setup/").content.decode()


def test_mobileconfig_is_404_without_an_outgoing_server(client, site, alice):
    client.force_login(alice.user)
    assert client.get("/mail/setup/pop3.mobileconfig").status_code == 404


def test_mobileconfig_is_a_pop_mail_payload(client, site, alice):
    site.POPSERVER_OUTGOING_SERVER = OUTGOING
    alice.user.first_name, alice.user.last_name = "Alice", "Liddell"
    alice.user.save()
    client.force_login(alice.user)
    response = client.get("/mail/setup/pop3.mobileconfig")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-apple-aspen-config"
    assert response["Content-Disposition"] == 'attachment; filename="example.com-pop3.mobileconfig"'
    profile = plistlib.loads(response.content)
    assert profile["PayloadType"] == "Configuration" and profile["PayloadVersion"] == 1
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed"
    assert {
        key: mail[key]
        for key in (
            "EmailAccountType",
            "EmailAddress",
            "EmailAccountName",
            "IncomingMailServerAuthentication",
            "IncomingMailServerHostName",
            "IncomingMailServerPortNumber",
            "IncomingMailServerUseSSL",
            "IncomingMailServerUsername",
            "OutgoingMailServerAuthentication",
            "OutgoingMailServerHostName",
            "OutgoingMailServerPortNumber",
            "OutgoingMailServerUseSSL",
            "OutgoingMailServerUsername",
        )
    } == {
        "EmailAccountType": "EmailTypePOP",
        "EmailAddress": "alice@example.com",
        "EmailAccountName": "Alice Liddell",
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": "mail.example.com",
        "IncomingMailServerPortNumber": 995,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": "alice@example.com",
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": "smtp.example.com",
        "OutgoingMailServerPortNumber": 587,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": "alice@example.com",
    }
    assert "IncomingPassword" not in mail  # unsigned and unencrypted: never a password
    again = plistlib.loads(client.get("/mail/setup/pop3.mobileconfig").content)
    assert again["PayloadUUID"] == profile["PayloadUUID"]  # a new download replaces the installed profile


def test_the_mailbox_of_another_domain_gets_that_domains_settings(client, site, make_mailbox):
    bob = make_mailbox("bob", "bob-password", email="bob@example.org")
    site.POPSERVER_DOMAINS = {"example.org": {"hostname": "pop.example.org"}}
    client.force_login(bob.user)
    assert "pop.example.org" in client.get("/mail/setup/").content.decode()


# popdns ---------------------------------------------------------------------------------------------------
def popdns(*args) -> str:
    out = io.StringIO()
    call_command("popdns", *args, stdout=out)
    return out.getvalue()


def test_popdns_prints_srv_and_host_records(site, alice):
    site.POPSERVER_OUTGOING_SERVER = OUTGOING
    lines = [line.split() for line in popdns("example.com", "--web-host", "www.example.com").splitlines()]
    assert lines[0][0] == ";"
    assert lines[1:] == [
        ["_pop3s._tcp.example.com.", "3600", "IN", "SRV", "0", "1", "995", "mail.example.com."],
        ["_pop3._tcp.example.com.", "3600", "IN", "SRV", "10", "1", "110", "mail.example.com."],
        ["_submission._tcp.example.com.", "3600", "IN", "SRV", "0", "1", "587", "smtp.example.com."],
        ["autoconfig.example.com.", "3600", "IN", "CNAME", "www.example.com."],
        ["autodiscover.example.com.", "3600", "IN", "CNAME", "www.example.com."],
        ["_autodiscover._tcp.example.com.", "3600", "IN", "SRV", "0", "1", "443", "www.example.com."],
    ]


def test_popdns_without_arguments_covers_every_served_domain(site, alice, make_mailbox):
    make_mailbox("bob", "bob-password", email="bob@Example.ORG")
    output = popdns("--ttl", "300")
    assert "_pop3s._tcp.example.com.                    300 IN SRV   0 1 995 mail.example.com." in output
    assert "autoconfig.example.org." in output
    assert "autodiscover.example.org.                   300 IN CNAME mail.example.com." in output


def test_popdns_refuses_what_is_not_published(site, alice):
    with pytest.raises(CommandError, match="example.net"):
        popdns("example.net")
    site.POPSERVER_PUBLIC_HOSTNAME = ""
    with pytest.raises(CommandError, match="POPSERVER_PUBLIC_HOSTNAME"):
        popdns("example.com")


def test_popdns_encodes_international_domains(site, make_mailbox):
    make_mailbox("jose", email="jose@bücher.example")
    assert "_pop3s._tcp.xn--bcher-kva.example." in popdns("bücher.example")


# System checks --------------------------------------------------------------------------------------------
def check_ids(**settings) -> set[str]:
    with override_settings(**settings):
        return {m.id for m in run_checks() if m.id.startswith("popserver.")}


def test_default_project_publishes_the_demo_without_warnings():
    assert not {i for i in check_ids() if i.startswith(("popserver.E18", "popserver.W18"))}


def test_installed_views_with_nothing_published_warn():
    assert "popserver.W180" in check_ids(POPSERVER_PUBLIC_HOSTNAME="")
    assert "popserver.W180" in check_ids(POPSERVER_PUBLIC_ENDPOINTS=[])
    assert "popserver.W180" not in check_ids(
        POPSERVER_PUBLIC_HOSTNAME="", ROOT_URLCONF="tests.urls_without_clientconfig"
    )
    # A domain of its own publishes something: no warning.
    assert "popserver.W180" not in check_ids(
        POPSERVER_PUBLIC_HOSTNAME="", POPSERVER_DOMAINS={"example.com": {"hostname": "mail.example.com"}}
    )


def test_plaintext_endpoints_warn_unless_loopback():
    plain = [{"port": 110, "security": "none"}]
    assert "popserver.W181" in check_ids(
        POPSERVER_PUBLIC_HOSTNAME="mail.example.com", POPSERVER_PUBLIC_ENDPOINTS=plain
    )
    for loopback in ("localhost", "pop.localhost", "127.0.0.2", "::1", "[::1]"):
        assert "popserver.W181" not in check_ids(
            POPSERVER_PUBLIC_HOSTNAME=loopback, POPSERVER_PUBLIC_ENDPOINTS=plain
        ), loopback
    assert "popserver.W181" in check_ids(
        POPSERVER_PUBLIC_HOSTNAME="192.0.2.1", POPSERVER_PUBLIC_ENDPOINTS=plain
    )
    assert "popserver.W181" not in check_ids(
        POPSERVER_PUBLIC_HOSTNAME="mail.example.com", POPSERVER_PUBLIC_ENDPOINTS=ENDPOINTS
    )
    assert "popserver.W181" in check_ids(
        POPSERVER_PUBLIC_HOSTNAME="mail.example.com",
        POPSERVER_OUTGOING_SERVER={"host": "smtp.example.com", "port": 25, "security": "none"},
    )


@pytest.mark.parametrize(
    "settings",
    [
        {"POPSERVER_PUBLIC_ENDPOINTS": [{"port": 99999, "security": "tls"}]},
        {"POPSERVER_PUBLIC_ENDPOINTS": [{"port": 995, "security": "ssl"}]},
        {"POPSERVER_PUBLIC_ENDPOINTS": [{"port": 995, "security": "tls", "typo": 1}]},
        {"POPSERVER_PUBLIC_ENDPOINTS": "995"},
        {"POPSERVER_DOMAINS": "example.com"},
        {"POPSERVER_DOMAINS": {"example.com": {"hostnme": "x"}}},
        {"POPSERVER_OUTGOING_SERVER": {"port": 587, "security": "starttls"}},
        {"POPSERVER_LEAVE_MESSAGES_ON_SERVER": "yes"},
    ],
)
def test_malformed_settings_are_an_error(settings):
    assert "popserver.E180" in check_ids(**settings)


# Over real HTTP -------------------------------------------------------------------------------------------
def http_request(live_server, method, path, *, host, headers, body=None):
    url = live_server.url.removeprefix("http://")
    connection = http.client.HTTPConnection(url, timeout=10)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host)
        for name, value in headers.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type"), response.read()
    finally:
        connection.close()


def test_thunderbirds_request_over_http(live_server, site, alice):
    path = f"{AUTOCONFIG}?emailaddress={quote('alice@example.com', safe='')}"
    status, content_type, body = http_request(
        live_server, "GET", path, host="autoconfig.example.com", headers=THUNDERBIRD_HEADERS
    )
    assert status == 200 and content_type.startswith("application/xml")
    assert incoming_servers(ET.fromstring(body)) == expected_servers("alice@example.com")
    # Thunderbird for Android, privacy on: the well-known path on the domain itself, no address.
    status, _, body = http_request(
        live_server,
        "GET",
        WELL_KNOWN,
        host="example.com",
        headers={"User-Agent": "okhttp/4.12.0", "Accept-Encoding": "gzip"},
    )
    assert status == 200
    assert incoming_servers(ET.fromstring(body)) == expected_servers("%EMAILADDRESS%")


def test_outlooks_post_over_http(live_server, site, alice):
    body = documents.autodiscover_request_xml("alice@example.com")
    status, content_type, answer = http_request(
        live_server,
        "POST",
        "/Autodiscover/Autodiscover.xml",
        host="autodiscover.example.com",
        headers=OUTLOOK_HEADERS,
        body=body,
    )
    assert status == 200 and content_type.startswith("application/xml")
    assert protocols(ET.fromstring(answer)) == expected_protocols("alice@example.com")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readmes_curl_answers_with_the_demos_settings(live_server):
    """The README's quick start: the default project's settings, the demo mailbox, curl."""
    from project.demo import ensure_demo_mailbox

    ensure_demo_mailbox()
    assert Address.objects.filter(address="demo@localhost").exists()
    url = f"{live_server.url}/mail/config-v1.1.xml?emailaddress=demo@localhost"
    result = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "10", url], capture_output=True, timeout=20
    )
    assert result.returncode == 0, result.stderr
    root = ET.fromstring(result.stdout)
    assert incoming_servers(root) == expected_servers(
        "demo@localhost", host="localhost", endpoints=[{"port": 8110, "security": "none"}]
    )
    assert logs_in("demo@localhost", "demo-password")
