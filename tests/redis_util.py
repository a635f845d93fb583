"""Redis for tests: the shared server at $WECOMCTL_TEST_REDIS_URL (default the local one).

Every test gets its own key prefix and deletes only its own keys (the server is shared:
never FLUSHDB). Without a Redis the tests skip, except on CI (CI=true), where they fail.
"""

import os
import uuid

import pytest

REDIS_URL = os.environ.get("WECOMCTL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_client_or_skip():
    try:
        import redis

        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0, socket_timeout=5.0,
                                      decode_responses=True)
        client.ping()
        return client
    except Exception as exc:  # no client library, refused, timeout...
        message = f"no Redis answering at {REDIS_URL}: {type(exc).__name__}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def new_client():
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_timeout=5.0, decode_responses=True)


@pytest.fixture
def redis_prefix():
    """A key prefix of this test's own; its keys are deleted afterwards."""
    client = redis_client_or_skip()
    prefix = f"wecomctl-test:{uuid.uuid4().hex[:12]}"
    yield prefix
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
