"""Checks of where message bodies live (issue 21): the body storage exists, and is nobody else's.

The store is chosen by POPSERVER_BODY_STORE (E009 checks that it imports); objects live in the storage named
by POPSERVER_BODY_STORAGE, never in a fallback: a missing alias is an error, not the default storage, whose
files a site may serve to anyone. Whether the storage can be written is checked when ``runpop3`` starts
(and by ``check --deploy``), not here: the web process may not reach it.
"""

from pathlib import Path

from django.conf import settings
from django.core.checks import Error, Tags, register

from popserver.conf import get_setting

PUBLIC_ALIASES = ("default", "staticfiles")


def storage_store_selected() -> bool:
    from django.utils.module_loading import import_string

    from popserver.storage.bodies import DjangoStorageBodyStore

    try:
        store = import_string(get_setting("BODY_STORE"))
    except (ImportError, TypeError, ValueError):
        return False  # E009 says so
    return isinstance(store, type) and issubclass(store, DjangoStorageBodyStore)


@register()
def check_body_storage(app_configs=None, **kwargs):
    alias = get_setting("BODY_STORAGE")
    if not storage_store_selected():
        return []
    if not isinstance(alias, str) or alias not in settings.STORAGES:
        return [
            Error(
                f"POPSERVER_BODY_STORE keeps bodies in a Django storage, but STORAGES has no "
                f"POPSERVER_BODY_STORAGE alias {alias!r}.",
                hint='Add STORAGES["popserver"] (a FileSystemStorage under the data folder, or S3Storage).',
                id="popserver.E040",
            )
        ]
    return _public_storage_errors(alias)


def _public_storage_errors(alias: str) -> list[Error]:
    if alias in PUBLIC_ALIASES:
        return [
            Error(
                f"POPSERVER_BODY_STORAGE is {alias!r}: message bodies would be stored among the site's public files.",
                hint='Give popserver a storage of its own, STORAGES["popserver"].',
                id="popserver.E041",
            )
        ]
    mine = settings.STORAGES[alias]
    errors = []
    for other in PUBLIC_ALIASES:
        theirs = settings.STORAGES.get(other)
        if theirs is not None and _same_place(mine, theirs):
            errors.append(
                Error(
                    f"STORAGES[{alias!r}] is the same place as STORAGES[{other!r}]: message bodies would be "
                    "stored among the site's public files.",
                    hint="Point it to a folder or bucket of its own.",
                    id="popserver.E041",
                )
            )
    location = _location(mine)
    for public in (getattr(settings, "MEDIA_ROOT", ""), getattr(settings, "STATIC_ROOT", "")):
        if location and public and _inside(location, public):
            errors.append(
                Error(
                    f"STORAGES[{alias!r}] stores files under {public}, which the site serves.",
                    hint="Use a folder outside MEDIA_ROOT and STATIC_ROOT (the default project: data/bodies).",
                    id="popserver.E041",
                )
            )
    return errors


def _location(config: dict) -> str:
    options = config.get("OPTIONS", {})
    if config.get("BACKEND") == "django.core.files.storage.FileSystemStorage":
        return str(options.get("location") or getattr(settings, "MEDIA_ROOT", "") or "")
    return ""


def _same_place(a: dict, b: dict) -> bool:
    if a.get("BACKEND") != b.get("BACKEND"):
        return False
    first, second = a.get("OPTIONS", {}), b.get("OPTIONS", {})
    if a.get("BACKEND") == "django.core.files.storage.FileSystemStorage":
        return _location(a) == _location(b)
    keys = ("bucket_name", "location", "endpoint_url", "azure_container", "container")
    return all(first.get(key) == second.get(key) for key in keys)


def _inside(path: str, root: str) -> bool:
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, ValueError):
        return False


@register(Tags.database)
def check_stored_bodies_have_a_storage(app_configs=None, databases=None, **kwargs):
    """With ``check --database default`` (and in ``migrate``): bodies already stored as objects need the
    storage even when new mail goes to the database."""
    if not databases or storage_store_selected():
        return []
    alias = get_setting("BODY_STORAGE")
    if isinstance(alias, str) and alias in settings.STORAGES:
        return []
    from django.db import DatabaseError

    from popserver.models import StoredBody

    try:
        stored = StoredBody.objects.exists()
    except DatabaseError:  # not migrated yet
        return []
    if not stored:
        return []
    return [
        Error(
            f"Some message bodies are objects of a Django storage, but STORAGES has no POPSERVER_BODY_STORAGE "
            f"alias {alias!r}: they cannot be read.",
            hint="Restore the storage's configuration, or move them back with popmovebodies --to database.",
            id="popserver.E040",
        )
    ]


@register(deploy=True)
def check_body_storage_writable(app_configs=None, **kwargs):
    """``check --deploy``: the body storage takes an object and gives it back (``runpop3`` does it too)."""
    if not storage_store_selected() or get_setting("BODY_STORAGE") not in settings.STORAGES:
        return []
    from popserver.storage.bodies import probe_body_storage

    problem = probe_body_storage()
    if problem:
        return [Error(f"The body storage cannot be used: {problem}", id="popserver.E042")]
    return []
