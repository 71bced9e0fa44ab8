"""End to end in headless Chromium: log into the admin, upload an .eml into a mailbox, find it listed with its
subject, open its text view, and see that the message's scripts did not run. An ordinary user manages app
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
    from selenium.common.exceptions import TimeoutException

    try:
        return WebDriverWait(driver, WAIT).until(condition)
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
    wait_for(browser, EC.element_to_be_clickable((By.LINK_TEXT, "alice"))).click()
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
    assert success.lower().startswith("invoice.eml: delivered as message")  # CSS capitalises it
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
