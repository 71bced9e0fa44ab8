"""The admin of popserver, one module per concern; nothing else in popserver imports it.

Django's admin autodiscovery imports this package; importing the modules registers their model admins.
"""

from . import audit, logins, mailboxes, messages, overview  # noqa: F401  (registers the model admins)
