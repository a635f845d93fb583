"""One access token per (corpid, app), shared by every worker process.

The token lives in a 0600 file in the data dir. Refresh is single flight: whoever finds
it stale takes an exclusive file lock, looks again (another process may have refreshed it
meanwhile) and only then calls gettoken. A token WeCom rejected (40014/42001) is dropped
only if it is still the cached one, so a burst of rejections causes one refresh.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable


class TokenCache:
    def __init__(self, directory: str, corp_id: str, app_key: str, margin_s: float,
                 fetch: Callable[[], tuple[str, float]], clock: Callable[[], float] = time.time):
        # The file name identifies the app without revealing its secret.
        tag = hashlib.sha256(f"{corp_id}:{app_key}".encode()).hexdigest()[:16]
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"token-{tag}.json"
        self.margin = margin_s
        self.fetch = fetch  # returns (token, expires_in seconds)
        self.clock = clock
        self._lock = threading.Lock()
        self._mem: tuple[str, float] | None = None

    def _read(self, fd: int) -> tuple[str, float] | None:
        """(token, refresh_at) from the file, or None."""
        raw = os.pread(fd, 4096, 0)
        try:
            data = json.loads(raw.decode()) if raw else None
            return (data["token"], float(data["refresh_at"])) if data else None
        except (ValueError, KeyError, TypeError):
            return None  # a torn or foreign file: fetch a new token

    def _fresh(self, entry: tuple[str, float] | None) -> bool:
        return entry is not None and self.clock() < entry[1]

    def get(self) -> str:
        if self._fresh(self._mem):
            return self._mem[0]
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                entry = self._read(fd)
                if not self._fresh(entry):
                    token, expires_in = self.fetch()
                    # Refresh `margin` early, but WeCom hands out the SAME token with only
                    # its remaining life when asked inside the validity window; never
                    # refresh sooner than half that life, or we would ask on every call.
                    entry = (token, self.clock() + max(expires_in - self.margin, expires_in / 2))
                    data = json.dumps({"token": token, "refresh_at": entry[1]}).encode()
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, data, 0)
                self._mem = entry
                return entry[0]
            finally:
                os.close(fd)  # closing releases the lock

    def invalidate(self, token: str) -> None:
        with self._lock:
            if self._mem and self._mem[0] == token:
                self._mem = None
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                entry = self._read(fd)
                if entry and entry[0] == token:
                    os.ftruncate(fd, 0)
            finally:
                os.close(fd)


# The lock and the token are deleted only by whoever holds the value given.
_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisTokenCache:
    """TokenCache for a fleet of machines: the token lives in Redis.

    `<prefix>:token:<hash of corp and app>` holds the token and expires (PX, on the
    server's clock) when it is due for refresh, so host clock skew does not matter. The
    key name never contains the secret; the token is in Redis (that is the point) and
    is never logged or put in a message. Refresh is single flight across the fleet: whoever
    finds no token takes `<key>:lock` (SET NX PX `lock_ttl_s`), looks again, and only then
    calls gettoken; the others poll every `poll_s` until the token appears. The lock is
    released only by its owner (compare-and-delete); a holder that dies loses it after
    `lock_ttl_s`, which must exceed a gettoken call (the HTTP timeout). A fetch that outlives
    it only costs a second gettoken, which returns the same token.
    """

    def __init__(self, client, corp_id: str, app_key: str, margin_s: float,
                 fetch: Callable[[], tuple[str, float]], clock: Callable[[], float] = time.time,
                 prefix: str = "wecomctl", lock_ttl_s: float = 30.0, poll_s: float = 0.05,
                 where: str = "Redis", secret: str | None = None):
        tag = hashlib.sha256(f"{corp_id}:{app_key}".encode()).hexdigest()[:16]
        self.client = client
        self.key = f"{prefix}:token:{tag}"
        self.lock_key = f"{self.key}:lock"
        self.margin = margin_s
        self.fetch = fetch  # returns (token, expires_in seconds)
        self.clock = clock  # only for this process's in-memory copy
        self.lock_ttl_s = lock_ttl_s
        self.poll_s = poll_s
        self.where, self._secret = where, secret
        self._lock = threading.Lock()
        self._mem: tuple[str, float] | None = None
        self._cad = client.register_script(_COMPARE_AND_DELETE)

    def _fresh(self, entry: tuple[str, float] | None) -> bool:
        return entry is not None and self.clock() < entry[1]

    def _errors(self):
        from wecomctl.ratelimit.redis_backend import translate_errors

        return translate_errors(self.where, self._secret)

    def _read(self) -> tuple[str, float] | None:
        """(token, refresh_at on this process's clock) from Redis, or None."""
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.key)
        pipe.pttl(self.key)
        token, pttl = pipe.execute()
        if token is None or pttl is None or pttl <= 0:  # -1 (no expiry) is not ours: refresh
            return None
        if isinstance(token, bytes):
            token = token.decode()
        return token, self.clock() + pttl / 1000.0

    def get(self) -> str:
        if self._fresh(self._mem):
            return self._mem[0]
        with self._lock:  # this process's threads wait here, not on Redis
            if self._fresh(self._mem):
                return self._mem[0]
            with self._errors():
                self._mem = self._shared()
            return self._mem[0]

    def _shared(self) -> tuple[str, float]:
        while True:
            entry = self._read()
            if entry is not None:
                return entry
            owner = uuid.uuid4().hex
            if self.client.set(self.lock_key, owner, nx=True, px=max(1, int(self.lock_ttl_s * 1000))):
                try:
                    entry = self._read()  # refreshed between our look and our lock?
                    if entry is not None:
                        return entry
                    token, expires_in = self.fetch()
                    # As TokenCache: `margin` early, but never sooner than half the life.
                    delay = max(expires_in - self.margin, expires_in / 2)
                    self.client.set(self.key, token, px=max(1, int(delay * 1000)))
                    return token, self.clock() + delay
                finally:
                    self._cad(keys=[self.lock_key], args=[owner])
            time.sleep(self.poll_s)  # someone else is fetching; its lock lapses if it died

    def invalidate(self, token: str) -> None:
        """WeCom rejected `token`: drop it, but only if it is still the cached one."""
        with self._lock:
            if self._mem and self._mem[0] == token:
                self._mem = None
            with self._errors():
                self._cad(keys=[self.key], args=[token])


def make_token_cache(location: str | None, shared_dir: str, corp_id: str, app_key: str, margin_s: float,
                     fetch: Callable[[], tuple[str, float]], clock: Callable[[], float] = time.time,
                     prefix: str = "wecomctl"):
    """RedisTokenCache for a redis://, rediss:// or unix:// location, else TokenCache in
    `shared_dir`/tokens. Both have get() and invalidate(token)."""
    from wecomctl.ratelimit import is_redis_url

    if is_redis_url(location):
        from wecomctl.ratelimit.redis_backend import _password, redact_url, shared_client

        return RedisTokenCache(shared_client(location), corp_id, app_key, margin_s, fetch, clock=clock,
                               prefix=prefix, where=redact_url(location), secret=_password(location))
    return TokenCache(os.path.join(shared_dir, "tokens"), corp_id, app_key, margin_s, fetch, clock=clock)
