"""State shared through Redis: the Lua scripts decide as the Python steps do, host clock
skew cancels out, leases lapse, the access token is fetched once for the fleet, and no
password leaks into a message."""

import random
import sys
import threading
import time

import pytest

from redis_util import REDIS_URL, new_client, redis_prefix  # noqa: F401 (fixture)
from wecomctl.config import Limit
from wecomctl.errors import SharedStateError, StoreError
from wecomctl.ratelimit import make_backend
from wecomctl.ratelimit.limiter import AIMD_HOLD_S, AIMD_START, AIMD_STEP_S, FileLimiterBackend, RateLimiter
from wecomctl.ratelimit.redis_backend import RedisLimiterBackend, connect, redact_url
from wecomctl.wecom.token import RedisTokenCache, make_token_cache


def redis_backend(prefix, **kwargs):
    kwargs.setdefault("server_clock", False)
    return RedisLimiterBackend(new_client(), prefix=prefix, **kwargs)


# -- the Lua scripts against the Python steps -------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_lua_decides_exactly_as_the_python_steps(tmp_path, redis_prefix, seed):
    """Random operations on random clocks (also going backwards, as another host's may),
    applied to both backends: every answer is the same, to the last bit."""
    rnd = random.Random(seed)
    py = FileLimiterBackend(str(tmp_path / "l"))  # applies the *_step functions
    lua = redis_backend(redis_prefix)
    windows = [[], [1.02 / 50], [60.02 / 600, 3600.02 / 150000], [1.001 / 3, 60.001 / 10, 3600.001 / 100]]
    now = 1_800_000_000.0
    for _ in range(1500):
        now += rnd.choice([0.0, 0.0, 0.001, 0.013, 0.5, 1.0, 4.9, 7.3, -0.2, -3.0])
        key = rnd.choice(["a", "b"])
        op = rnd.random()
        if op < 0.55:
            iv = rnd.choice(windows)
            args = (key, iv, now, rnd.choice([5.0, 0.5]))
            assert py.reserve(*args) == lua.reserve(*args), args
        elif op < 0.62:
            until = now + rnd.choice([-1.0, 2.0, 60.0, 3.3, 5.0, 0.5])  # also exactly max_ahead
            py.pause(key, until, now)
            lua.pause(key, until, now)
        elif op < 0.7:
            assert py.paused_until(key, now) == lua.paused_until(key, now)
        elif op < 0.85:
            args = (key, rnd.choice([0, 1, 3, 8]), now, AIMD_STEP_S, AIMD_START)
            assert py.aimd_cap(*args) == lua.aimd_cap(*args), args
        else:
            args = (key, rnd.choice([0, 1, 3, 8]), now, AIMD_HOLD_S, AIMD_START)
            assert py.aimd_congested(*args) == lua.aimd_congested(*args), args
    lua.close()


# -- the server's clock: skew between hosts cancels out -----------------------------------------

class SkewedClock:
    def __init__(self, skew):
        self.skew = skew

    def __call__(self):
        return time.time() + self.skew


def test_hosts_with_skewed_clocks_still_get_evenly_spaced_slots(redis_prefix):
    """Host B's clock is 30 s ahead of host A's. Deciding on Redis's clock, B's next slot
    is still one interval after A's, in real time, and each is told it on its own clock."""
    limits = {"api": Limit(per_second=10, guard_ms=0)}
    a = RateLimiter(redis_backend(redis_prefix, server_clock=True), limits, clock=SkewedClock(0.0))
    b = RateLimiter(redis_backend(redis_prefix, server_clock=True), limits, clock=SkewedClock(30.0))
    slot_a = a.reserve("api") - a.clock()  # seconds from now, on the real timeline
    slot_b = b.reserve("api") - b.clock()
    assert abs(slot_a) < 0.05
    assert 0.1 - 0.05 < slot_b < 0.1 + 0.05
    # a pause set by A for 60 s ends, on B's clock, 60 s from now too
    a.pause("api", a.clock() + 60)
    assert abs(b.paused_until("api") - b.clock() - 60) < 0.05
    # and a host far in the past (a fake clock) is answered on its own timeline
    c = RateLimiter(redis_backend(redis_prefix, server_clock=True), limits, clock=lambda: 1_000_000.0)
    assert abs(c.paused_until("api") - 1_000_060.0) < 0.05


# -- the semaphore's leases ---------------------------------------------------------------------

def test_a_slot_is_freed_when_its_holders_lease_lapses(redis_prefix, clock):
    limits = {"api": Limit(max_concurrency=1)}
    dead = RateLimiter(redis_backend(redis_prefix, slot_ttl_s=60.0), limits, clock=clock, sleep=clock.sleep)
    alive = RateLimiter(redis_backend(redis_prefix, slot_ttl_s=60.0), limits, clock=clock, sleep=clock.sleep)
    assert dead.backend.acquire_slot("api", 1, clock()) is not None  # and then it is killed
    assert alive.backend.acquire_slot("api", 1, clock()) is None
    clock.t += 59.9
    assert alive.backend.acquire_slot("api", 1, clock()) is None
    t0 = clock()
    with alive.hold("api"):  # polls (on the fake clock) until the lease lapses
        assert t0 < clock() <= t0 + 0.2
    # released on exit: the next caller gets it at once
    with dead.hold("api"):
        pass


