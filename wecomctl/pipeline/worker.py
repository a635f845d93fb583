"""One worker process: K threads that lease, call and record, sharing one HTTP client.

Threads (not asyncio) because each call is blocking I/O behind a shared rate limiter and
the store is synchronous SQLite; K threads keep K calls in flight to hide API latency.
Signals only set a flag: on the first SIGINT/SIGTERM threads stop leasing, finish the call
in hand, record it and exit.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path

import httpx

from wecomctl import logs
from wecomctl.config import APIS, Settings
from wecomctl.errors import WecomctlError
from wecomctl.pipeline.handlers import Context, FatalStop, process
from wecomctl.pipeline.patience import Patient
from wecomctl.pipeline.retry import Backoff
from wecomctl.pipeline.writeback import WritebackClient
from wecomctl.ratelimit import is_redis_url, make_backend
from wecomctl.ratelimit.limiter import RateLimiter
from wecomctl.store import open_store as store_factory
from wecomctl.store.base import STAGES
from wecomctl.wecom import errcodes
from wecomctl.wecom.client import GatewayClient, HttpApi, WecomClient
from wecomctl.wecom.providers import GatewayAdd, GatewayWelcome, MsgTemplateWelcome, WelcomeCodeWelcome
from wecomctl.wecom.token import make_token_cache

log = logging.getLogger("wecomctl.worker")

IDLE_SLEEP_S = 0.2
MAINTAIN_EVERY_S = 0.5
EXIT_FATAL = 3
EXIT_CRASHED = 70  # a bug in a worker (EX_SOFTWARE); the parent reports it


def open_store(settings: Settings, create: bool = True):
    """The embedded store in the data dir, or the Redis store when run.store is a URL."""
    return store_factory(settings.run.store or settings.data_dir, max_attempts=settings.retry.max_attempts,
                         max_deliveries=settings.run.max_deliveries, create=create,
                         writeback=bool(settings.writeback.url))


def _shared_redis(settings: Settings) -> str | None:
    """The Redis URL the limiter and the token share, when the store is on Redis (its
    ?namespace= belongs to the store: limits are per corp, whatever the namespace)."""
    if not is_redis_url(settings.run.store):
        return None
    from wecomctl.store import _namespace

    return _namespace(settings.run.store)[0]


def make_limiter(settings: Settings, clock=time.time, stop: threading.Event | None = None) -> RateLimiter:
    """The machine-wide limiter for this config's corp and gateway."""
    shared = Path(settings.run.shared_path())
    wecom_scope = _scope(settings.wecom.base_url, settings.wecom.corp_id)
    gateway_scope = _scope(settings.gateway.base_url)
    scopes = {api: gateway_scope if api in GATEWAY_APIS else wecom_scope for api in APIS}
    scopes["writeback"] = _scope(settings.writeback.url or "writeback")
    backend = make_backend(_shared_redis(settings), str(shared))
    if _shared_redis(settings):
        backend = Patient(backend, stop, "the shared rate limit (Redis)")
    return RateLimiter(backend, settings.limits, clock=clock, scopes=scopes)


def build_context(settings: Settings, store, stop: threading.Event, clock=time.time) -> Context:
    shared = Path(settings.run.shared_path())
    # The token is cached per secret too: a changed (or mistyped) secret fetches its own
    # token, so it is checked at once instead of when the old token expires.
    token_scope = _scope(settings.wecom.base_url, settings.wecom.corp_id, settings.corp_secret().get())
    limiter = make_limiter(settings, clock, stop)
    timeout = max(settings.wecom.timeout_s, settings.gateway.timeout_s)
    pool = settings.run.concurrency + 2
    http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool))
    api = HttpApi(http, limiter, should_stop=stop.is_set)
    gateway = GatewayClient(settings.gateway.base_url, settings.gateway_key(), api)
    welcome: dict = {"gateway": GatewayWelcome(gateway)}
    providers = {settings.welcome_for(c).provider for c in (store.campaigns() or [""])} | {settings.welcome.provider}
    if providers & {"msg_template", "welcome_code"}:
        client = WecomClient(
            settings.wecom.base_url, settings.wecom.corp_id, settings.corp_secret(), api,
            lambda fetch: Patient(make_token_cache(_shared_redis(settings), str(shared), settings.wecom.corp_id,
                                                   token_scope, settings.wecom.token_refresh_margin_s, fetch, clock=clock),
                                  stop, "the shared access token (Redis)"),
        )
        welcome["msg_template"] = MsgTemplateWelcome(client)
        welcome["welcome_code"] = WelcomeCodeWelcome(client)
    writeback = None
    if settings.writeback.url:
        writeback = WritebackClient(settings.writeback.url, settings.writeback_token(), api, store.store_id())
    return Context(store=store, settings=settings, add=GatewayAdd(gateway), welcome=welcome,
                   limiter=limiter, backoff=Backoff(settings.retry), clock=clock, lease_s=settings.run.lease_s,
                   writeback=writeback)


GATEWAY_APIS = ("add_by_phone", "send_text")


