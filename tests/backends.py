"""Authentication backends used by the tests (configured with override_settings)."""

from django.contrib.auth.backends import ModelBackend

calls: list[str] = []


class CountingBackend(ModelBackend):
    """ModelBackend that records every username whose password it checked."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        calls.append(username)
        return super().authenticate(request, username=username, password=password, **kwargs)


class RequestRequiredBackend(ModelBackend):
    """Like django-axes: refuses to work without a request carrying the client's address."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        if request is None or not request.META.get("REMOTE_ADDR"):
            raise ValueError("this backend needs a request with REMOTE_ADDR")
        return super().authenticate(request, username=username, password=password, **kwargs)


seen_addresses: list[str] = []


class AddressRecordingBackend(ModelBackend):
    """ModelBackend that records the client address each request carried (REMOTE_ADDR)."""

    def authenticate(self, request, username=None, password=None, **kwargs):
        seen_addresses.append(request.META.get("REMOTE_ADDR") if request is not None else None)
        return super().authenticate(request, username=username, password=password, **kwargs)
