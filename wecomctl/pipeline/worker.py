"""One worker process: K threads that lease, call and record, sharing one HTTP client.

Threads (not asyncio) because each call is blocking I/O behind a shared rate limiter and
the store is synchronous SQLite; K threads keep K calls in flight to hide API latency.
Signals only set a flag: on the first SIGINT/SIGTERM threads stop leasing, finish the call
in hand, record it and exit.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from pathlib import Path

import httpx

from wecomctl.config import Settings
from wecomctl.errors import WecomctlError
from wecomctl.pipeline.handlers import Context, FatalStop, process
from wecomctl.pipeline.retry import Backoff
from wecomctl.ratelimit.limiter import FileLimiterBackend, RateLimiter
from wecomctl.store.base import STAGES
from wecomctl.store.disk import DiskStore
from wecomctl.wecom.client import GatewayClient, HttpApi, WecomClient
from wecomctl.wecom.providers import GatewayAdd, GatewayWelcome, MsgTemplateWelcome, WelcomeCodeWelcome
from wecomctl.wecom.token import TokenCache

log = logging.getLogger("wecomctl.worker")

IDLE_SLEEP_S = 0.2
MAINTAIN_EVERY_S = 0.5
EXIT_FATAL = 3


def open_store(settings: Settings, create: bool = True) -> DiskStore:
    return DiskStore(settings.data_dir, max_attempts=settings.retry.max_attempts,
                     max_deliveries=settings.run.max_deliveries, create=create)


def build_context(settings: Settings, store, stop: threading.Event, clock=time.time) -> Context:
    data = Path(settings.data_dir)
    limiter = RateLimiter(FileLimiterBackend(str(data / "limits")), settings.limits, clock=clock)
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
            lambda fetch: TokenCache(str(data / "tokens"), settings.wecom.corp_id, "customer-contact",
                                     settings.wecom.token_refresh_margin_s, fetch, clock=clock),
        )
        welcome["msg_template"] = MsgTemplateWelcome(client)
        welcome["welcome_code"] = WelcomeCodeWelcome(client)
    return Context(store=store, settings=settings, add=GatewayAdd(gateway), welcome=welcome,
                   limiter=limiter, backoff=Backoff(settings.retry), clock=clock, lease_s=settings.run.lease_s)


def drained(store) -> bool:
    for camp in store.counts().values():
        for row in camp["stages"].values():
            if row["ready"] or row["delayed"] or row["leased"]:
                return False
    return True


class Worker:
    def __init__(self, ctx: Context, until_empty: bool, stop: threading.Event):
        self.ctx = ctx
        self.until_empty = until_empty
        self.stop = stop
        self.fatal: FatalStop | None = None
        self._last_maintain = 0.0
        self._mlock = threading.Lock()

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
            try:
                process(self.ctx, item)
            except FatalStop as exc:
                self.fatal = exc
                store.set_flag("fatal", {"api": exc.error.api, "errcode": exc.error.errcode,
                                         "error": str(exc.error), "at": self.ctx.clock()})
                self.stop.set()

    def run(self, threads: int) -> int:
        pool = [threading.Thread(target=self._guard, name=f"w{i}", daemon=True) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return EXIT_FATAL if self.fatal or self.ctx.store.get_flag("fatal") else 0

    def _guard(self) -> None:
        try:
            self.loop()
        except WecomctlError as exc:
            log.error("%s", exc)
            self.stop.set()
        except Exception:  # a bug: stop this process; leases expire and others take over
            log.exception("worker thread crashed")
            self.stop.set()


def worker_main(settings: Settings, until_empty: bool, log_level: str = "WARNING") -> None:
    """Entry point of a worker process (spawned by the pool)."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs URLs, which hold tokens
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    random.seed()
    try:
        store = open_store(settings)
        ctx = build_context(settings, store, stop)
    except WecomctlError as exc:
        log.error("%s", exc)
        raise SystemExit(2)
    code = Worker(ctx, until_empty, stop).run(settings.run.concurrency)
    store.close()
    raise SystemExit(code)
