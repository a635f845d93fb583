"""Stores: `DiskStore` (a data dir on this machine) and `RedisStore` (one Redis for several).

`open_store` picks one from a location: a redis://, rediss:// or unix:// URL is a Redis
store, anything else a data dir. The backends are imported only when opened, so the CLI
runs without the redis package until a Redis store is asked for.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis_url(location: str) -> bool:
    return location.lower().startswith(REDIS_SCHEMES)


def redact_url(url: str) -> str:
    """The URL as shown in messages and logs: without its user part (a password, or a
    user name that may be a token: "***@host") and without a ?password= parameter. The
    one place every Redis URL is redacted, for the store and the shared state alike."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "the configured Redis URL"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() == "password" for k, _ in pairs):
            query = urlencode([(k, v) for k, v in pairs if k.lower() != "password"])
    return _join(parts.scheme, netloc, parts.path, query, parts.fragment)


def _join(scheme: str, netloc: str, path: str, query: str, fragment: str) -> str:
    # urlunsplit would write unix:///x.sock as unix:/x.sock
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def _namespace(url: str) -> tuple[str, str | None]:
    """Take a `namespace=` parameter out of a Redis URL (redis-py does not know it)."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    names = [v for k, v in pairs if k == "namespace"]
    if not names:
        return url, None
    rest = urlencode([(k, v) for k, v in pairs if k != "namespace"])
    return _join(parts.scheme, parts.netloc, parts.path, rest, parts.fragment), names[-1]


def unknown_url_parameters(url: str) -> list[str]:
    """Query parameters of a Redis URL that redis-py would pass on to its connection
    class, which fails on the first command with a TypeError. Checked up front so a
    typo (?namespce=) is a clear error. `namespace` is ours and must be taken out first."""
    import inspect

    import redis
    import redis.connection

    parts = urlsplit(url)
    cls = {"rediss": redis.SSLConnection, "unix": redis.UnixDomainSocketConnection}.get(parts.scheme.lower(),
                                                                                         redis.Connection)
    known = set(redis.connection.URL_QUERY_ARGUMENT_PARSERS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            known |= set(inspect.signature(init).parameters)
    return [k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if k not in known]


def open_store(location: str, *, max_attempts: int, max_deliveries: int, create: bool = True,
               writeback: bool = False):
    """A RedisStore for a redis://, rediss:// or unix:// URL (its keys under the URL's
    `?namespace=` or "wecomctl"), else a DiskStore in the data dir `location`."""
    if is_redis_url(location):
        from wecomctl.errors import StoreError

        try:
            from wecomctl.store.redis import RedisStore
        except ImportError as exc:
            if exc.name and exc.name.split(".")[0] == "redis":
                raise StoreError(f"the store {redact_url(location)} is a Redis store, and the redis package "
                                 "is not installed: pip install 'wecomctl[redis]'") from None
            raise
        try:
            url, namespace = _namespace(location)
        except ValueError as exc:
            raise StoreError(f"cannot use the store URL {redact_url(location)}: {exc} "
                             "(expected redis://[user[:password]@]host[:port]/db)") from None
        extra = {"writeback": writeback} if writeback else {}
        return RedisStore(url, namespace=namespace or "wecomctl", max_attempts=max_attempts,
                          max_deliveries=max_deliveries, create=create, **extra)
    from wecomctl.store.disk import DiskStore

    return DiskStore(location, max_attempts=max_attempts, max_deliveries=max_deliveries, create=create,
                     writeback=writeback)
