"""What happens to one leased item: call the provider, then record exactly one outcome.

Outcome by errcode class (wecomctl/data/errcodes.tsv):
  ok / done   -> done (41051 "already delivered" counts as done, status already_sent)
  retry, network, token (after the client's one repeat) -> delayed with backoff, uses an attempt
  throttle    -> 45009 pauses the API for the whole fleet; delayed without using an attempt
  window      -> 41096: retried only while the 20 s welcome window is open
  fatal       -> the item goes back untouched, the run stops (exit 3)
  dead / unknown -> DLQ with errcode and errmsg
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from wecomctl.errors import ApiError
from wecomctl.pipeline.retry import Backoff
from wecomctl.pipeline.template import InvalidMessage, render
from wecomctl.store.base import Failure, Leased

log = logging.getLogger("wecomctl.pipeline")

THROTTLE_RETRY_S = 1.0  # 45033: the call was refused, try again shortly


class FatalStop(Exception):
    """A fatal errcode: every worker stops, items stay queued."""

    def __init__(self, error: ApiError):
        self.error = error
        super().__init__(str(error))


@dataclass
class Context:
    store: Any
    settings: Any
    add: Any  # GatewayAdd
    welcome: dict[str, Any]  # provider name -> provider
    limiter: Any
    backoff: Backoff
    clock: Callable[[], float] = time.time
    lease_s: float = 120.0
    stats: dict[str, int] = field(default_factory=dict)


def process(ctx: Context, item: Leased) -> str:
    """Work one item to one recorded outcome; returns that outcome's name."""
    lead = item.lead
    try:
        if item.stage == "add":
            # A customer we could not greet must not be added: check the welcome first.
            render(ctx.settings.welcome_for(lead["campaign"]).text, lead)
            updates = ctx.add.add(lead, ctx.clock())
            ctx.store.complete(item, ctx.clock(), updates=updates, enqueue_next=True)
            return "done"
        return _welcome(ctx, item)
    except InvalidMessage as exc:
        ctx.store.bury(item, Failure(None, str(exc), "invalid"), ctx.clock(), called=False)
        return "dead"
    except ApiError as exc:
        return _failed(ctx, item, exc)


def _welcome(ctx: Context, item: Leased) -> str:
    lead = item.lead
    now = ctx.clock()
    if ctx.store.welcome_ledger(lead["campaign"], lead["external_userid"]):
        # Already greeted in this campaign (a replay, or a second lead for the same person).
        ctx.store.complete(item, now, updates={"welcome_status": "already_sent"}, state="skipped", called=False)
        return "skipped"
    welcome = ctx.settings.welcome_for(lead["campaign"])
    text = render(welcome.text, lead)
    provider = ctx.welcome[welcome.provider]
    status = provider.send(lead, text, now)
    ctx.store.complete(item, ctx.clock(), updates={"welcome_status": status})
    return "done"


def _failed(ctx: Context, item: Leased, exc: ApiError) -> str:
    now = ctx.clock()
    # The errmsg as WeCom wrote it (its hint helps WeCom support); the errcode's meaning
    # comes from the table when it is shown.
    failure = Failure(exc.errcode, exc.errmsg, exc.kind)
    kind = exc.kind
    log.info("%s lead %s: %s", item.stage, item.id, exc,
             extra={"stage": item.stage, "lead": item.id, "errcode": exc.errcode})
    if kind == "done":
        ctx.store.complete(item, now, updates={f"{item.stage}_status": "already_sent"})
        return "done"
    if kind == "fatal":
        ctx.store.release(item, now)
        raise FatalStop(exc)
    if kind == "throttle":
        if exc.errcode == 45009:
            limit = ctx.settings.limits.get(exc.api)
            until = now + (limit.block_s if limit else 60.0)
            ctx.limiter.pause(exc.api, until)
            due = until
        else:
            due = now + THROTTLE_RETRY_S
        ctx.store.retry(item, due, failure, now, count_attempt=False)
        return "throttled"
    if kind == "window":
        code_at = item.lead.get("welcome_code_at") or 0
        if now - code_at < 20.0:
            ctx.store.retry(item, now + 1.0, failure, now, count_attempt=True)
            return "retry"
        ctx.store.bury(item, failure, now)
        return "dead"
    if kind in ("retry", "network", "token"):
        due = now + ctx.backoff.delay(item.attempts + 1)
        return "dead" if ctx.store.retry(item, due, failure, now) == "dead" else "retry"
    ctx.store.bury(item, failure, now)
    return "dead"
