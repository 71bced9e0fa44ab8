"""End to end in headless Chromium: log into the admin, upload an .eml into a mailbox, find it listed with its
subject, open its text view (in the admin's header, under its CSP) and see that the message's scripts did not
run; open the POP3 overview with seeded data (charts as SVG with data, readable in dark mode) and every list at
1280 px (no horizontal scrolling), saving screenshots into the test's temporary directory. An ordinary user manages app
passwords and downloads the Apple profile from the mail-client set-up page.

Uses Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them); skipped where they are absent.
"""

import plistlib
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (requirements.txt)")

from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

# As root on a closed network (see PITFALLS): no sandbox, no GPU, nothing that phones home.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1280,1024",
]
WAIT = 20  # seconds for any one page to show what the test waits for

# Each script would leave a mark if it ran: the title changed, or an element with id "pwned".
HOSTILE_MESSAGE = (
    b"From: Mallory <mallory@example.net>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: Invoice <script>document.title='pwned'</script>\r\n"
    b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="b1"\r\n'
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Please pay. <script>document.body.insertAdjacentHTML('beforeend','<p id=pwned>pwned</p>')</script>\r\n"
    b"Bytes that are not UTF-8: \xff\xfe.\r\n"
    b"--b1\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<html><body><script>document.title='pwned';document.body.insertAdjacentHTML('beforeend',"
    b"'<p id=pwned>pwned</p>')</script><img src=\"http://203.0.113.9/t.png\"></body></html>\r\n"
    b"--b1--\r\n"
)


@pytest.fixture
def browser(tmp_path):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")  # a fresh profile every time
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console: CSP refusals show there
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def wait_for(driver, condition):
    """WebDriverWait, failing with the page's address and text (a bare TimeoutException says nothing)."""
    from selenium.common.exceptions import TimeoutException, WebDriverException

    try:
        # A page being replaced (after a click) can make a lookup fail with a stale node: try again.
        return WebDriverWait(driver, WAIT, ignored_exceptions=(WebDriverException,)).until(condition)
    except TimeoutException:
        page = driver.find_element(By.TAG_NAME, "body").text[:3000]
        pytest.fail(f"waited {WAIT} s in vain at {driver.current_url}; the page says:\n{page}")


