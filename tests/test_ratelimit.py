"""The shared limiter: spacing, the sliding-window guarantee, pauses, many processes.

Every test that takes `new_backend` runs twice: on the file backend (one machine) and on
Redis (a fleet). `new_backend()` makes another backend on the same shared state, which
stands for another process (or machine).
"""

import bisect
import multiprocessing as mp
import time

import pytest

from redis_util import REDIS_URL, new_client, redis_prefix  # noqa: F401 (fixture)
from wecomctl.config import Limit
from wecomctl.ratelimit.limiter import MAX_AHEAD_S, FileLimiterBackend, RateLimiter


def most_in_any_window(times, window):
    times = sorted(times)
    return max(bisect.bisect_left(times, t + window) - i for i, t in enumerate(times))


@pytest.fixture(params=["file", "redis"])
def backend_spec(request, tmp_path):
    """What a process needs to open the shared state: ("file", dir) or ("redis", url, prefix)."""
    if request.param == "file":
        return ("file", str(tmp_path / "limits"))
    return ("redis", REDIS_URL, request.getfixturevalue("redis_prefix"))


def open_backend(spec, server_clock=False, slot_ttl_s=60.0):
    if spec[0] == "file":
        return FileLimiterBackend(spec[1])
    from wecomctl.ratelimit.redis_backend import RedisLimiterBackend

    # Tests on the fake clock decide on the caller's clock; processes on the real clock
    # decide on the server's, as production does.
    return RedisLimiterBackend(new_client(), prefix=spec[2], server_clock=server_clock, slot_ttl_s=slot_ttl_s)


@pytest.fixture
def new_backend(backend_spec):
    opened = []

    def make():
        opened.append(open_backend(backend_spec))
        return opened[-1]

    yield make
    for b in opened:
        b.close()


@pytest.fixture
def make(new_backend, clock):
    def make(**limit):
        return RateLimiter(new_backend(), {"api": Limit(**limit)}, clock=clock, sleep=clock.sleep)

    return make


def test_slots_are_evenly_spaced_and_never_exceed_any_window(make, clock):
    lim = make(per_second=50, guard_ms=20)
    starts = []
    for _ in range(500):
        assert lim.acquire("api")
        starts.append(clock())
    assert most_in_any_window(starts, 1.0 + 0.019) <= 50  # holds even with 19 ms of jitter
    # and it uses the limit: 500 calls at 50/s with a 2% guard take ~10.2 s
    assert 9.9 < starts[-1] - starts[0] < 10.3


def test_reservations_from_many_callers_are_distinct(make, clock):
    lim = make(per_second=10, guard_ms=0)
    slots = [lim.reserve("api") for _ in range(20)]  # 20 callers at the same instant
    assert slots == sorted(slots) and len(set(slots)) == 20
    assert most_in_any_window(slots, 1.0) <= 10


def test_combined_windows_take_the_strictest(make, clock):
    lim = make(per_second=100, per_minute=60, guard_ms=0)
    starts = []
    for _ in range(120):
        lim.acquire("api")
        starts.append(clock())
    assert most_in_any_window(starts, 60.0) <= 60
    assert most_in_any_window(starts, 1.0) <= 100


def test_unlimited_api_never_waits(make, clock):
    lim = make()
    t0 = clock()
    for _ in range(100):
        lim.acquire("api")
    assert clock() == t0


def test_pause_holds_every_caller_until_the_block_ends(make, new_backend, clock):
    lim = make(per_second=10)
    lim.pause("api", clock() + 60)
    # a second limiter on the same directory stands for another process
    other = RateLimiter(new_backend(), lim.limits, clock=clock, sleep=clock.sleep)
    assert other.paused_until("api") == clock() + 60
    t0 = clock()
    assert other.acquire("api")
    assert clock() >= t0 + 60 - MAX_AHEAD_S and clock() <= t0 + 60 + 0.2


def test_acquire_gives_up_when_told_to_stop(make, clock):
    lim = make(per_second=10)
    lim.pause("api", clock() + 3600)
    assert not lim.acquire("api", should_stop=lambda: True)


def _hammer(spec, n, out):
    lim = RateLimiter(open_backend(spec, server_clock=True), {"api": Limit(per_second=200, guard_ms=5)})
    got = []
    for _ in range(n):
        lim.acquire("api")
        got.append(time.time())
    out.put(got)


