"""Shared fixtures. Test modules keep their own specialised fixtures beside their tests."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpus"


def corpus_files() -> list[Path]:
    """The shared corpus (../shared/corpus), or a copy under tests/corpus when that is absent."""
    base = CORPUS if CORPUS.is_dir() else REPO / "tests" / "corpus"
    return sorted(base.glob("*.eml"))


# name -> (octets on disk, LIST size), from the corpus README's table.
CORPUS_SIZES = {
    "01-plain-crlf.eml": (241, 241),
    "02-dot-lines.eml": (264, 264),
    "03-bare-lf.eml": (232, 243),
    "04-no-final-newline.eml": (250, 250),
    "05-8bit-utf8.eml": (316, 316),
    "06-latin1-bytes.eml": (309, 309),
    "07-long-line.eml": (5221, 5221),
    "08-headers-only.eml": (216, 216),
    "09-empty-body.eml": (214, 214),
    "10-mixed-endings.eml": (237, 238),
    "11-multipart-attachment.eml": (41382, 41382),
    "12-from-line.eml": (325, 276),
    "13-nul-byte.eml": (214, 214),
    "14-top-lines.eml": (471, 471),
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a ``manage.py`` subprocess that must see this test's database."""
    from django.db import connection

    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["POPSERVER_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def manage_py_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "manage.py"), *args]


@pytest.fixture
def make_mailbox(db):
    """make_mailbox(username, password="secret", email=None) -> Mailbox (creates the user too)."""
    from django.contrib.auth import get_user_model

    from popserver.models import Address, Mailbox

    def make(username: str, password: str = "secret", email: str | None = None, **mailbox_fields):
        User = get_user_model()
        user = User.objects.create_user(**{User.USERNAME_FIELD: username}, password=password)
        mailbox = Mailbox.objects.create(user=user, **mailbox_fields)
        if email:
            Address.objects.create(mailbox=mailbox, address=email)
        return mailbox

    return make