def test_upload_list_and_read_a_hostile_message(browser, live_server, make_mailbox, tmp_path):
    from django.contrib.auth import get_user_model

    from popserver.models import Message

    get_user_model().objects.create_superuser("operator", "operator@example.org", "operator-password")
    alice = make_mailbox("alice", email="alice@example.org")
    eml = tmp_path / "invoice.eml"
    eml.write_bytes(HOSTILE_MESSAGE)

    # Log in.
    browser.get(f"{live_server.url}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys("operator-password")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for(browser, EC.presence_of_element_located((By.ID, "logout-form")))

    # Find the mailbox, open it, follow its upload link.
    browser.get(f"{live_server.url}/admin/popserver/mailbox/?q=alice%40example.org")
    change = f"#result_list a[href^='/admin/popserver/mailbox/{alice.pk}/change/']"  # addresses below it
    wait_for(browser, EC.element_to_be_clickable((By.CSS_SELECTOR, change))).click()
    upload = f"a[href='/admin/popserver/mailbox/{alice.pk}/upload/']"  # the object tools' text is upper-cased
    wait_for(browser, EC.element_to_be_clickable((By.CSS_SELECTOR, upload))).click()

    # Upload the file.
    file_input = wait_for(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
    file_input.send_keys(str(eml))
    browser.find_element(By.NAME, "_upload").click()

    # Listed with its subject (as text), in the mailbox's message list.
    subject = "Invoice <script>document.title='pwned'</script>"
    link = wait_for(browser, EC.element_to_be_clickable((By.LINK_TEXT, subject)))
    message = Message.objects.get(mailbox=alice)
    assert message.subject == subject
    success = browser.find_element(By.CSS_SELECTOR, "ul.messagelist li.success").text
    assert success.startswith("File invoice.eml: delivered as message 1 of 1 in alice (unique id ")
    assert f"mailbox={alice.pk}" in browser.current_url
    assert link.is_displayed()

    # Its text view: the scripts are shown as text and none of them ran.
    browser.find_element(By.LINK_TEXT, "text").click()
    heading = wait_for(browser, EC.visibility_of_element_located((By.ID, "message-subject")))
    assert heading.text == subject
    body_text = browser.find_element(By.CSS_SELECTOR, "pre.message-text").text
    assert (
        "<script>document.body.insertAdjacentHTML('beforeend','<p id=pwned>pwned</p>')</script>" in body_text
    )
    assert "Bytes that are not UTF-8: \ufffd\ufffd." in body_text
    assert browser.title.startswith("Invoice <script>")  # the page's own <title>, escaped; not "pwned"
    assert browser.find_elements(By.ID, "pwned") == []
    assert browser.find_elements(By.TAG_NAME, "script") == []
    assert browser.find_elements(By.TAG_NAME, "img") == []
    attachments = browser.find_element(By.ID, "message-attachments").text
    assert "text/html" in attachments and "HTML is never rendered here" in attachments
    # ...in the admin's header and breadcrumbs, styled by the admin's stylesheets under the page's CSP
    assert browser.find_element(By.ID, "site-name").text == "Django administration"
    crumbs = browser.find_element(By.CSS_SELECTOR, ".breadcrumbs").text
    assert crumbs.startswith("Home") and crumbs.endswith(f"{message.uid} › Text")
    header = browser.find_element(By.ID, "header").value_of_css_property("background-color")
    assert header not in ("rgba(0, 0, 0, 0)", "transparent")  # the stylesheet was allowed
    assert not [line for line in console(browser) if "Content Security Policy" in line and "style" in line]
    browser.save_screenshot(str(tmp_path / "text-view.png"))


def console(driver) -> list[str]:
    """The browser console's messages since the last call (the site has no favicon: that 404 is left out)."""
    return [entry["message"] for entry in driver.get_log("browser") if "favicon.ico" not in entry["message"]]


def log_in(browser, live_server) -> None:
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_superuser("operator", "operator@example.org", "operator-password")
    browser.get(f"{live_server.url}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys("operator")
    browser.find_element(By.NAME, "password").send_keys("operator-password")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for(browser, EC.presence_of_element_located((By.ID, "logout-form")))


def seed_a_busy_day(make_mailbox) -> None:
    """Mailboxes with long names and addresses, locks on two nodes, a day of logins and sessions, deliveries,
    app passwords and lock-outs: what the lists and the overview have to fit."""
    from datetime import timedelta

    from django.utils import timezone

    from popserver.logins.app_passwords import create_app_password
    from popserver.mailin.delivery import count_delivery, deliver
    from popserver.models import Address, LoginEvent, LoginThrottle, Mailbox, SessionRecord

    now = timezone.now()
    names = ["alice", "bob", "carol", "mallory.longname-with-dashes", "dave"]
    for n, name in enumerate(names):
        mailbox = make_mailbox(name, email=f"{name}@example.org", quota_bytes=20000 if n % 2 else None)
        Address.objects.create(mailbox=mailbox, address=f"{name}.alias-for-lists@mail.example.com")
        Address.objects.create(mailbox=mailbox, address=f"{name}.third@example.net")
        for k in range(n + 2):
            deliver(
                name,
                f"From: A Sender <sender{k}@example.net>\r\nSubject: Report {k} with a subject long "
                "enough to wrap\r\n\r\n".encode()
                + b"x" * 3000
                + b"\r\n",
            )
        create_app_password(mailbox, "Thunderbird on the office laptop")
        if n < 3:
            Mailbox.objects.filter(pk=mailbox.pk).update(
                lock_token=f"{n:032d}",
                lock_host=f"pop{n % 2 + 1}.mail.example.org",
                lock_pid=4000 + n,
                lock_instance="i" * 32,
                lock_peer="203.0.113.77:51234",
                locked_at=now,
                lock_heartbeat=now,
                last_login=now,
            )
    for hour in range(24):
        for k in range(hour % 5 + 1):
            outcome = [LoginEvent.SUCCESS, LoginEvent.FAILED, LoginEvent.LOCKED_OUT][k % 3]
            ip = ["127.0.0.1", "203.0.113.5", "2001:db8:ffff:1234:5678:9abc:def0:1"][k % 3]
            row = LoginEvent.objects.create(
                username=names[k % 5], peer_ip=ip, mechanism="USER", tls=k % 2 == 0, outcome=outcome
            )
            LoginEvent.objects.filter(pk=row.pk).update(time=now - timedelta(hours=hour, minutes=k))
            SessionRecord.objects.create(
                username=names[k % 5],
                peer_ip=ip,
                started_at=now - timedelta(hours=hour, minutes=k),
                duration=12.5,
                end_reason="autologout (idle 600 s)",
                retrieved_count=k,
                retrieved_bytes=k * 40000,
                deleted_count=k // 2,
            )
        count_delivery(30000 * (hour % 4 + 1), now=now - timedelta(hours=hour))
    LoginThrottle.objects.create(
        scope=LoginThrottle.ACCOUNT_IP,
        key="mallory.longname-with-dashes|2001:db8:ffff:1234:5678:9abc:def0:1",
        failures=10,
        window_started=now,
        locked_until=now + timedelta(minutes=15),
    )
    LoginThrottle.objects.create(
        scope=LoginThrottle.IP, key="203.0.113.5", failures=12, window_started=now - timedelta(minutes=3)
    )


LISTS = ("mailbox", "message", "loginevent", "sessionrecord", "loginthrottle", "apppassword")


def test_overview_charts_and_lists_that_fit_1280_px(browser, live_server, make_mailbox, tmp_path):
    seed_a_busy_day(make_mailbox)
    log_in(browser, live_server)
    assert browser.execute_script("return window.innerWidth") == 1280

    # The overview, from the admin index.
    wait_for(browser, EC.element_to_be_clickable((By.LINK_TEXT, "POP3 overview"))).click()
    wait_for(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "svg.chart")))
    shot = tmp_path / "overview.png"
    browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 5
    for chart in charts:  # every chart has bars with data, hover titles and a unit on its axis
        values = [
            int(bar.get_attribute("data-value")) for bar in chart.find_elements(By.CSS_SELECTOR, "rect.bar")
        ]
        assert values and all(value > 0 for value in values), chart.get_attribute("id")
        assert len(chart.find_elements(By.CSS_SELECTOR, "g.hour > title")) == 24
        assert "per hour" in chart.find_element(By.CSS_SELECTOR, "text.unit").text
    assert browser.find_element(By.CSS_SELECTOR, "#open-sessions .figure").text.startswith("3 logged-in")
    assert fits(browser), "the overview scrolls sideways"
    assert console(browser) == []  # nothing refused, nothing missing

    # The week, and dark mode: the axis text turns light on the dark background.
    browser.find_element(By.LINK_TEXT, "Last 7 days").click()
    wait_for(browser, EC.presence_of_element_located((By.CSS_SELECTOR, "nav.ranges strong")))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart-logins g.hour")) == 168
    tick = "return getComputedStyle(document.querySelector('svg.chart text.tick')).fill"
    light = browser.execute_script(tick)
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    dark = browser.execute_script(tick)
    browser.save_screenshot(str(tmp_path / "overview-dark.png"))
    assert brightness(dark) > 150 > brightness(light), (light, dark)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})

    # Every list at 1280 px, beside the navigation sidebar and the filters: no sideways scrolling.
    for model in LISTS:
        browser.get(f"{live_server.url}/admin/popserver/{model}/")
        results = wait_for(browser, EC.presence_of_element_located((By.CSS_SELECTOR, ".results")))
        browser.save_screenshot(str(tmp_path / f"{model}-list.png"))
        assert len(browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")) >= 2, model
        assert fits(browser), f"the {model} list page scrolls sideways"
        assert browser.execute_script(
            "return arguments[0].scrollWidth <= arguments[0].clientWidth", results
        ), f"the {model} list scrolls sideways"


def fits(browser) -> bool:
    return browser.execute_script(
        "return document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )


def brightness(css_colour: str) -> float:
    """0 (black) to 255 (white), from "rgb(r, g, b)"."""
    import re

    red, green, blue = (int(part) for part in re.findall(r"\d+", css_colour)[:3])
    return 0.299 * red + 0.587 * green + 0.114 * blue


def test_user_creates_and_revokes_an_app_password(browser, live_server, make_mailbox):
    from popserver.logins.app_passwords import check_app_password

    mailbox = make_mailbox("carol", "carol-password")  # not staff: an ordinary user of the site
    browser.get(f"{live_server.url}/mail/app-passwords/")
    wait_for(browser, EC.presence_of_element_located((By.NAME, "username"))).send_keys("carol")
    browser.find_element(By.NAME, "password").send_keys("carol-password")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for(browser, EC.presence_of_element_located((By.NAME, "name"))).send_keys("phone")
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]:not([form])").click()
    secret = wait_for(browser, EC.visibility_of_element_located((By.ID, "secret"))).text
    assert check_app_password(mailbox, secret) is not None
    browser.get(f"{live_server.url}/mail/app-passwords/")
    assert secret not in browser.find_element(By.TAG_NAME, "body").text  # shown once
    wait_for(browser, EC.element_to_be_clickable((By.XPATH, "//button[text()='Revoke']"))).click()
    wait_for(browser, EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "revoked"))
    assert check_app_password(mailbox, secret) is None


