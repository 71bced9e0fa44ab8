"""popserver dropped into a site made with ``django-admin startproject``: a wheel, one line in INSTALLED_APPS,
``migrate``, and an email-login custom user model. Everything runs in subprocesses, as a site would."""

import os
import poplib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

USER_APP = {
    "accounts/__init__.py": "",
    "accounts/apps.py": """
        from django.apps import AppConfig

        class AccountsConfig(AppConfig):
            name = "accounts"
            default_auto_field = "django.db.models.BigAutoField"
    """,
    "accounts/models.py": """
        from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
        from django.contrib.auth.models import PermissionsMixin
        from django.db import models

        class UserManager(BaseUserManager):
            def create_user(self, email, password=None, **extra):
                user = self.model(email=self.normalize_email(email), **extra)
                user.set_password(password)
                user.save(using=self._db)
                return user

            def create_superuser(self, email, password=None, **extra):
                return self.create_user(email, password, is_staff=True, is_superuser=True, **extra)

        class User(AbstractBaseUser, PermissionsMixin):
            email = models.EmailField(unique=True)
            is_active = models.BooleanField(default=True)
            is_staff = models.BooleanField(default=False)
            objects = UserManager()
            USERNAME_FIELD = "email"
            EMAIL_FIELD = "email"
    """,
    "accounts/migrations/__init__.py": "",
}

SETTINGS_TAIL = """
INSTALLED_APPS += ["accounts", "popserver"]
AUTH_USER_MODEL = "accounts.User"
import os as _os
if _os.environ.get("SITE_DATABASE_URL"):
    import environ as _environ
    DATABASES = {"default": _environ.Env.db_url_config(_os.environ["SITE_DATABASE_URL"])}
    DATABASES["default"]["TEST"] = {"NAME": DATABASES["default"]["NAME"]}
"""


def run(args, cwd, env, **kwargs):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy of the tree: setuptools' build/ folder in the repository would carry files
    # that no longer exist (a renamed migration) into the wheel.
    source = tmp_path_factory.mktemp("source") / "popserver"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "data", "build", "dist", "*.egg-info", "__pycache__"),
    )
    run(
        # No build isolation: the venv's own setuptools (requirements.txt) builds it, with no index needed.
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        cwd=out,
        env=os.environ,
    )
    (path,) = out.glob("popserver-*.whl")
    return path


def test_wheel_holds_the_app_and_declares_ranges_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "popserver/migrations/0001_initial.py" in names
    assert "popserver/management/commands/runpop3.py" in names
    assert not any(n.startswith(("project/", "tests/", "bench/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert any("django>=5.2" in r.lower() for r in requires)
    assert not any("==" in r for r in requires), requires


@pytest.fixture
def site(wheel, tmp_path):
    """A startproject site with popserver installed from the wheel (into a --target folder, beside the test
    venv's Django) and an email-login user model."""
    target = tmp_path / "site-packages"
    run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        cwd=tmp_path,
        env=os.environ,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "POPSERVER_", "PYTEST"))}
    env["PYTHONPATH"] = str(target)
    env.pop("DATABASE_URL", None)
    from django.db import connection

    if connection.vendor != "sqlite":  # the same server as this run, in a database of its own
        url = os.environ.get("DATABASE_URL", "")
        # One database per test process, as the rest of the suite names its own: parallel runs never collide.
        env["SITE_DATABASE_URL"] = re.sub(r"/[^/]*$", f"/popserver_site_{os.getpid()}", url)
        _recreate_database(env["SITE_DATABASE_URL"])
    (tmp_path / "site").mkdir()
    run(
        [
            str(Path(sys.executable).parent / "django-admin"),
            "startproject",
            "site_project",
            str(tmp_path / "site"),
        ],
        cwd=tmp_path,
        env=env,
    )
    env["DJANGO_SETTINGS_MODULE"] = "site_project.settings"  # only once the project exists
    site = tmp_path / "site"
    for name, text in USER_APP.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(textwrap.dedent(text).lstrip())
    with open(site / "site_project" / "settings.py", "a") as fh:
        fh.write(SETTINGS_TAIL)
    return site, env


def _recreate_database(url: str) -> None:
    import environ

    config = environ.Env.db_url_config(url)
    if "postgresql" in config["ENGINE"]:
        import psycopg

        with psycopg.connect(
            host=config["HOST"],
            port=config["PORT"] or 5432,
            user=config["USER"],
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{config["NAME"]}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{config["NAME"]}"')
    else:
        import pymysql

        conn = pymysql.connect(
            host=config["HOST"],
            port=int(config["PORT"] or 3306),
            user=config["USER"],
            password=config["PASSWORD"] or "",
        )
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS `{config['NAME']}`")
            cursor.execute(f"CREATE DATABASE `{config['NAME']}` CHARACTER SET utf8mb4")
        conn.close()


def test_startproject_site_with_email_login_serves_pop3(site):
    site, env = site
    manage = [sys.executable, "manage.py"]
    run([*manage, "makemigrations", "accounts", "-v", "0"], cwd=site, env=env)
    run([*manage, "migrate", "-v", "0"], cwd=site, env=env)
    # popserver brings every migration it needs, whatever the site's DEFAULT_AUTO_FIELD
    check = subprocess.run(
        [*manage, "makemigrations", "--check", "--dry-run", "popserver"],
        cwd=site,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    checks = run([*manage, "check"], cwd=site, env=env)
    assert "popserver.E" not in checks.stdout + checks.stderr
    run(
        [*manage, "createmailbox", "alice@example.com", "--password-stdin"],
        cwd=site,
        env=env,
        input="pw one\n",
    )
    message = b"From: b@example.com\r\nSubject: hello site\r\n\r\nbody\r\n"
    # an MTA runs the MDA from its own working directory
    delivered = subprocess.run(
        [sys.executable, str(site / "manage.py"), "deliver", "ALICE@example.com"],
        cwd="/",
        env=env,
        input=message,
        capture_output=True,
        timeout=120,
    )
    assert delivered.returncode == 0, delivered.stderr
    server = subprocess.Popen(
        [*manage, "runpop3", "127.0.0.1:0"],
        cwd=site,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in server.stdout:
            if match := re.search(r"POP3 on 127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port, server.stderr.read() if server.poll() is not None else "no port"
        client = poplib.POP3("127.0.0.1", port, timeout=30)
        client.user("alice@example.com")
        client.pass_("pw one")
        assert client.stat() == (1, len(message))
        assert client.retr(1)[1] == [b"From: b@example.com", b"Subject: hello site", b"", b"body"]
        client.quit()
    finally:
        server.terminate()
        try:
            exit_code = server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = server.wait(timeout=30)
        server.stdout.close()
        server.stderr.close()
    assert exit_code == 0  # outside finally: a failure above is reported as itself
