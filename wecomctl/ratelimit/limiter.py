"""A rate limiter shared by every worker process, one per API.

Algorithm: GCRA (the "virtual scheduling" form of a leaky bucket) without burst, one
theoretical arrival time (TAT) per configured window. A window of `count` calls per
`seconds` spaces calls `(seconds + guard) / count` apart, which gives the sliding
guarantee: in ANY interval of length `seconds` (not only aligned ones) at most `count`
calls start, even if each call reaches WeCom up to `guard` later than its slot. Several
windows (per second, minute, hour) combine by taking the latest TAT.

A caller *reserves* a slot (possibly in the future) and sleeps until it, so N processes
with K threads each get distinct, evenly spaced slots without polling.

Every change of the shared state is one named operation that a backend performs
atomically: `reserve`, `pause`, `paused_until`, `aimd_cap`, `aimd_congested`, and the
concurrency slots `acquire_slot`/`release_slot`. The decisions are written once, as the
pure `*_step` functions below; `FileLimiterBackend` applies them under flock (one
machine), and `wecomctl.ratelimit.redis_backend` runs the same steps as Lua scripts
(a fleet of machines), tested to give the same answers on the same inputs.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from wecomctl.config import Limit

# Slots further ahead than this are not reserved: the caller waits and asks again, so a
# long fleet pause does not pile up reservations.
MAX_AHEAD_S = 5.0

AIMD_START = 16  # the cap a 45033 halves when none is configured
AIMD_STEP_S = 5.0  # additive increase: one more slot per this many seconds
AIMD_HOLD_S = 1.0  # 45033s within this of a decrease do not halve again
SLOT_POLL_S = 0.02


# -- the decisions, as pure functions of (state, inputs) -> (new state, answer) -----------
# Rate state: [paused_until, tat_0, ..., tat_n-1]. AIMD state: [cap, last change].
# The Lua scripts of the Redis backend are line-by-line translations of these.

def reserve_step(state: list[float], intervals: list[float], now: float,
                 max_ahead: float) -> tuple[list[float], float]:
    """Take the next free slot: the latest of now, the pause and every window's TAT.
    Books nothing when that is more than `max_ahead` away (or when there are no windows)."""
    slot = max([now] + state)
    if slot - now > max_ahead:
        return state, slot
    return [state[0]] + [slot + iv for iv in intervals], slot


def pause_step(state: list[float], until: float) -> list[float]:
    return [max(state[0], until)] + state[1:]


def aimd_cap_step(state: list[float], configured: int, now: float, step_s: float,
                  start: int) -> tuple[list[float], int]:
    """The cap in force (0 = none); one slot more each `step_s` without a 45033."""
    cap, changed = state
    if cap <= 0:
        return state, configured
    if now - changed >= step_s and (configured == 0 or cap < configured):
        grown = cap + 1
        if configured == 0 and grown >= start:
            return [0.0, now], 0  # recovered fully: no cap again
        return [grown, now], int(grown)
    return state, int(cap)


def aimd_congested_step(state: list[float], configured: int, now: float, hold_s: float,
                        start: int) -> tuple[list[float], int]:
    """A 45033: halve the cap, once per burst (`hold_s`). Returns the new cap."""
    cap, changed = state
    base = cap if cap > 0 else (configured or start)
    if cap > 0 and now - changed < hold_s:
        return state, int(cap)  # one burst of 45033 from many callers halves once
    new = max(1.0, float(int(base) // 2))
    return [new, now], int(new)


class FileLimiterBackend:
    """One small file per API: [paused_until, tat_0, tat_1, ...] as doubles, under flock,
    and `<api>#aimd.state` for the concurrency cap. Shared by the processes of one machine."""

    def __init__(self, directory: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        # flock excludes other processes; threads of one process share the descriptor,
        # so they also need an in-process lock.
        self._lock = threading.Lock()

    def _fd(self, name: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self.dir / f"{name}.state", os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[name] = fd
        return fd

    def update(self, name: str, n: int, fn: Callable[[list[float]], tuple[list[float], float]]):
        """Atomically read the state (n+1 doubles), apply fn, write it back."""
        with self._lock:
            fd = self._fd(name)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, 8 * (n + 1), 0)
                # A shorter file (new, or written by an operation with fewer windows, such
                # as pause) reads as zeros past its end.
                have = len(raw) // 8
                state = list(struct.unpack(f"<{have}d", raw[:8 * have])) + [0.0] * (n + 1 - have)
                new, result = fn(state)
                if new is not state:
                    os.pwrite(fd, struct.pack(f"<{n + 1}d", *new), 0)
                return result
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    # -- the named operations ---------------------------------------------------------------

    def reserve(self, key: str, intervals: list[float], now: float, max_ahead: float) -> float:
        return self.update(key, len(intervals), lambda s: reserve_step(s, intervals, now, max_ahead))

    def pause(self, key: str, until: float, now: float) -> None:
        # Reads and writes only the first double: the TATs behind it stay as they are.
        self.update(key, 0, lambda s: (pause_step(s, until), None))

    def paused_until(self, key: str, now: float) -> float:
        return self.update(key, 0, lambda s: (s, s[0]))

    def aimd_cap(self, key: str, configured: int, now: float, step_s: float, start: int) -> int:
        return int(self.update(f"{key}#aimd", 1, lambda s: aimd_cap_step(s, configured, now, step_s, start)))

    def aimd_congested(self, key: str, configured: int, now: float, hold_s: float, start: int) -> int:
        return int(self.update(f"{key}#aimd", 1, lambda s: aimd_congested_step(s, configured, now, hold_s, start)))

    def acquire_slot(self, key: str, cap: int, now: float):
        """Take one of the `cap` concurrency slots of `key`, or None if all are held. A
        slot is an flock on its own open file: the kernel drops it when the holder
        exits, so a killed worker never leaks a slot."""
        for i in range(cap):
            fd = os.open(self.dir / f"{key}.slot{i}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return fd
        return None

    def release_slot(self, handle) -> None:
        os.close(handle)  # closing drops the lock

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Scoped:
    """Names each API's state after the account it belongs to, so two configs for the same
    corp (or gateway) share one limit and two different corps never do."""

    def __init__(self, backend, scopes: dict[str, str]):
        self.backend, self.scopes = backend, scopes

    def _key(self, api: str) -> str:
        scope = self.scopes.get(api)
        return f"{scope}.{api}" if scope else api

    def reserve(self, api, intervals, now, max_ahead):
        return self.backend.reserve(self._key(api), intervals, now, max_ahead)

    def pause(self, api, until, now):
        self.backend.pause(self._key(api), until, now)

    def paused_until(self, api, now):
        return self.backend.paused_until(self._key(api), now)

    def aimd_cap(self, api, configured, now, step_s, start):
        return self.backend.aimd_cap(self._key(api), configured, now, step_s, start)

    def aimd_congested(self, api, configured, now, hold_s, start):
        return self.backend.aimd_congested(self._key(api), configured, now, hold_s, start)

    def acquire_slot(self, api, cap, now):
        return self.backend.acquire_slot(self._key(api), cap, now)

    def release_slot(self, handle):
        self.backend.release_slot(handle)


class RateLimiter:
    def __init__(self, backend, limits: dict[str, Limit], clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep, scopes: dict[str, str] | None = None):
        self.backend = _Scoped(backend, scopes) if scopes else backend
        self.limits = limits
        self.clock = clock
        self.sleep = sleep

    def reserve(self, api: str) -> float:
        """Reserve the next free slot; return its time (may be now or in the future).

        Returns a time > now + MAX_AHEAD_S without reserving when the API is paused or
        booked that far ahead; the caller then waits and asks again.
        """
        limit = self.limits.get(api)
        windows = limit.windows() if limit else []
        intervals: list[float] = []
        if windows:
            # At least 1 ms of guard: float rounding at epoch scale must not let slot L+1
            # fall a hair inside the window.
            guard = max(limit.guard_ms, 1.0) / 1000.0
            intervals = [(seconds + guard) / count for count, seconds in windows]
        return self.backend.reserve(api, intervals, self.clock(), MAX_AHEAD_S)

    def late(self, api: str, slot: float) -> bool:
        """Is it too late to start a call in `slot` (later than the guard after it)?
        A call that could not start in time (its intent took long to record, the store
        was down, the thread woke late) must take a new slot, or calls held back would go
        out together and overrun the window."""
        limit = self.limits.get(api)
        if not limit or not limit.windows():
            return False
        return self.clock() - slot > max(limit.guard_ms, 1.0) / 1000.0

    def acquire(self, api: str, should_stop: Callable[[], bool] = lambda: False) -> float:
        """Block until this caller may start one call; returns its slot's time (truthy).
        0.0 if should_stop() turned true."""
        while True:
            slot = self.reserve(api)
            wait = slot - self.clock()
            if wait <= MAX_AHEAD_S:
                if wait > 0:
                    self.sleep(wait)
                return max(slot, 1e-9)
            # Not reserved: sleep in short steps so a shutdown is noticed.
            self.sleep(min(1.0, wait - MAX_AHEAD_S))
            if should_stop():
                return 0.0

    def pause(self, api: str, until: float) -> None:
        """Stop every process from calling `api` until `until` (after a 45009 block)."""
        self.backend.pause(api, until, self.clock())

    def paused_until(self, api: str) -> float:
        return self.backend.paused_until(api, self.clock())

    # -- concurrency (45033) ---------------------------------------------------------------
    # Each API may have max_concurrency calls in flight across the fleet. The cap in force
    # adapts AIMD-style: a 45033 halves it for every process, and each AIMD_STEP_S without
    # one adds one back, up to max_concurrency. Shared state: [cap, last change].

    def _configured(self, api: str) -> int:
        limit = self.limits.get(api)
        return limit.max_concurrency if limit else 0

    def cap(self, api: str) -> int:
        """The concurrency cap in force for `api` (0 = none)."""
        return self.backend.aimd_cap(api, self._configured(api), self.clock(), AIMD_STEP_S, AIMD_START)

    def congested(self, api: str) -> int:
        """WeCom answered 45033: halve the cap for the whole fleet. Returns the new cap."""
        return self.backend.aimd_congested(api, self._configured(api), self.clock(), AIMD_HOLD_S, AIMD_START)

    @contextmanager
    def hold(self, api: str, should_stop: Callable[[], bool] = lambda: False):
        """Hold one of the API's concurrency slots for the duration of a call."""
        cap = self.cap(api)
        handle = None
        while cap > 0:
            handle = self.backend.acquire_slot(api, cap, self.clock())
            if handle is not None:
                break
            if should_stop():
                raise SlotWaitStopped(api)
            self.sleep(SLOT_POLL_S)
            cap = self.cap(api)  # may have grown, shrunk, or gone (recovered: no cap)
        try:
            yield
        finally:
            if handle is not None:
                self.backend.release_slot(handle)


class SlotWaitStopped(Exception):
    """Shutdown while waiting for a concurrency slot."""
