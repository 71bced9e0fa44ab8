"""Settings of the default popserver deployment.

Everything comes from the environment (or an optional ``.env`` beside ``manage.py``) through django-environ.
Every default path is anchored to BASE_DIR, so ``manage.py deliver`` run by an MTA from another working
directory uses the same database.
"""

import contextlib
import os
import secrets
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

# Private state of this deployment (SQLite database, generated secret key). Its folder must be writable by
# every process that writes the database (runpop3 and the MTA's user running `deliver`): SQLite's WAL mode
# creates -wal and -shm files beside the database.
DATA_DIR = Path(env.str("POPSERVER_DATA_DIR", default=str(BASE_DIR / "data")))


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated on first run and kept in DATA_DIR."""
    if key := env.str("SECRET_KEY", default=""):
        return key
    path = DATA_DIR / "secret_key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


SECRET_KEY = _secret_key()
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "popserver",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # the admin's CSS and JS, also with DEBUG off
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "project.urls"
LOGIN_URL = "login"  # django.contrib.auth's views, with project/templates/registration/login.html
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "project" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]
WSGI_APPLICATION = "project.wsgi.application"

SQLITE_PATH = DATA_DIR / "db.sqlite3"
DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{SQLITE_PATH}")}


def tune_database(db: dict) -> dict:
    """SQLite for a threaded server beside other writer processes (see PITFALLS: WAL, IMMEDIATE, busy timeout)."""
    if db["ENGINE"] == "django.db.backends.sqlite3":
        db.setdefault("OPTIONS", {}).update(
            {
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            }
        )
        if str(db["NAME"]) not in ("", ":memory:") and Path(db["NAME"]).parent == DATA_DIR:
            DATA_DIR.mkdir(parents=True, exist_ok=True)  # only our own folder: a wrong path must fail
    elif db["ENGINE"] == "django.db.backends.mysql":
        db.setdefault("OPTIONS", {}).setdefault("charset", "utf8mb4")
    return db


tune_database(DATABASES["default"])
if DATABASES["default"]["ENGINE"] == "django.db.backends.mysql":
    import pymysql

    # PyMySQL (pure Python) stands in for mysqlclient, which needs a compiler and headers to install.
    pymysql.version_info = (2, 2, 1, "final", 0)
    pymysql.install_as_MySQLdb()

# Argon2id first: new passwords and logins re-hash with it.
PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# WhiteNoise serves static files from STATIC_ROOT (filled by `manage.py collectstatic`) and, with USE_FINDERS,
# straight from the installed apps, so the admin is styled with DEBUG off even before collectstatic has run.
STATIC_ROOT = BASE_DIR / "staticfiles"
WHITENOISE_USE_FINDERS = True
with contextlib.suppress(
    OSError
):  # WhiteNoise warns about a missing STATIC_ROOT; read-only checkouts skip this
    STATIC_ROOT.mkdir(exist_ok=True)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    # Message bodies with POPSERVER_BODY_STORE = "popserver.storage.bodies.DjangoStorageBodyStore": private
    # files under the data folder (never MEDIA_ROOT); django-storages' S3Storage etc. in production.
    "popserver": {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {
            "location": env.str("BODIES_DIR", default=str(DATA_DIR / "bodies")),
            "file_permissions_mode": 0o640,
        },
    },
}

# POP3 settings (see popserver/conf.py for every name and default). Any POPSERVER_* variable in the
# environment is passed through, parsed as JSON where it looks like JSON (numbers, lists, true/false).
# What mail clients are told (autoconfig, autodiscover, the set-up page): the demo's plain port on localhost.
# A real site sets its public name and TLS endpoints, e.g. POPSERVER_PUBLIC_HOSTNAME=mail.example.com and
# POPSERVER_PUBLIC_ENDPOINTS='[{"port": 995, "security": "tls"}, {"port": 110, "security": "starttls"}]'.
POPSERVER_PUBLIC_HOSTNAME = "localhost"
POPSERVER_PUBLIC_ENDPOINTS = [{"port": 8110, "security": "none"}]
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # No connection limit to stay under (the app's default, 64, leaves room in PostgreSQL's 100): allow
    # Dovecot's default of 100 concurrent POP3 processes.
    POPSERVER_MAX_SESSIONS = 100
for _name, _value in os.environ.items():
    if _name.startswith("POPSERVER_") and _name != "POPSERVER_DATA_DIR":
        import json

        try:
            globals()[_name] = json.loads(_value)
        except ValueError:
            globals()[_name] = _value

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {"popserver": {"handlers": ["stderr"], "level": LOG_LEVEL, "propagate": False}},
}
