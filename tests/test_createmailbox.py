"""``manage.py createmailbox`` and ``popserver.mailin.mailboxes`` with Django's default user model; the email-login
custom user model is tested by a pytest run of its own (``tests/emailusers/suite.py``), started below."""

import io
import os
import re
import subprocess
import sys

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from popserver.mailin.mailboxes import create_mailbox
from popserver.models import Address, Mailbox
from tests.conftest import REPO, manage_py_command, subprocess_env


def createmailbox(*args: str, password: str | None = None) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO(password) if password is not None else None
    call_command("createmailbox", *args, stdin=stdin, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_creates_the_user_and_the_mailbox():
    output, _ = createmailbox("alice")
    user = get_user_model().objects.get(username="alice")
    assert Mailbox.objects.get(user=user).pop3_enabled
    assert not user.has_usable_password()  # no password given: nobody can log in yet
    assert output == "Created user alice; created the mailbox.\n"


@pytest.mark.django_db
def test_re_running_is_idempotent():
    createmailbox("alice", "--email", "alice@example.org", "--password-stdin", password="first pass\n")
    output, _ = createmailbox("alice", "--email", "ALICE@example.org")
    assert output == "Found user alice; found the mailbox; kept the address ALICE@example.org.\n"
    assert get_user_model().objects.count() == Mailbox.objects.count() == Address.objects.count() == 1
    assert get_user_model().objects.get().check_password("first pass")  # no password given: unchanged


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("stdin", "password"),
    [
        ("s3cret pass\n", "s3cret pass"),
        ("crlf pass\r\nsecond line\n", "crlf pass"),
        ("no newline", "no newline"),
        (" spaces kept \n", " spaces kept "),
    ],
)
def test_password_stdin_takes_the_first_line_without_its_ending(stdin, password):
    createmailbox("alice", "--password-stdin", password=stdin)
    user = get_user_model().objects.get()
    assert user.check_password(password)
    assert user.password.startswith("md5$")  # hashed with the site's first hasher (MD5 in tests)


@pytest.mark.django_db
def test_re_running_with_a_password_updates_it():
    createmailbox("alice", "--password-stdin", password="old password\n")
    output, _ = createmailbox("alice", "--password-stdin", password="new password\n")
    assert "set the password" in output
    user = get_user_model().objects.get()
    assert user.check_password("new password") and not user.check_password("old password")


@pytest.mark.django_db
def test_an_existing_user_without_a_mailbox_gets_one():
    user = get_user_model().objects.create_user(username="bob", password="kept password")
    output, _ = createmailbox("bob")
    assert output == "Found user bob; created the mailbox.\n"
    assert Mailbox.objects.get().user == user
    user.refresh_from_db()
    assert user.check_password("kept password")


@pytest.mark.django_db
def test_email_adds_an_address_and_fills_in_a_new_users_email():
    output, _ = createmailbox("alice", "--email", "Alice@Example.org")
    assert output.endswith("added the address Alice@Example.org.\n")
    assert get_user_model().objects.get().email == "Alice@example.org"  # as create_user normalises it
    createmailbox("alice", "--email", "second@example.org")
    addresses = sorted(Address.objects.values_list("address", flat=True))
    assert addresses == ["Alice@Example.org", "second@example.org"]


@pytest.mark.django_db
def test_an_address_of_another_mailbox_is_refused():
    createmailbox("alice", "--email", "shared@example.org")
    with pytest.raises(CommandError, match="already delivers to the mailbox of alice"):
        createmailbox("bob", "--email", "SHARED@example.org")
    assert not get_user_model().objects.filter(username="bob").exists()  # all or nothing


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "stdin", "error"),
    [
        (("alice", "--email", "not an address"), None, "valid email"),
        (("alice", "--password-stdin"), "", "standard input is empty"),
        (("alice", "--password-stdin"), "\n", "password is empty"),
        (("bad name!",), None, "valid username"),
        (("",), None, "blank"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(args, stdin, error):
    with pytest.raises(CommandError, match=error):
        createmailbox(*args, password=stdin)
    assert not get_user_model().objects.exists() and not Mailbox.objects.exists()


@pytest.mark.django_db
def test_a_weak_password_is_set_with_a_warning():
    _, warnings = createmailbox("alice", "--password-stdin", password="alice\n")
    assert "Warning: " in warnings
    assert get_user_model().objects.get().check_password("alice")


@pytest.mark.django_db
def test_the_python_api_returns_the_mailbox():
    mailbox = create_mailbox("demo", email="demo@localhost", password="demo-password")
    assert create_mailbox("demo", email="demo@localhost", password="demo-password") == mailbox
    assert mailbox.user.check_password("demo-password")
    with pytest.raises(ValidationError):
        create_mailbox("demo", password="")


@pytest.mark.django_db(transaction=True)
def test_the_command_in_a_subprocess_reads_the_real_stdin(tmp_path):
    command = manage_py_command("createmailbox", "alice", "--email", "alice@example.com", "--password-stdin")
    result = subprocess.run(
        command,
        input=b"s3cret pass\n",
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        check=False,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Created user alice; created the mailbox; added the address alice@example.com.\n"
    user = get_user_model().objects.get(username="alice")
    assert user.check_password("s3cret pass")
    assert user.mailbox.addresses.get().address == "alice@example.com"


@pytest.mark.slow
def test_with_an_email_login_user_model():
    """AUTH_USER_MODEL is fixed once Django has loaded its models, so the email-login model gets a pytest run
    of its own, with its own settings and test database (on whichever database this run uses)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTEST_", "DJANGO_"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "--ds=tests.settings_emailuser",
            "tests/emailusers/suite.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [\d.]+s", summary), summary
