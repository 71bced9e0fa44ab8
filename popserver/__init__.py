"""popserver: a Django-native POP3 server.

Keep this module free of imports: ``python -m popserver.conformance`` imports it, and the conformance kit must
run where Django is not installed.
"""

__version__ = "0.1.0"
