"""Moved to ``popserver.mailin.delivery``; this documented path stays (``popserver.delivery.deliver``)."""

from popserver.mailin.delivery import deliver, prepare_message, resolve_mailbox, store_prepared

__all__ = ["deliver", "prepare_message", "resolve_mailbox", "store_prepared"]
