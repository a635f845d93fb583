"""The limiter's shared state on Redis, for a fleet of machines.

Each operation of the limiter is ONE Lua script (EVALSHA via redis-py's register_script),
so it is atomic across every process on every machine. The scripts are line-by-line
translations of the pure `*_step` functions in `limiter.py`; the tests run both on the
same inputs and require the same answers.

Keys (all under `prefix`, default "wecomctl"):
  <prefix>:limit:<scope>.<api>        hash: p = paused until, t1..tn = the windows' TATs,
                                      cap / chg = the AIMD concurrency cap and its last change
  <prefix>:limit:<scope>.<api>:slots  sorted set: concurrency-slot holders, scored by lease expiry
Each script touches one key, so the layout also works on Redis Cluster.

Clock. The window guarantee is about real time, and across machines clock skew would
shift one host's slots against another's. Rather than require NTP-perfect hosts, every
script takes the caller's `now` and, in production (`server_clock=True`), measures the
caller's offset from the Redis server's own clock (`TIME`) inside the script: inputs
(now, pause-until) are moved into the server's timeline, the decision is made there, and
the answer (a slot time, a pause end) is moved back to the caller's timeline. All
decisions are thus made on ONE clock, and each caller sleeps until its slot by its own
clock, so host skew cancels out; what is left is the one-way latency of the reply (well
under a millisecond on a LAN), which `guard_ms` absorbs. Hosts should still run NTP (logs,
token life), and so should the Redis servers, since a failover to a replica with a skewed
clock shifts the stored times. Tests pass `server_clock=False`: the scripts then use the
injected (fake) clock verbatim and are deterministic.

Concurrency slots are a semaphore that survives a killed holder: a sorted set of random
holder tokens scored by lease expiry; acquiring first drops expired holders. A lease lasts
`slot_ttl_s` (60 s by default) and is not renewed: WeCom calls are bounded by the HTTP
timeout (well under 30 s), so a lease only lapses if its holder died or hung, and a killed
holder's slot comes back after at most `slot_ttl_s`.

redis-py errors become `SharedStateError` (a `StoreError`) saying what to do; the URL in
messages never carries a password.
"""

from __future__ import annotations

import functools
import os
import uuid
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlsplit

from wecomctl.errors import SharedStateError, SharedStateUnavailable
from wecomctl.store import redact_url, unknown_url_parameters

SLOT_TTL_S = 60.0
# State keys outlive their last use by this long (then they read as "never used").
KEEP_S = 7 * 86400.0

# Common head of every script: ARGV[1] = the caller's now, ARGV[2] = "1" to decide on the
# server's clock. `off` moves caller times into the decision timeline (now + off) and
# answers back (t - off); with the caller's clock it is exactly 0.
_PRELUDE = """
local function f(x) return string.format('%.17g', x) end
local function num(v) if v then return tonumber(v) end return 0 end
local now = tonumber(ARGV[1])
local off = 0
if ARGV[2] == '1' then
  local t = redis.call('TIME')
  off = tonumber(t[1]) + tonumber(t[2]) / 1000000 - now
  now = now + off
end
local function keep(key, latest)
  local ms = math.ceil((math.max(latest - now, 0) + KEEP_S) * 1000)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
""".replace("KEEP_S", repr(KEEP_S))

# limiter.reserve_step. ARGV[3] = max_ahead, ARGV[4..] = the windows' intervals.
_RESERVE = _PRELUDE + """
local max_ahead = tonumber(ARGV[3])
local n = #ARGV - 3
local fields = {'p'}
for i = 1, n do fields[i + 1] = 't' .. i end
local st = redis.call('HMGET', KEYS[1], unpack(fields))
local slot = now
for i = 1, n + 1 do
  local v = num(st[i])
  if v > slot then slot = v end
end
if slot - now > max_ahead or n == 0 then return f(slot - off) end
local args = {}
local latest = slot
for i = 1, n do
  local tat = slot + tonumber(ARGV[3 + i])
  args[2 * i - 1] = 't' .. i
  args[2 * i] = f(tat)
  if tat > latest then latest = tat end
end
redis.call('HSET', KEYS[1], unpack(args))
keep(KEYS[1], latest)
return f(slot - off)
"""

