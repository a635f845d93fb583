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
