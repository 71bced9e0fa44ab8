"""Moved to ``popserver.mailin.email_backend``; this path stays because sites name it in ``EMAIL_BACKEND``."""

from popserver.mailin.email_backend import LocalDeliveryBackend

__all__ = ["LocalDeliveryBackend"]