def _scope(*parts: str) -> str:
    """A file-name-safe id of an account (URL and corp), without revealing anything."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def drained(store) -> bool:
    for camp in store.counts().values():
        for row in camp["stages"].values():
            if row["ready"] or row["delayed"] or row["leased"]:
                return False
    return True


class Worker:
    def __init__(self, ctx: Context, until_empty: bool, stop: threading.Event, parent: int | None = None,
                 tally=None):
        self.ctx = ctx
        self.tally = tally  # multiprocessing Array: added, welcomed, dead by this run
        self.until_empty = until_empty
        self.stop = stop
        self.parent = parent  # stop when this process is gone (the run was killed)
        self.fatal: FatalStop | None = None
        self.crashed = False
        self._last_maintain = 0.0
        self._mlock = threading.Lock()
        self._inflight: set = set()  # leased items being worked on, for lease renewal
        self._ilock = threading.Lock()

    def _tally(self, stage: str, outcome: str) -> None:
        """Count this run's own outcomes for the parent's summary (shared memory)."""
        if self.tally is None:
            return
        index = {("add", "done"): 0, ("welcome", "done"): 1}.get((stage, outcome))
        if outcome in ("dead", "ambiguous"):
            index = 2
        if index is not None:
            with self.tally.get_lock():
                self.tally[index] += 1

    def _keep_leases(self) -> None:
        """Renew the leases of items in hand every third of the lease, so a slow call or a
        long wait for a rate slot never lets another worker take the same item."""
        every = max(0.5, self.ctx.lease_s / 3)
        while not self._done.wait(every):
            with self._ilock:
                items = list(self._inflight)
            for item in items:
                try:
                    self.ctx.store.renew(item, self.ctx.lease_s, self.ctx.clock())
                except WecomctlError as exc:
                    log.warning("could not renew a lease: %s", exc)
            if self.parent is not None and os.getppid() != self.parent:
                log.error("the run that started this worker is gone; stopping")
                self.stop.set()

    def _maintain(self, now: float) -> None:
        with self._mlock:
            if now - self._last_maintain < MAINTAIN_EVERY_S:
                return
            self._last_maintain = now
        self.ctx.store.maintain(now)

    def _lease(self):
        now = self.ctx.clock()
        self._maintain(now)
        # Welcomes first: they follow an add and may hold a 20 s welcome_code.
        for stage in reversed(STAGES):
            item = self.ctx.store.lease(stage, self.ctx.lease_s, now)
            for _ in range(self.ctx.store.take_poisoned()):  # buried on the way: this run's dead letters
                self._tally(stage, "dead")
            if item is not None:
                return item
        return None

    def loop(self) -> None:
        store = self.ctx.store
        while not self.stop.is_set():
            if store.get_flag("fatal"):
                self.stop.set()
                break
            item = self._lease()
            if item is None:
                if self.until_empty and drained(store):
                    break
                wake = store.next_wakeup()
                pause = IDLE_SLEEP_S if wake is None else min(IDLE_SLEEP_S, max(0.01, wake - self.ctx.clock()))
                time.sleep(pause)
                continue
            with self._ilock:
                self._inflight.add(item)
            try:
                outcome = process(self.ctx, item)
                self._tally(item.stage, outcome)
            except FatalStop as exc:
                self.fatal = exc
                todo = errcodes.lookup(exc.error.errcode).note if exc.error.errcode is not None else ""
                store.set_flag("fatal", {"api": exc.error.api, "errcode": exc.error.errcode,
                                         "error": str(exc.error), "todo": todo, "at": self.ctx.clock()})
                self.stop.set()
            finally:
                with self._ilock:
                    self._inflight.discard(item)

    def run(self, threads: int) -> int:
        self._done = threading.Event()
        keeper = threading.Thread(target=self._keep_leases, name="leases", daemon=True)
        keeper.start()
        pool = [threading.Thread(target=self._guard, name=f"w{i}", daemon=True) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        self._done.set()
        keeper.join()
        if self.fatal or self.ctx.store.get_flag("fatal"):
            return EXIT_FATAL
        return EXIT_CRASHED if self.crashed else 0

    def _guard(self) -> None:
        try:
            self.loop()
        except WecomctlError as exc:
            log.error("%s", exc)
            self.stop.set()
        except Exception:  # a bug: stop this process; its leases go back and others take over
            log.exception("worker thread crashed")
            self.crashed = True
            self.stop.set()


def worker_main(settings: Settings, until_empty: bool, log_spec: dict | None = None, parent: int | None = None,
                tally=None) -> None:
    """Entry point of a worker process (spawned by the pool)."""
    logs.setup(**(log_spec or {}))
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    random.seed()
    try:
        store = Patient(open_store(settings), stop, "the store")
        ctx = build_context(settings, store, stop)
    except WecomctlError as exc:
        log.error("%s", exc)
        raise SystemExit(2)
    code = Worker(ctx, until_empty, stop, parent, tally).run(settings.run.concurrency)
    store.close()
    raise SystemExit(code)
