"""Test settings: the default project's, with a fast hasher and a file-backed SQLite test database.

Subprocesses started by tests (``deliver``, ``runpop3``) use these settings too, with POPSERVER_TEST_DB_NAME
naming the test database the test created (see ``tests.conftest.subprocess_env``).
"""

import os

from project.settings import *
from project.settings import BASE_DIR, DATABASES, PASSWORD_HASHERS

# Argon2 costs ~0.2 s of CPU per check: most tests use MD5; tests of hashing override this.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher", *PASSWORD_HASHERS]

_db = DATABASES["default"]
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # In-memory test databases cannot be shared with subprocesses or threads: give it a file.
    _db["TEST"] = {"NAME": str(BASE_DIR / "data" / f"test_{os.getpid()}.sqlite3")}
else:
    # One test database per run, so two runs on one server (developers, CI) never drop each other's.
    _db["TEST"] = {"NAME": f"test_{_db['NAME']}_{os.getpid()}"}
if name := os.environ.get("POPSERVER_TEST_DB_NAME"):
    # A subprocess started by a test: use the test database itself.
    _db["NAME"] = name
    _db["TEST"] = {"NAME": name}

POPSERVER_AUTH_FAILURE_DELAY = float(os.environ.get("POPSERVER_AUTH_FAILURE_DELAY", "0"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {"popserver": {"handlers": ["stderr"], "level": "INFO", "propagate": True}},
}
SILENCED_SYSTEM_CHECKS = ["popserver.W001"]  # the fast test hasher comes first on purpose