def downloaded_file(directory: Path, name: str, timeout: float = WAIT) -> Path:
    """The finished download ``name`` in ``directory``, polled until ``timeout`` (Chromium writes a
    ``.crdownload`` file and renames it when complete; no event tells a test when)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = directory / name
        if path.exists() and not list(directory.glob("*.crdownload")):
            return path
        time.sleep(0.1)  # sync-ok: bounded poll for a file another process writes
    pytest.fail(
        f"no {name} in {directory} after {timeout} s; found {sorted(p.name for p in directory.iterdir())}"
    )


def test_user_sets_up_a_mail_client_and_downloads_the_apple_profile(
    browser, live_server, make_mailbox, settings, tmp_path
):
    settings.POPSERVER_PUBLIC_HOSTNAME = "mail.example.org"
    settings.POPSERVER_PUBLIC_ENDPOINTS = [
        {"port": 995, "security": "tls"},
        {"port": 110, "security": "starttls"},
    ]
    settings.POPSERVER_OUTGOING_SERVER = {"host": "smtp.example.org", "port": 587, "security": "starttls"}
    make_mailbox("dave", "dave-password", email="dave@example.org")  # not staff: an ordinary user of the site

    browser.get(f"{live_server.url}/mail/setup/")
    wait_for(browser, EC.presence_of_element_located((By.NAME, "username"))).send_keys("dave")
    browser.find_element(By.NAME, "password").send_keys("dave-password")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    servers = wait_for(browser, EC.visibility_of_element_located((By.ID, "servers")))
    rows = [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in servers.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    assert rows == [
        ["mail.example.org", "995", "SSL/TLS", "dave@example.org", "normal password"],
        ["mail.example.org", "110", "STARTTLS", "dave@example.org", "normal password"],
    ]
    assert "smtp.example.org" in browser.find_element(By.ID, "outgoing").text

    browser.find_element(By.ID, "mobileconfig").click()
    profile = plistlib.loads(
        downloaded_file(tmp_path / "downloads", "example.org-pop3.mobileconfig").read_bytes()
    )
    (mail,) = profile["PayloadContent"]
    assert mail["PayloadType"] == "com.apple.mail.managed" and mail["EmailAccountType"] == "EmailTypePOP"
    assert mail["IncomingMailServerHostName"] == "mail.example.org"
    assert mail["IncomingMailServerPortNumber"] == 995 and mail["IncomingMailServerUseSSL"] is True
    assert mail["IncomingMailServerUsername"] == "dave@example.org" == mail["EmailAddress"]
    assert mail["OutgoingMailServerHostName"] == "smtp.example.org"
