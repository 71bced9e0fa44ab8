"""Waiting in tests without sleeping as synchronisation: poll a condition with a bounded deadline."""

import threading
import time


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass (failure)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        threading.Event().wait(interval)
    raise AssertionError(f"condition not met within {timeout}s")
