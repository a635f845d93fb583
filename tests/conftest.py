import contextlib
import os
import tempfile
import uuid

import pytest

# Rate-limit state and tokens are shared machine-wide; keep the tests' own.
_OWN_SHARED = None
if "WECOMCTL_SHARED_DIR" not in os.environ:
    _OWN_SHARED = os.environ["WECOMCTL_SHARED_DIR"] = tempfile.mkdtemp(prefix="wecomctl-test-shared-")

from redis_util import REDIS_URL, redis_client_or_skip  # noqa: E402
from wecomctl.store.base import NewLead  # noqa: E402
from wecomctl.store.disk import DiskStore  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _remove_own_shared_dir():
    yield
    if _OWN_SHARED:
        import shutil

        shutil.rmtree(_OWN_SHARED, ignore_errors=True)


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock():
    return FakeClock()


def redis_or_skip() -> str:
    """The test Redis URL; skips the test when Redis does not answer (fails it under CI=true)."""
    redis_client_or_skip().close()
    return REDIS_URL


def drop_namespace(namespace: str) -> None:
    """Delete one test namespace's keys (the Redis is shared: nothing else)."""
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{namespace}:*", count=1000))
    for i in range(0, len(keys), 500):
        r.delete(*keys[i:i + 500])
    r.close()


@pytest.fixture
def redis_namespace():
    """A namespace of its own for one test, deleted after it."""
    url = redis_or_skip()
    namespace = f"wecomctl-test-{uuid.uuid4().hex}"
    yield url, namespace
    drop_namespace(namespace)


@pytest.fixture
def disk_store(tmp_path):
    s = DiskStore(str(tmp_path / "data"), max_attempts=3, max_deliveries=3)
    yield s
    s.close()


@pytest.fixture(params=["disk", "redis"])
def store(request, tmp_path):
    """Every store test runs on both backends."""
    if request.param == "disk":
        s = DiskStore(str(tmp_path / "data"), max_attempts=3, max_deliveries=3)
        yield s
        s.close()
        return
    from wecomctl.store.redis import RedisStore

    url, namespace = request.getfixturevalue("redis_namespace")
    s = RedisStore(url, namespace=namespace, max_attempts=3, max_deliveries=3)
    yield s
    s.close()


def lead(phone="+8613800138000", name="张三", owner="zhangsan", **fields):
    return NewLead(phone, name, owner, dict(fields), "test.csv", 1)


class NoLimit:
    """A limiter that never waits (for tests of the HTTP boundary)."""

    def acquire(self, api, should_stop=None):
        return True

    @contextlib.contextmanager
    def hold(self, api, should_stop=None):
        yield
