"""Moved to ``popserver.storage.bodies``; this path stays because sites name it in ``POPSERVER_BODY_STORE``."""

from popserver.storage.bodies import BodyStore, DatabaseBodyStore

__all__ = ["BodyStore", "DatabaseBodyStore"]
