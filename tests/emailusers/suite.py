"""createmailbox and delivery with an email-login user model that has no ``username`` field.

Not a test module of the main run (its name does not match ``test_*.py``): ``tests/test_createmailbox.py``
runs it in a pytest of its own, ``pytest --ds=tests.settings_emailuser tests/emailusers/suite.py``, because
AUTH_USER_MODEL cannot change inside one process once the models are loaded.
"""

import io
import subprocess

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist
from django.core.management import CommandError, call_command

from popserver.clientconfig.logins import account_of, login_for_address
from popserver.clientconfig.published import served_domains
from popserver.exceptions import AuthenticationFailed
from popserver.logins.authenticator import DjangoAuthenticator
from popserver.mailin.delivery import deliver
from popserver.models import Address, Mailbox, Message
from tests.conftest import manage_py_command, subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)  # the last test's subprocesses must see the rows


def createmailbox(*args: str, password: str | None = None) -> str:
    out = io.StringIO()
    stdin = io.StringIO(password) if password is not None else None
    call_command("createmailbox", *args, stdin=stdin, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_the_user_model_logs_in_by_email_and_has_no_username():
    User = get_user_model()
    assert settings.AUTH_USER_MODEL == "emailusers.EmailUser"
    assert User.USERNAME_FIELD == "email"
    with pytest.raises(FieldDoesNotExist):
        User._meta.get_field("username")


def test_createmailbox_creates_the_user_by_its_email():
    output = createmailbox("ann@Example.ORG", "--password-stdin", password="pw one\n")
    user = get_user_model().objects.get()
    assert user.email == "ann@example.org"  # the manager's normalize_email lower-cases the domain
    assert user.check_password("pw one")
    assert Mailbox.objects.get(user=user)
    assert output.startswith("Created user ann@example.org")


def test_re_running_updates_the_password_and_adds_addresses():
    createmailbox("ann@example.org", "--password-stdin", password="pw one\n")
    output = createmailbox(
        "ann@example.org", "--email", "Ann.Alias@example.net", "--password-stdin", password="pw two\r\n"
    )
    user = get_user_model().objects.get()
    assert user.check_password("pw two") and not user.check_password("pw one")
    assert "set the password" in output and "added the address" in output
    createmailbox("ann@example.org", "--email", "ann.alias@EXAMPLE.net")
    assert list(Address.objects.values_list("address", flat=True)) == ["Ann.Alias@example.net"]
    assert Mailbox.objects.count() == 1


def test_without_a_password_the_user_cannot_log_in_yet():
    createmailbox("bob@example.org")
    assert not get_user_model().objects.get().has_usable_password()


def test_a_required_field_it_cannot_fill_in_is_reported(monkeypatch):
    monkeypatch.setattr(get_user_model(), "REQUIRED_FIELDS", ["nickname"])
    with pytest.raises(CommandError, match="nickname"):
        createmailbox("carol@example.org")
    assert not get_user_model().objects.exists()


@pytest.mark.parametrize(
    "recipient", ["ann@example.org", "ANN@Example.Org", "ann+news@example.org", "alias@example.net"]
)
def test_delivery_finds_the_mailbox_by_login_email_or_address(recipient):
    createmailbox("ann@example.org", "--email", "alias@example.net")
    message = deliver(recipient, b"Subject: hello\r\n\r\nbody\r\n")
    assert message.mailbox.user.email == "ann@example.org"


def test_the_commands_in_subprocesses(tmp_path):
    env = subprocess_env(DJANGO_SETTINGS_MODULE="tests.settings_emailuser")
    created = subprocess.run(
        manage_py_command(
            "createmailbox", "dora@example.org", "--email", "d@example.net", "--password-stdin"
        ),
        input=b"s3cret pass\n",
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
        timeout=100,
    )
    assert created.returncode == 0, created.stderr
    delivered = subprocess.run(
        manage_py_command("deliver", "D@EXAMPLE.NET"),
        input=b"Subject: hi\n\nbody\n",
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
        timeout=100,
    )
    assert (delivered.returncode, delivered.stderr) == (0, b"")
    user = get_user_model().objects.get(email="dora@example.org")
    assert user.check_password("s3cret pass")
    assert Message.objects.get(mailbox__user=user).subject == "hi"
    unknown = subprocess.run(
        manage_py_command("deliver", "nobody@example.org"),
        input=b"Subject: hi\n\n",
        cwd=tmp_path,
        env=env,
        capture_output=True,
        check=False,
        timeout=100,
    )
    assert unknown.returncode == 67 and unknown.stderr.count(b"\n") == 1


def logs_in(username: str, password: str) -> bool:
    try:
        DjangoAuthenticator("127.0.0.1", 40000, trusted=True)(username, password).release()
    except AuthenticationFailed:
        return False
    return True


def test_mail_clients_are_told_the_login_that_works():
    """The email is the login name (its case kept); an alias is an address and logs in as itself."""
    createmailbox("Ann@Example.ORG", "--email", "alias@example.net", "--password-stdin", password="pw\n")
    assert login_for_address("ann@example.org") == "Ann@example.org"
    assert login_for_address("ANN+news@example.org") == "Ann@example.org"
    assert login_for_address("ALIAS@example.net") == "ALIAS@example.net"
    assert login_for_address("nobody@example.org") == "nobody@example.org"
    assert logs_in("Ann@example.org", "pw") and logs_in("ALIAS@example.net", "pw")
    assert served_domains() == ["example.net", "example.org"]
    account = account_of(Mailbox.objects.get())
    assert (account.address, account.username, account.other_logins) == (
        "alias@example.net",
        "alias@example.net",
        ["Ann@example.org"],
    )
