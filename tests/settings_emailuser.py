"""The test settings with an email-login custom user model (``tests.emailusers.EmailUser``).

Used by a separate pytest run (``tests/emailusers/suite.py``, started by ``tests/test_createmailbox.py``)
and by the subprocesses it starts. On PostgreSQL and MariaDB its test database has a name of its own, so
that it can run while the main run's test database exists.
"""

import os

from tests.settings import *
from tests.settings import DATABASES, INSTALLED_APPS

INSTALLED_APPS = [*INSTALLED_APPS, "tests.emailusers"]
AUTH_USER_MODEL = "emailusers.EmailUser"

_db = DATABASES["default"]
if _db["ENGINE"] != "django.db.backends.sqlite3" and not os.environ.get("POPSERVER_TEST_DB_NAME"):
    _db["TEST"] = {"NAME": f"test_{_db['NAME']}_emailuser_{os.getpid()}"}