# limiter.pause_step. ARGV[3] = until (caller's clock).
_PAUSE = _PRELUDE + """
local until_ = tonumber(ARGV[3]) + off
if until_ > num(redis.call('HGET', KEYS[1], 'p')) then
  redis.call('HSET', KEYS[1], 'p', f(until_))
  keep(KEYS[1], until_)
end
return 0
"""

_PAUSED_UNTIL = _PRELUDE + """
local p = redis.call('HGET', KEYS[1], 'p')
if not p then return '0' end
return f(tonumber(p) - off)
"""

# limiter.aimd_cap_step. ARGV[3] = configured cap, ARGV[4] = step_s, ARGV[5] = start.
_AIMD_CAP = _PRELUDE + """
local configured, step_s, start = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local st = redis.call('HMGET', KEYS[1], 'cap', 'chg')
local cap, changed = num(st[1]), num(st[2])
if cap <= 0 then return configured end
if now - changed >= step_s and (configured == 0 or cap < configured) then
  local grown = cap + 1
  if configured == 0 and grown >= start then
    redis.call('HSET', KEYS[1], 'cap', '0', 'chg', f(now))
    keep(KEYS[1], now)
    return 0
  end
  redis.call('HSET', KEYS[1], 'cap', f(grown), 'chg', f(now))
  keep(KEYS[1], now)
  return math.floor(grown)
end
return math.floor(cap)
"""

# limiter.aimd_congested_step. ARGV[3] = configured cap, ARGV[4] = hold_s, ARGV[5] = start.
_AIMD_CONGESTED = _PRELUDE + """
local configured, hold_s, start = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local st = redis.call('HMGET', KEYS[1], 'cap', 'chg')
local cap, changed = num(st[1]), num(st[2])
local base = cap
if cap <= 0 then
  if configured ~= 0 then base = configured else base = start end
end
if cap > 0 and now - changed < hold_s then return math.floor(cap) end
local new = math.max(1, math.floor(math.floor(base) / 2))
redis.call('HSET', KEYS[1], 'cap', f(new), 'chg', f(now))
keep(KEYS[1], now)
return new
"""

# The semaphore. ARGV[3] = cap, ARGV[4] = lease in seconds, ARGV[5] = the holder's token.
_ACQUIRE_SLOT = _PRELUDE + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', f(now))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[1], f(now + ttl), ARGV[5])
-- The set itself goes once every lease in it has lapsed (doubled: a test's fake clock
-- may run slower than the server's).
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 2000) + 1000)
return 1
"""


def _password(url: str) -> str | None:
    """The URL's password (user part or ?password=), to scrub from error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    given = [v for k, v in parse_qsl(parts.query) if k.lower() == "password"]
    return parts.password or (given[-1] if given else None)


@contextmanager
def translate_errors(where: str, secret: str | None = None, doing: str = "use"):
    """redis-py errors -> SharedStateError, with what to do and without the password."""
    import redis

    try:
        yield
    except redis.exceptions.RedisError as exc:
        detail = str(exc) or type(exc).__name__
        if secret:
            detail = detail.replace(secret, "***")
        if isinstance(exc, redis.exceptions.AuthenticationError):
            hint = "check the user name and password in the Redis URL"
        elif isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            raise SharedStateUnavailable(f"cannot {doing} the shared Redis at {where}: {detail} "
                                         "(is Redis running and reachable from this machine? check the Redis URL)") from None
        elif isinstance(exc, redis.exceptions.ResponseError) and "NOSCRIPT" not in detail:
            hint = "the server refused a command; wecomctl needs Redis 7 with Lua scripting enabled"
        else:
            hint = "check the Redis server and the Redis URL"
        raise SharedStateError(f"cannot {doing} the shared Redis at {where}: {detail} ({hint})") from None


def _guard(method):
    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with translate_errors(self.where, self._secret):
            return method(self, *args, **kwargs)

    return wrapped


