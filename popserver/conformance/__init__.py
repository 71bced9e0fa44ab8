"""A black-box POP3 conformance kit: ``python -m popserver.conformance pop3://USER:PASSWORD@HOST:PORT``.

It runs against any POP3 server (popserver, Dovecot, anything behind an MTA) and checks RFC 1939, 2449,
3206, 2595/8314, 5034 and 6856 behaviour with RFC citations, including byte-exact checks of a corpus of
tricky messages that it delivers itself. It uses only the standard library and never imports Django or the
rest of popserver, so it runs wherever Python does (``popserver/__init__.py`` must stay import-free for
that).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
