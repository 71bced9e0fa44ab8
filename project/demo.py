"""The demo mailbox that scripts/serve.sh sets up: user ``demo``, password ``demo-password``."""

from popserver.mailin.delivery import deliver
from popserver.mailin.mailboxes import create_mailbox
from popserver.models import Message

DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"
SAMPLE = (
    b"From: popserver <postmaster@localhost>\r\n"
    b"To: demo@localhost\r\n"
    b"Subject: Welcome to popserver\r\n"
    b"Date: Thu, 26 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <welcome@popserver.localhost>\r\n"
    b"\r\n"
    b"Hello! This message was delivered by scripts/serve.sh.\r\n"
    b"Fetch it with any POP3 client, e.g.:\r\n"
    b"  curl -s pop3://demo:demo-password@127.0.0.1:8110/1\r\n"
)


def ensure_demo_mailbox() -> None:
    mailbox = create_mailbox(DEMO_USER, email="demo@localhost", password=DEMO_PASSWORD)
    if not Message.objects.filter(mailbox=mailbox).exists():
        deliver(DEMO_USER, SAMPLE)
