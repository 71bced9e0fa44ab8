"""Moved to ``popserver.logins.throttle``; this path stays because sites name it in ``POPSERVER_THROTTLE``."""

from popserver.logins.throttle import CacheThrottle, DatabaseThrottle, Throttle

__all__ = ["CacheThrottle", "DatabaseThrottle", "Throttle"]