def connect(url: str, **kwargs):
    """A redis-py client for `url` (redis://, rediss://, unix://), with short timeouts and
    a few quick retries of lost connections. Every operation here is safe to repeat: a
    repeated reserve only wastes a slot, a repeated slot acquire lapses with its lease."""
    try:
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry
    except ImportError:
        raise SharedStateError(
            "a redis:// location needs the Redis client: pip install 'wecomctl[redis]'") from None
    options = dict(socket_timeout=5.0, socket_connect_timeout=5.0, decode_responses=True,
                   retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
                   retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
    options.update(kwargs)
    unknown = unknown_url_parameters(url)
    if unknown:
        raise SharedStateError(f"the Redis URL {redact_url(url)} has an unknown parameter {unknown[0]!r} "
                               "(a typo?); redis-py knows ?db=N, ?socket_timeout=S, ?password=...")
    with translate_errors(redact_url(url), _password(url), doing="connect to"):
        try:
            return redis.Redis.from_url(url, **options)
        except ValueError as exc:  # a malformed URL: redis-py names the bad part, not the password
            raise SharedStateError(f"bad Redis URL {redact_url(url)}: {exc}") from None


_clients: dict[str, tuple[int, object]] = {}


def shared_client(url: str):
    """One client (one connection pool) per URL and process, shared by the limiter and the
    token cache. A forked child gets its own."""
    pid = os.getpid()
    got = _clients.get(url)
    if got is None or got[0] != pid:
        got = (pid, connect(url))
        _clients[url] = got
    return got[1]


class RedisLimiterBackend:
    """The limiter backend on Redis. `client` is a redis-py client with decode_responses."""

    def __init__(self, client, prefix: str = "wecomctl", server_clock: bool = True,
                 slot_ttl_s: float = SLOT_TTL_S, where: str = "Redis", secret: str | None = None):
        self.client = client
        self.prefix = prefix
        self.server_clock = "1" if server_clock else "0"
        self.slot_ttl_s = slot_ttl_s
        self.where = where  # for messages: the URL without its password
        self._secret = secret
        self._reserve = client.register_script(_RESERVE)
        self._pause = client.register_script(_PAUSE)
        self._paused_until = client.register_script(_PAUSED_UNTIL)
        self._aimd_cap = client.register_script(_AIMD_CAP)
        self._aimd_congested = client.register_script(_AIMD_CONGESTED)
        self._acquire_slot = client.register_script(_ACQUIRE_SLOT)

    @classmethod
    def from_url(cls, url: str, prefix: str = "wecomctl", **kwargs) -> "RedisLimiterBackend":
        client = shared_client(url)
        with translate_errors(redact_url(url), _password(url), doing="connect to"):
            client.ping()  # fail at start, with a clear message, rather than mid-run
        return cls(client, prefix=prefix, where=redact_url(url), secret=_password(url), **kwargs)

    def _key(self, key: str) -> str:
        return f"{self.prefix}:limit:{key}"

    def _args(self, now: float, *rest) -> list:
        return [repr(float(now)), self.server_clock, *(repr(float(x)) if isinstance(x, float) else x for x in rest)]

    @_guard
    def reserve(self, key: str, intervals: list[float], now: float, max_ahead: float) -> float:
        return float(self._reserve(keys=[self._key(key)],
                                   args=self._args(now, float(max_ahead), *map(float, intervals))))

    @_guard
    def pause(self, key: str, until: float, now: float) -> None:
        self._pause(keys=[self._key(key)], args=self._args(now, float(until)))

    @_guard
    def paused_until(self, key: str, now: float) -> float:
        return float(self._paused_until(keys=[self._key(key)], args=self._args(now)))

    @_guard
    def aimd_cap(self, key: str, configured: int, now: float, step_s: float, start: int) -> int:
        return int(self._aimd_cap(keys=[self._key(key)], args=self._args(now, int(configured), float(step_s), int(start))))

    @_guard
    def aimd_congested(self, key: str, configured: int, now: float, hold_s: float, start: int) -> int:
        return int(self._aimd_congested(keys=[self._key(key)],
                                        args=self._args(now, int(configured), float(hold_s), int(start))))

    @_guard
    def acquire_slot(self, key: str, cap: int, now: float):
        """A handle for release_slot, or None when `cap` holders have live leases."""
        zkey = self._key(key) + ":slots"
        token = f"{os.getpid()}-{uuid.uuid4().hex}"
        if self._acquire_slot(keys=[zkey], args=self._args(now, int(cap), float(self.slot_ttl_s), token)):
            return zkey, token
        return None

    @_guard
    def release_slot(self, handle) -> None:
        zkey, token = handle
        self.client.zrem(zkey, token)

    def close(self) -> None:
        self.client.close()
