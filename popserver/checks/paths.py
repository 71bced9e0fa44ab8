"""Checks that every dotted-path setting imports and names the right kind of thing."""

from django.core.checks import Error, register
from django.utils.module_loading import import_string

from popserver.conf import get_setting

LOCAL_BACKEND = "LocalDeliveryBackend"


def _imported(name: str, path) -> tuple[object | None, str]:
    if not isinstance(path, str) or "." not in path:
        return None, f"POPSERVER_{name} must be a dotted path, not {path!r}."
    try:
        return import_string(path), ""
    except ImportError as exc:
        return None, f"POPSERVER_{name} {path!r} cannot be imported: {exc}"


@register()
def check_plugin_paths(app_configs=None, **kwargs):
    from popserver.logins.throttle import Throttle
    from popserver.storage.bodies import BodyStore

    messages = []
    for name, kind in (("BODY_STORE", BodyStore), ("THROTTLE", Throttle)):
        found, problem = _imported(name, get_setting(name))
        if found is not None and not (isinstance(found, type) and issubclass(found, kind)):
            problem = f"POPSERVER_{name} {get_setting(name)!r} is not a {kind.__name__} subclass."
        if problem:
            messages.append(Error(problem, id="popserver.E009"))
    return messages


@register()
def check_mail_fallback_backend(app_configs=None, **kwargs):
    path = get_setting("MAIL_FALLBACK_BACKEND")
    if not path:
        return []
    found, problem = _imported("MAIL_FALLBACK_BACKEND", path)
    if problem:
        return [Error(problem, id="popserver.E006")]
    if getattr(found, "__name__", "") == LOCAL_BACKEND:
        return [
            Error(
                "POPSERVER_MAIL_FALLBACK_BACKEND cannot be LocalDeliveryBackend itself.", id="popserver.E006"
            )
        ]
    return []
