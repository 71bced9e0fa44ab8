"""System checks: stable ids, warnings for what can run, errors only for what cannot."""

import pytest
from django.core.checks import run_checks
from django.test import override_settings


def ids(**settings) -> set[str]:
    with override_settings(**settings):
        return {m.id for m in run_checks() if m.id.startswith("popserver.")}


def test_default_project_settings_have_no_errors():
    assert not {i for i in ids() if ".E" in i}


@pytest.mark.parametrize(
    "name,value",
    [
        ("MAX_SESSIONS", 0),
        ("AUTOLOGOUT", "ten"),
        ("MAX_PASSWORD_CHECKS", -1),
        ("LOCK_STALE_AFTER", True),
        ("LMTP_MAX_RECIPIENTS", 0),
        ("LMTP_TIMEOUT", None),
    ],
)
def test_non_positive_numbers_are_errors(name, value):
    assert "popserver.E001" in ids(**{f"POPSERVER_{name}": value})


def test_negative_failure_delay_is_an_error():
    assert "popserver.E007" in ids(POPSERVER_AUTH_FAILURE_DELAY=-1)


def test_bad_trusted_networks_is_an_error():
    assert "popserver.E002" in ids(POPSERVER_TRUSTED_NETWORKS=["not a network"])
    assert "popserver.E002" in ids(POPSERVER_LMTP_TRUSTED_NETWORKS=["127.0.0.1/33"])


def test_plaintext_policy():
    assert "popserver.E003" in ids(POPSERVER_PLAINTEXT_AUTH="sometimes")
    assert "popserver.W004" in ids(POPSERVER_PLAINTEXT_AUTH="always")
    assert not {"popserver.E003", "popserver.W004"} & ids(POPSERVER_PLAINTEXT_AUTH="never")


def test_short_autologout_is_only_a_warning():
    found = ids(POPSERVER_AUTOLOGOUT=60)
    assert "popserver.W002" in found and not {i for i in found if ".E" in i}


def test_argon2_not_first_is_a_warning():
    stock = [
        "django.contrib.auth.hashers.PBKDF2PasswordHasher",
        "django.contrib.auth.hashers.Argon2PasswordHasher",
    ]
    assert "popserver.W001" in ids(PASSWORD_HASHERS=stock)
    assert "popserver.W001" not in ids(PASSWORD_HASHERS=list(reversed(stock)))


def test_huge_chunks_warn():
    assert "popserver.W003" in ids(POPSERVER_BODY_CHUNK_SIZE=64 * 1024 * 1024)


def test_throttle_cache_must_be_shared():
    cache_throttle = "popserver.logins.throttle.CacheThrottle"
    local = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    shared = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:6379",
        }
    }
    assert "popserver.W005" in ids(POPSERVER_THROTTLE=cache_throttle, CACHES=local)
    assert "popserver.W005" not in ids(POPSERVER_THROTTLE=cache_throttle, CACHES=shared)
    assert "popserver.E004" in ids(POPSERVER_THROTTLE=cache_throttle, POPSERVER_THROTTLE_CACHE="nope")
    assert "popserver.W005" not in ids(CACHES=local)  # the database throttle needs no cache


def test_accepted_passwords_and_login_delay():
    assert "popserver.E005" in ids(POPSERVER_ACCEPTED_PASSWORDS="any")
    assert "popserver.E005" not in ids(POPSERVER_ACCEPTED_PASSWORDS="app")
    assert "popserver.E007" in ids(POPSERVER_LOGIN_DELAY=-5)
    assert "popserver.E001" in ids(POPSERVER_THROTTLE_LOCKOUT=0)


def test_every_id_is_one_rule():
    found = ids(POPSERVER_QUOTA_BYTES=-1, POPSERVER_AUTH_FAILURE_DELAY=-1, POPSERVER_MAX_SESSIONS=0)
    assert {"popserver.E001", "popserver.E007", "popserver.E008"} <= found


@pytest.mark.parametrize(
    "name,value",
    [
        ("BODY_STORE", "popserver.storage.bodies.NoSuchStore"),
        ("BODY_STORE", "popserver.logins.throttle.DatabaseThrottle"),
        ("THROTTLE", "nowhere.Throttle"),
        ("THROTTLE", 42),
    ],
)
def test_dotted_path_settings_must_import_the_right_kind(name, value):
    assert "popserver.E009" in ids(**{f"POPSERVER_{name}": value})


def test_the_documented_old_paths_still_pass_the_path_check():
    assert "popserver.E009" not in ids(
        POPSERVER_BODY_STORE="popserver.bodystore.DatabaseBodyStore",
        POPSERVER_THROTTLE="popserver.throttle.CacheThrottle",
    )
