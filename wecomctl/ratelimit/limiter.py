"""A rate limiter shared by every worker process, one per API.

Algorithm: GCRA (the "virtual scheduling" form of a leaky bucket) without burst, one
theoretical arrival time (TAT) per configured window. A window of `count` calls per
`seconds` spaces calls `(seconds + guard) / count` apart, which gives the sliding
guarantee: in ANY interval of length `seconds` (not only aligned ones) at most `count`
calls start, even if each call reaches WeCom up to `guard` later than its slot. Several
windows (per second, minute, hour) combine by taking the latest TAT.

A caller *reserves* a slot (possibly in the future) and sleeps until it, so N processes
with K threads each get distinct, evenly spaced slots without polling.

The state is tiny (one float per window) so the backend only needs an atomic
read-modify-write: a locked file here, a Lua script on Redis.
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


class FileLimiterBackend:
    """One small file per API: [paused_until, tat_0, tat_1, ...] as doubles, under flock."""

    def __init__(self, directory: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        # flock excludes other processes; threads of one process share the descriptor,
        # so they also need an in-process lock.
        self._lock = threading.Lock()

    def _fd(self, api: str) -> int:
        fd = self._fds.get(api)
        if fd is None:
            fd = os.open(self.dir / f"{api}.state", os.O_RDWR | os.O_CREAT, 0o600)
            self._fds[api] = fd
        return fd

    def update(self, api: str, n: int, fn: Callable[[list[float]], tuple[list[float], float]]) -> float:
        """Atomically read the state (n+1 doubles), apply fn, write it back."""
        with self._lock:
            fd = self._fd(api)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, 8 * (n + 1), 0)
                state = list(struct.unpack(f"<{n + 1}d", raw)) if len(raw) == 8 * (n + 1) else [0.0] * (n + 1)
                new, result = fn(state)
                os.pwrite(fd, struct.pack(f"<{n + 1}d", *new), 0)
                return result
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def try_slot(self, api: str, i: int) -> int | None:
        """Take concurrency slot i of `api` if free: an flock on its own open file. The
        kernel drops it when the holder exits, so a killed worker never leaks a slot."""
        fd = os.open(self.dir / f"{api}.slot{i}", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def free_slot(fd: int) -> None:
        os.close(fd)  # closing drops the lock

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
        scope = self.scopes.get(api.split("#", 1)[0])
        return f"{scope}.{api}" if scope else api

    def update(self, api, n, fn):
        return self.backend.update(self._key(api), n, fn)

    def try_slot(self, api, i):
        return self.backend.try_slot(self._key(api), i)

    def free_slot(self, fd):
        self.backend.free_slot(fd)


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
        now = self.clock()
        if not windows:
            paused = self.backend.update(api, 0, lambda s: (s, s[0]))
            return max(now, paused)
        # At least 1 ms of guard: float rounding at epoch scale must not let slot L+1 fall
        # a hair inside the window.
        guard = max(limit.guard_ms, 1.0) / 1000.0
        intervals = [(seconds + guard) / count for count, seconds in windows]

        def step(state: list[float]):
            slot = max([now] + state)
            if slot - now > MAX_AHEAD_S:
                return state, slot
            new = [state[0]] + [slot + iv for iv in intervals]
            return new, slot

        return self.backend.update(api, len(windows), step)

    def acquire(self, api: str, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Block until this caller may start one call. False if should_stop() turned true."""
        while True:
            slot = self.reserve(api)
            wait = slot - self.clock()
            if wait <= MAX_AHEAD_S:
                if wait > 0:
                    self.sleep(wait)
                return True
            # Not reserved: sleep in short steps so a shutdown is noticed.
            self.sleep(min(1.0, wait - MAX_AHEAD_S))
            if should_stop():
                return False

    def pause(self, api: str, until: float) -> None:
        """Stop every process from calling `api` until `until` (after a 45009 block)."""
        limit = self.limits.get(api)
        n = len(limit.windows()) if limit else 0
        self.backend.update(api, n, lambda s: ([max(s[0], until)] + s[1:], 0.0))

    def paused_until(self, api: str) -> float:
        limit = self.limits.get(api)
        n = len(limit.windows()) if limit else 0
        return self.backend.update(api, n, lambda s: (s, s[0]))

    # -- concurrency (45033) ---------------------------------------------------------------
    # Each API may have max_concurrency calls in flight across the fleet. The cap in force
    # adapts AIMD-style: a 45033 halves it for every process, and each AIMD_STEP_S without
    # one adds one back, up to max_concurrency. Shared state: [cap, last change].

    def cap(self, api: str) -> int:
        """The concurrency cap in force for `api` (0 = none)."""
        limit = self.limits.get(api)
        configured = limit.max_concurrency if limit else 0
        now = self.clock()

        def step(st):
            cap, changed = st
            if cap <= 0:
                return st, configured
            if now - changed >= AIMD_STEP_S and (configured == 0 or cap < configured):
                grown = cap + 1
                if configured == 0 and grown >= AIMD_START:
                    return [0.0, now], 0  # recovered fully: no cap again
                return [grown, now], int(grown)
            return st, int(cap)

        return int(self.backend.update(f"{api}#aimd", 1, step))

    def congested(self, api: str) -> int:
        """WeCom answered 45033: halve the cap for the whole fleet. Returns the new cap."""
        limit = self.limits.get(api)
        configured = limit.max_concurrency if limit else 0
        now = self.clock()

        def step(st):
            cap, changed = st
            base = cap if cap > 0 else (configured or AIMD_START)
            if cap > 0 and now - changed < AIMD_HOLD_S:
                return st, int(cap)  # one burst of 45033 from many callers halves once
            new = max(1.0, float(int(base) // 2))
            return [new, now], int(new)

        return int(self.backend.update(f"{api}#aimd", 1, step))

    @contextmanager
    def hold(self, api: str, should_stop: Callable[[], bool] = lambda: False):
        """Hold one of the API's concurrency slots for the duration of a call."""
        cap = self.cap(api)
        if cap <= 0:
            yield
            return
        fd = None
        while fd is None:
            for i in range(cap):
                fd = self.backend.try_slot(api, i)
                if fd is not None:
                    break
            else:
                if should_stop():
                    raise SlotWaitStopped(api)
                self.sleep(SLOT_POLL_S)
                cap = self.cap(api)
        try:
            yield
        finally:
            self.backend.free_slot(fd)


class SlotWaitStopped(Exception):
    """Shutdown while waiting for a concurrency slot."""


AIMD_START = 16  # the cap a 45033 halves when none is configured
AIMD_STEP_S = 5.0  # additive increase: one more slot per this many seconds
AIMD_HOLD_S = 1.0  # 45033s within this of a decrease do not halve again
SLOT_POLL_S = 0.02
