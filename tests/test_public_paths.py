"""Every path the README documents still imports, at the place it is documented (the house issue kept them)."""

import importlib

import pytest
from django.core.management import get_commands
from django.utils.module_loading import import_string

from popserver.conf import DEFAULTS

DOCUMENTED = [
    "popserver.delivery.deliver",
    "popserver.mail.LocalDeliveryBackend",
    "popserver.throttle.DatabaseThrottle",
    "popserver.throttle.CacheThrottle",
    "popserver.bodystore.DatabaseBodyStore",
    "popserver.exceptions.RecipientsRefused",
    "popserver.exceptions.QuotaExceeded",
    "popserver.signals.message_delivered",
    "popserver.signals.messages_deleted",
    "popserver.signals.session_closed",
    "popserver.signals.login_failed",
    "popserver.signals.login_locked_out",
    "popserver.conf.get_setting",
    "popserver.testing.MemoryMaildrop",
    "popserver.mailin.mailboxes.create_mailbox",
]


@pytest.mark.parametrize("path", DOCUMENTED)
def test_documented_path_imports(path):
    assert callable(import_string(path)) or import_string(path) is not None


def test_old_paths_are_the_same_objects_as_the_new():
    from popserver.bodystore import DatabaseBodyStore
    from popserver.delivery import deliver
    from popserver.mail import LocalDeliveryBackend
    from popserver.mailin.delivery import deliver as new_deliver
    from popserver.mailin.email_backend import LocalDeliveryBackend as NewBackend
    from popserver.storage.bodies import DatabaseBodyStore as NewStore
    from popserver.throttle import CacheThrottle
    from popserver.logins.throttle import CacheThrottle as NewThrottle

    assert (deliver, LocalDeliveryBackend, DatabaseBodyStore, CacheThrottle) == (
        new_deliver,
        NewBackend,
        NewStore,
        NewThrottle,
    )


def test_urls_import():
    assert importlib.import_module("popserver.urls").urlpatterns


@pytest.mark.parametrize(
    "command",
    [
        "runpop3",
        "deliver",
        "createmailbox",
        "apppassword",
        "poplockouts",
        "prunepopaudit",
        "importmail",
        "exportmail",
    ],
)
def test_documented_commands_exist(command):
    assert get_commands()[command] == "popserver"


@pytest.mark.parametrize(
    "name", sorted(n for n, v in DEFAULTS.items() if isinstance(v, str) and v.startswith("popserver."))
)
def test_default_dotted_paths_import(name):
    assert import_string(DEFAULTS[name])