def test_processes_share_one_limit(backend_spec):
    """Four processes, one limit: together they stay within it (real clock, ~1.2 s)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(backend_spec, 60, q)) for _ in range(4)]
    for p in procs:
        p.start()
    times = [t for _ in procs for t in q.get(timeout=30)]
    for p in procs:
        p.join()
    assert len(times) == 240
    # sleep overshoot only makes calls later; the reservation spacing holds the window
    assert most_in_any_window(times, 1.0) <= 200 + 2


def test_45033_halves_the_cap_fleet_wide_and_it_grows_back(make, new_backend, clock):
    from wecomctl.ratelimit.limiter import AIMD_STEP_S

    lim = make(max_concurrency=8)
    other = RateLimiter(new_backend(), lim.limits, clock=clock, sleep=clock.sleep)
    assert lim.cap("api") == 8
    assert lim.congested("api") == 4
    assert other.congested("api") == 4  # the same burst of 45033 halves once
    assert other.cap("api") == 4  # another process sees it
    clock.t += 1.5
    assert other.congested("api") == 2
    for expected in (3, 4, 5, 6, 7, 8, 8):
        clock.t += AIMD_STEP_S
        assert lim.cap("api") == expected  # additive increase, up to the configured cap


def test_without_a_configured_cap_45033_starts_one(make, clock):
    from wecomctl.ratelimit.limiter import AIMD_START, AIMD_STEP_S

    lim = make()
    assert lim.cap("api") == 0
    assert lim.congested("api") == AIMD_START // 2
    for _ in range(AIMD_START):
        clock.t += AIMD_STEP_S
        lim.cap("api")
    assert lim.cap("api") == 0  # recovered: no cap again


def _hold_slot(spec, q, hold_s):
    lim = RateLimiter(open_backend(spec, server_clock=True, slot_ttl_s=SLOT_TTL_S),
                      {"api": Limit(max_concurrency=2)})
    with lim.hold("api"):
        q.put(("in", time.time()))
        time.sleep(hold_s)
        q.put(("out", time.time()))


SLOT_TTL_S = 1.5  # the Redis lease in the process tests: a killed holder's slot is back after it


def test_concurrency_slots_are_shared_by_processes_and_freed_by_death(backend_spec):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hold_slot, args=(backend_spec, q, 0.3)) for _ in range(4)]
    for p in procs:
        p.start()
    events = sorted((q.get(timeout=30) for _ in range(8)), key=lambda e: e[1])
    for p in procs:
        p.join()
    inside = peak = 0
    for kind, _ in events:
        inside += 1 if kind == "in" else -1
        peak = max(peak, inside)
    assert peak == 2
    # a holder that is killed frees its slot: the kernel drops its lock (file), or its
    # lease lapses (Redis)
    killed = ctx.Process(target=_hold_slot, args=(backend_spec, q, 60))
    killed.start()
    assert q.get(timeout=30)[0] == "in"
    killed.kill()
    killed.join()
    t0 = time.time()
    lim = RateLimiter(open_backend(backend_spec, server_clock=True), {"api": Limit(max_concurrency=1)})
    with lim.hold("api", should_stop=lambda: time.time() > t0 + 10):
        pass
    assert time.time() - t0 < SLOT_TTL_S + 1.0


def _token_get(directory, fetched_path, out):
    from wecomctl.wecom.token import TokenCache

    def fetch():
        with open(fetched_path, "a") as fh:  # count real fetches across processes
            fh.write("x")
        time.sleep(0.3)  # a slow gettoken: the others must wait, not fetch too
        return "T", 7200

    out.put(TokenCache(directory, "ww", "scope", 60, fetch).get())


def test_token_refresh_is_single_flight_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    fetched = tmp_path / "fetched"
    procs = [ctx.Process(target=_token_get, args=(str(tmp_path / "tok"), str(fetched), q)) for _ in range(4)]
    for p in procs:
        p.start()
    tokens = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join()
    assert tokens == ["T"] * 4 and fetched.read_text() == "x"


def test_window_guarantee_holds_across_two_processes_sharing_the_state(new_backend, clock):
    """Two limiters on one state directory (two processes) taking turns, on a fake clock:
    together they stay within every sliding window."""
    limits = {"api": Limit(per_minute=120, guard_ms=20)}
    a = RateLimiter(new_backend(), limits, clock=clock, sleep=clock.sleep)
    b = RateLimiter(new_backend(), limits, clock=clock, sleep=clock.sleep)
    starts = []
    for i in range(600):
        (a if i % 3 else b).acquire("api")
        starts.append(clock())
    assert most_in_any_window(starts, 60.0) <= 120
    assert most_in_any_window(starts, 60.0) >= 119  # and it uses the limit
