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
from wecomctl.faults import crash_point
from wecomctl.pipeline.retry import Backoff
from wecomctl.pipeline.template import InvalidMessage, render, render_attachments
from wecomctl.store.base import Failure, Leased
from wecomctl.wecom.client import LeaseLost

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
    writeback: Any = None  # WritebackClient when writeback.url is set


AMBIGUOUS = ("ambiguous: the call may have happened (a worker stopped during it, or its answer was lost) "
             "and WeCom cannot be asked; check whether the customer got it, then "
             "`wecomctl retry-dlq --kind ambiguous` to send anyway")


def process(ctx: Context, item: Leased) -> str:
    """Work one item to one recorded outcome; returns that outcome's name."""
    lead = item.lead
    now = ctx.clock()
    if item.stage == "writeback":
        return _write_back(ctx, item)
    try:
        # A customer we could not greet must not be added: check the welcome text first.
        welcome = ctx.settings.welcome_for(lead["campaign"])
        text = render(welcome.text, lead)
        attachments = render_attachments(welcome.attachments, lead)
    except InvalidMessage as exc:
        ctx.store.bury(item, Failure(None, str(exc), "invalid"), now, called=False)
        return "dead"
    if item.stage == "add":
        provider = ctx.add
    else:
        if ctx.store.welcome_ledger(lead["campaign"], lead["external_userid"]):
            # Already greeted in this campaign (a replay, or a second lead for the same person).
            ctx.store.complete(item, now, updates={"welcome_status": "already_sent"}, state="skipped", called=False)
            return "skipped"
        provider = ctx.welcome[welcome.provider]
    paused = ctx.limiter.paused_until(provider.api)
    if paused > now + 1.0:
        # WeCom blocked this API for the whole fleet (45009): give the item back until the
        # block ends instead of holding its lease through it. No attempt is used.
        ctx.store.retry(item, paused, Failure(45009, "API paused after a frequency-limit block", "throttle"),
                        now, count_attempt=False, called=False)
        return "paused"
    if item.intent and not provider.idempotent:
        # An earlier delivery was about to make this call and never recorded an outcome.
        settled = _settle(ctx, item, provider, text, item.intent)
        if settled:
            return settled

    def on_send() -> bool:
        # Intent before side effect, recorded at the last moment before the request leaves.
        marked = ctx.store.mark_intent(item, ctx.clock())
        crash_point(f"{item.stage}.after_intent", ctx.settings.data_dir)
        return marked

    try:
        if item.stage == "add":
            updates = provider.add(lead, ctx.clock(), on_send=on_send)
            crash_point("add.after_call", ctx.settings.data_dir)
            ctx.store.complete(item, ctx.clock(), updates=updates, enqueue_next=True)
        else:
            status = provider.send(lead, text, ctx.clock(), on_send=on_send, attachments=attachments)
            crash_point("welcome.after_call", ctx.settings.data_dir)
            ctx.store.complete(item, ctx.clock(), updates={"welcome_status": status})
        log.debug("%s lead %s (%s): done", item.stage, item.id, lead.get("phone"), extra=_about(item))
        return "done"
    except LeaseLost:
        return "lost"  # the lease expired before the call; whoever has the item now does it
    except ApiError as exc:
        if exc.kind == "network" and getattr(exc, "maybe_sent", False) and not provider.idempotent:
            # The answer was lost: ask whether it happened before trying again.
            settled = _settle(ctx, item, provider, text, item.intent or now, exc.errmsg)
            if settled:
                return settled
        return _failed(ctx, item, exc)


def _write_back(ctx: Context, item: Leased) -> str:
    if ctx.writeback is None:
        ctx.store.bury(item, Failure(None, "write-back is not configured any more (writeback.url is empty); "
                                           "set it, then `wecomctl retry-dlq --stage writeback`", "config"),
                       ctx.clock(), called=False)
        return "dead"
    try:
        ctx.writeback.deliver(item.lead, item.lead["writeback"].get("version") or 1, ctx.clock())
    except ApiError as exc:
        return _failed(ctx, item, exc)
    ctx.store.complete(item, ctx.clock())
    log.debug("writeback lead %s: delivered", item.id, extra=_about(item))
    return "done"


def _settle(ctx: Context, item: Leased, provider, text: str, since: float, why: str = "") -> str | None:
    """Ask the provider whether an interrupted call happened. Returns the outcome recorded,
    or None when it did not happen and the call should be made (again)."""
    resolve = getattr(provider, "resolve", None)
    try:
        happened = resolve(item.lead, text, since, ctx.clock()) if resolve else None
    except ApiError as exc:
        happened, why = None, f"{why} lookup failed: {exc}".strip()
    if happened is None:
        ctx.store.bury(item, Failure(None, f"{AMBIGUOUS}{f' [{why}]' if why else ''}", "ambiguous"), ctx.clock(),
                       called=False)
        return "ambiguous"
    if happened:
        ctx.store.complete(item, ctx.clock(), updates={f"{item.stage}_status": "already_sent"}, called=False)
        return "done"
    return None


def _about(item: Leased, errcode=None, api=None) -> dict:
    """Log fields of the item a line is about (the JSON log format shows them)."""
    return {"campaign": item.lead.get("campaign"), "stage": item.stage, "lead": item.id, "errcode": errcode,
            "api": api}


def _failed(ctx: Context, item: Leased, exc: ApiError) -> str:
    now = ctx.clock()
    # The errmsg as WeCom wrote it (its hint helps WeCom support); the errcode's meaning
    # comes from the table when it is shown.
    failure = Failure(exc.errcode, exc.errmsg, exc.kind)
    kind = exc.kind
    log.info("%s lead %s (%s): %s", item.stage, item.id, item.lead.get("phone"), exc,
             extra=_about(item, exc.errcode, exc.api))
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
            ctx.limiter.congested(exc.api)  # 45033: fewer calls in flight, fleet-wide
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