def test_slots_respect_the_cap_and_are_released(redis_prefix, clock):
    b = redis_backend(redis_prefix)
    held = [b.acquire_slot("api", 3, clock()) for _ in range(3)]
    assert None not in held and b.acquire_slot("api", 3, clock()) is None
    b.release_slot(held[0])
    assert b.acquire_slot("api", 3, clock()) is not None
    assert b.acquire_slot("api", 2, clock()) is None  # a halved cap admits no one until holders leave


# -- the access token ----------------------------------------------------------------------------

class Fetcher:
    def __init__(self, tokens=("T1", "T2", "T3"), delay=0.0, expires_in=7200):
        self.tokens, self.delay, self.expires_in = list(tokens), delay, expires_in
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls += 1
            token = self.tokens[self.calls - 1]
        time.sleep(self.delay)  # a slow gettoken: the others must wait, not fetch too
        return token, self.expires_in


def token_cache(prefix, fetch, **kwargs):
    return RedisTokenCache(new_client(), "ww1", "app", 60, fetch, prefix=prefix, **kwargs)


def test_token_refresh_is_single_flight_across_machines_and_threads(redis_prefix):
    fetch = Fetcher(delay=0.3)
    caches = [token_cache(redis_prefix, fetch) for _ in range(3)]  # three machines
    got = []
    threads = [threading.Thread(target=lambda c=c: got.append(c.get())) for c in caches for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == ["T1"] * 12 and fetch.calls == 1


def test_invalidating_a_stale_token_does_nothing(redis_prefix):
    fetch = Fetcher()
    a, b = token_cache(redis_prefix, fetch), token_cache(redis_prefix, fetch)
    assert a.get() == "T1"
    a.invalidate("T1")  # rejected: the next get fetches a new one
    assert b.get() == "T2" and fetch.calls == 2
    a.invalidate("T1")  # a late rejection of the old token: T2 stays
    assert a.get() == "T2" and b.get() == "T2" and fetch.calls == 2


def test_token_is_refreshed_when_due_and_never_sooner_than_half_its_life(redis_prefix):
    fetch = Fetcher(expires_in=0.4)  # margin 60 s > life: refresh at half the life, 0.2 s
    cache = token_cache(redis_prefix, fetch)
    assert cache.get() == "T1"
    ttl = cache.client.pttl(cache.key)
    assert 100 < ttl <= 200
    time.sleep(0.25)
    assert token_cache(redis_prefix, fetch).get() == "T2" and fetch.calls == 2


def test_a_dead_refreshers_lock_lapses(redis_prefix):
    fetch = Fetcher()
    cache = token_cache(redis_prefix, fetch)
    cache.client.set(cache.lock_key, "someone-who-died", px=300)
    t0 = time.time()
    assert cache.get() == "T1" and fetch.calls == 1
    assert 0.25 < time.time() - t0 < 2.0
    assert cache.client.get(cache.lock_key) is None  # ours was released


def test_the_token_key_names_the_app_without_its_secret(redis_prefix):
    cache = RedisTokenCache(new_client(), "ww-corp", "secret-app-key", 60, Fetcher(), prefix=redis_prefix)
    assert "ww-corp" not in cache.key and "secret-app-key" not in cache.key
    assert cache.key.startswith(f"{redis_prefix}:token:")


def test_make_token_cache_picks_by_location(tmp_path, redis_prefix):
    from wecomctl.wecom.token import TokenCache

    assert isinstance(make_token_cache("", str(tmp_path), "ww", "app", 60, Fetcher()), TokenCache)
    cache = make_token_cache(REDIS_URL, str(tmp_path), "ww", "app", 60, Fetcher(), prefix=redis_prefix)
    assert isinstance(cache, RedisTokenCache) and cache.get() == "T1"


# -- the factory and its errors ------------------------------------------------------------------

def test_make_backend_picks_by_location(tmp_path, redis_prefix):
    assert isinstance(make_backend("", str(tmp_path)), FileLimiterBackend)
    assert isinstance(make_backend(str(tmp_path / "x"), str(tmp_path)), FileLimiterBackend)
    backend = make_backend(REDIS_URL, str(tmp_path), prefix=redis_prefix)
    assert isinstance(backend, RedisLimiterBackend) and backend.server_clock == "1"
    assert backend.reserve("api", [0.1], time.time(), 5.0) == pytest.approx(time.time(), abs=0.1)


@pytest.mark.parametrize("url,shown", [
    ("redis://:s3cret-pw@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
    ("rediss://user:s3cret-pw@cache.example:6380/2", "rediss://***@cache.example:6380/2"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://127.0.0.1:6379/0?password=s3cret-pw&db=1", "redis://127.0.0.1:6379/0?db=1"),
])
def test_urls_are_shown_without_the_password(url, shown):
    assert redact_url(url) == shown


def test_unreachable_redis_is_a_store_error_without_the_password(tmp_path):
    with pytest.raises(StoreError) as err:
        make_backend("redis://admin:s3cret-pw@127.0.0.1:1/0", str(tmp_path))
    message = str(err.value)
    assert isinstance(err.value, SharedStateError)
    assert "s3cret-pw" not in message and "redis://***@127.0.0.1:1/0" in message
    assert "reachable" in message


def test_a_refused_login_is_a_store_error_without_the_password(tmp_path, redis_prefix):
    with pytest.raises(SharedStateError) as err:
        make_backend(REDIS_URL.replace("redis://", "redis://nosuchuser:s3cret-pw@"), str(tmp_path))
    assert "s3cret-pw" not in str(err.value) and "***@" in str(err.value)


def test_without_the_redis_client_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis fails
    with pytest.raises(SharedStateError, match=r"pip install 'wecomctl\[redis\]'"):
        connect("redis://127.0.0.1:6379/0")
