import contextlib
import os
import tempfile

import pytest

# Rate-limit state and tokens are shared machine-wide; keep the tests' own.
os.environ.setdefault("WECOMCTL_SHARED_DIR", tempfile.mkdtemp(prefix="wecomctl-test-shared-"))

from wecomctl.store.base import NewLead
from wecomctl.store.disk import DiskStore


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


@pytest.fixture
def store(tmp_path):
    s = DiskStore(str(tmp_path / "data"), max_attempts=3, max_deliveries=3)
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
