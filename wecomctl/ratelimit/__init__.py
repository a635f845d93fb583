"""The shared rate limiter. `make_backend` picks where its state lives: a directory shared
by the processes of one machine, or Redis, shared by a fleet of machines."""

from __future__ import annotations

import os

from wecomctl.errors import StoreError

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(location: str | None) -> bool:
    return bool(location) and location.startswith(REDIS_SCHEMES)


def make_backend(location: str | None, shared_dir: str, prefix: str = "wecomctl"):
    """The limiter backend for `location`: Redis for a redis://, rediss:// or unix:// URL
    (keys under `prefix`), else the file backend in `shared_dir`/limits.

    Raises StoreError (SharedStateError for Redis) with what to do; never a password.
    """
    if is_redis_url(location):
        from wecomctl.ratelimit.redis_backend import RedisLimiterBackend

        return RedisLimiterBackend.from_url(location, prefix=prefix)
    from wecomctl.ratelimit.limiter import FileLimiterBackend

    try:
        return FileLimiterBackend(os.path.join(shared_dir, "limits"))
    except OSError as exc:
        raise StoreError(f"cannot use the shared dir {shared_dir}: {exc.strerror or exc} (set run.shared_dir)") from None
