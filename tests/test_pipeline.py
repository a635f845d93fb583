"""Stage handlers: one outcome per item for every errcode class, no call for bad messages."""

import pytest

from conftest import NoLimit, lead
from wecomctl.config import RetrySettings, Settings
from wecomctl.pipeline.handlers import Context, FatalStop, process
from wecomctl.pipeline.retry import Backoff
from wecomctl.pipeline.template import InvalidMessage, render
from wecomctl.wecom.client import LeaseLost, api_error


class FakeAdd:
    idempotent = True
    api = "add_by_phone"

    def __init__(self, errors=()):
        self.errors = list(errors)
        self.calls = 0

    def _call(self, on_send):
        # as the real client does: the intent is recorded just before the request leaves
        if on_send is not None and not on_send():
            raise LeaseLost("fake")
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)

    def add(self, lead, now, on_send=None):
        self._call(on_send)
        return {"external_userid": "wm" + lead["phone"][-4:], "add_status": "added"}


class FakeWelcome(FakeAdd):
    idempotent = False
    api = "add_msg_template"

    def send(self, lead, text, now, on_send=None, attachments=()):
        self.texts = getattr(self, "texts", []) + [text]
        self.attachments = list(attachments)
        self._call(on_send)
        return "sent"


class LookupWelcome(FakeWelcome):
    """A non-idempotent provider that can tell whether an interrupted call happened."""

    def __init__(self, happened):
        super().__init__()
        self.happened = happened
        self.lookups = 0

    def resolve(self, lead, text, since, now):
        self.lookups += 1
        return self.happened


class FakeLimiter:
    def __init__(self):
        self.paused = {}

    def pause(self, api, until):
        self.paused[api] = until

    def paused_until(self, api):
        return self.paused.get(api, 0.0)

    def congested(self, api):
        self.congestions = getattr(self, "congestions", 0) + 1


def ctx_for(store, clock, add=None, welcome=None, text="您好{name}"):
    s = Settings()
    s.welcome.text = text
    return Context(store=store, settings=s, add=add or FakeAdd(), welcome={"msg_template": welcome or FakeWelcome()},
                   limiter=FakeLimiter(), backoff=Backoff(RetrySettings(base_delay_s=1, max_delay_s=10)), clock=clock)


def state(store, stage):
    return next(store.leads())[stage]


def test_add_then_welcome_personalised(store, clock):
    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock)
    assert process(ctx, store.lease("add", 30, clock())) == "done"
    assert process(ctx, store.lease("welcome", 30, clock())) == "done"
    assert ctx.welcome["msg_template"].texts == ["您好张三"]
    rec = next(store.leads())
    assert rec["add"]["state"] == "done" and rec["welcome"]["state"] == "done" and rec["welcome_status"] == "sent"


def test_busy_is_retried_with_backoff_and_uses_an_attempt(store, clock):
    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock, add=FakeAdd([api_error("add_by_phone", -1, "system busy")]))
    assert process(ctx, store.lease("add", 30, clock())) == "retry"
    st = state(store, "add")
    assert st["state"] == "delayed" and st["attempts"] == 1 and st["errcode"] == -1


def test_45009_pauses_the_api_for_everyone_without_an_attempt(store, clock):
    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock, add=FakeAdd([api_error("add_by_phone", 45009, "freq")]))
    assert process(ctx, store.lease("add", 30, clock())) == "throttled"
    assert ctx.limiter.paused["add_by_phone"] == clock() + ctx.settings.limits["add_by_phone"].block_s
    st = state(store, "add")
    assert st["state"] == "delayed" and st["attempts"] == 0


def test_fatal_stops_and_leaves_the_item_queued(store, clock):
    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock, add=FakeAdd([api_error("gettoken", 40001, "invalid credential")]))
    with pytest.raises(FatalStop):
        process(ctx, store.lease("add", 30, clock()))
    st = state(store, "add")
    assert st["state"] == "ready" and st["attempts"] == 0 and st["deliveries"] == 0


def test_permanent_error_is_dead_lettered_with_errcode(store, clock):
    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock, add=FakeAdd([api_error("add_by_phone", 910001, "mobile not found")]))
    assert process(ctx, store.lease("add", 30, clock())) == "dead"
    st = state(store, "add")
    assert st["state"] == "dead" and st["errcode"] == 910001 and "mobile not found" in st["error"]


def test_41051_already_delivered_counts_as_done(store, clock):
    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock, welcome=FakeWelcome([api_error("send_welcome_msg", 41051, "already")]))
    process(ctx, store.lease("add", 30, clock()))
    assert process(ctx, store.lease("welcome", 30, clock())) == "done"
    rec = next(store.leads())
    assert rec["welcome"]["state"] == "done" and rec["welcome_status"] == "already_sent"


def test_missing_template_variable_stops_the_add_without_any_call(store, clock):
    """A customer we could not greet is not added in the first place."""
    store.put_leads("c", [lead()], clock())
    add, welcome = FakeAdd(), FakeWelcome()
    ctx = ctx_for(store, clock, add=add, welcome=welcome, text="您好{name}，{城市}见")
    assert process(ctx, store.lease("add", 30, clock())) == "dead"
    assert add.calls == 0 and welcome.calls == 0
    st = state(store, "add")
    assert st["kind"] == "invalid" and "城市" in st["error"] and st["attempts"] == 0 and st["calls"] == 0


def test_calls_are_counted_per_stage(store, clock):
    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock, add=FakeAdd([api_error("add_by_phone", -1, "busy")]))
    process(ctx, store.lease("add", 30, clock()))
    clock.t += 100
    store.maintain(clock())
    process(ctx, store.lease("add", 30, clock()))
    assert state(store, "add")["calls"] == 2


def test_ledger_prevents_a_second_welcome_after_replay(store, clock):
    store.put_leads("c", [lead()], clock())
    welcome = FakeWelcome()
    ctx = ctx_for(store, clock, welcome=welcome)
    process(ctx, store.lease("add", 30, clock()))
    process(ctx, store.lease("welcome", 30, clock()))
    # A second lead for the same customer (e.g. re-imported under another number).
    store.put_leads("c", [lead(phone="+8613900130000")], clock())
    ctx.add = type("A", (), {"idempotent": True, "api": "add_by_phone",
                             "add": lambda self, l, now, on_send=None: {"external_userid": "wm8000"}})()
    process(ctx, store.lease("add", 30, clock()))
    assert process(ctx, store.lease("welcome", 30, clock())) == "skipped"
    assert welcome.calls == 1


def test_render_checks_size_and_emptiness():
    base = {"name": "张三", "phone": "+86138", "owner": "o", "campaign": "c", "fields": {"城市": "北京"}}
    assert render("{name}在{城市}", base) == "张三在北京"
    with pytest.raises(InvalidMessage, match="empty"):
        render("{name}", dict(base, name=None))
    with pytest.raises(InvalidMessage, match="UTF-8 bytes"):
        render("字" * 1334, base)  # 4002 bytes
    assert render("字" * 1333, base)  # 3999 bytes


def test_backoff_grows_and_is_capped():
    b = Backoff(RetrySettings(base_delay_s=1, max_delay_s=10))
    for attempt in range(1, 8):
        for _ in range(20):
            d = b.delay(attempt)
            assert 0 <= d <= min(10, 2 ** attempt)


def _die_during_call(store, clock, stage):
    """Lease, record the intent as a worker would, then 'die': the lease expires."""
    item = store.lease(stage, 10, clock())
    assert store.mark_intent(item, clock())
    clock.t += 11
    store.maintain(clock())


def test_welcome_redelivered_after_a_death_mid_call_is_ambiguous_not_resent(store, clock):
    store.put_leads("c", [lead()], clock())
    welcome = FakeWelcome()
    ctx = ctx_for(store, clock, welcome=welcome)
    process(ctx, store.lease("add", 30, clock()))
    _die_during_call(store, clock, "welcome")
    assert process(ctx, store.lease("welcome", 30, clock())) == "ambiguous"
    assert welcome.calls == 0
    st = state(store, "welcome")
    assert st["state"] == "dead" and st["kind"] == "ambiguous" and "retry-dlq" in st["error"]
    # the operator checked and wants it sent: a replay settles the intent
    assert store.requeue_dead("welcome", None, clock(), kind="ambiguous") == 1
    assert process(ctx, store.lease("welcome", 30, clock())) == "done" and welcome.calls == 1


def test_add_redelivered_after_a_death_is_repeated_because_the_gateway_dedupes(store, clock):
    store.put_leads("c", [lead()], clock())
    add = FakeAdd()
    ctx = ctx_for(store, clock, add=add)
    _die_during_call(store, clock, "add")
    assert process(ctx, store.lease("add", 30, clock())) == "done" and add.calls == 1


def test_a_lost_answer_on_a_welcome_is_ambiguous_a_refused_connection_is_retried(store, clock):
    from wecomctl.errors import NetworkError

    store.put_leads("c", [lead(), lead(phone="+8613900139000")], clock())
    welcome = FakeWelcome([NetworkError("send_text", "ReadTimeout", maybe_sent=True),
                           NetworkError("send_text", "ConnectError", maybe_sent=False)])
    ctx = ctx_for(store, clock, welcome=welcome)
    for _ in range(2):
        process(ctx, store.lease("add", 30, clock()))
    assert process(ctx, store.lease("welcome", 30, clock())) == "ambiguous"
    assert process(ctx, store.lease("welcome", 30, clock())) == "retry"


def test_no_call_when_the_lease_was_lost_before_it(store, clock):
    store.put_leads("c", [lead()], clock())
    add = FakeAdd()
    ctx = ctx_for(store, clock, add=add)
    item = store.lease("add", 10, clock())
    clock.t += 11
    store.maintain(clock())
    store.lease("add", 10, clock())  # another worker has it now
    assert process(ctx, item) == "lost" and add.calls == 0


@pytest.mark.parametrize("happened, outcome, calls", [(True, "done", 0), (False, "done", 1)])
def test_an_interrupted_welcome_is_settled_by_a_lookup_when_the_provider_has_one(store, clock, happened, outcome, calls):
    store.put_leads("c", [lead()], clock())
    welcome = LookupWelcome(happened)
    ctx = ctx_for(store, clock, welcome=welcome)
    process(ctx, store.lease("add", 30, clock()))
    _die_during_call(store, clock, "welcome")
    assert process(ctx, store.lease("welcome", 30, clock())) == outcome
    assert welcome.lookups == 1 and welcome.calls == calls
    rec = next(store.leads())
    assert rec["welcome"]["state"] == "done"
    assert rec["welcome_status"] == ("already_sent" if happened else "sent")


def test_intent_is_recorded_after_the_rate_wait_and_before_the_request(store, clock):
    """A worker killed while waiting for its rate slot leaves nothing ambiguous; one killed
    after the request left does."""
    import httpx
    import respx

    from wecomctl.config import Secret
    from wecomctl.wecom.client import GatewayClient, HttpApi
    from wecomctl.wecom.providers import GatewayWelcome

    store.put_leads("c", [lead()], clock())
    ctx = ctx_for(store, clock)
    process(ctx, store.lease("add", 30, clock()))
    item = store.lease("welcome", 30, clock())
    seen = {}

    class Limiter(NoLimit):
        def acquire(self, api, should_stop=None):
            seen["at_acquire"] = store.lead(item.id)["welcome"].get("intent")
            return True

    def answer(request):
        seen["at_request"] = store.lead(item.id)["welcome"].get("intent")
        return httpx.Response(200, json={"errcode": 0, "msgid": "m"})

    with respx.mock:
        respx.post("http://gw.test/gateway/v1/send_text").mock(side_effect=answer)
        ctx.welcome["msg_template"] = GatewayWelcome(GatewayClient("http://gw.test", Secret("k"), HttpApi(httpx.Client(), Limiter())))
        assert process(ctx, item) == "done"
    assert seen["at_acquire"] is None and seen["at_request"] == clock()


def test_a_paused_api_gives_items_back_until_the_block_ends(store, clock):
    store.put_leads("c", [lead()], clock())
    add = FakeAdd()
    ctx = ctx_for(store, clock, add=add)
    ctx.limiter.pause("add_by_phone", clock() + 3600)  # an hour-level block
    assert process(ctx, store.lease("add", 30, clock())) == "paused"
    st = state(store, "add")
    assert add.calls == 0 and st["state"] == "delayed" and st["attempts"] == 0 and st["calls"] == 0
    assert store.next_wakeup() == pytest.approx(clock() + 3600, abs=0.01)


def test_a_renewed_lease_outlives_its_first_expiry(store, clock):
    store.put_leads("c", [lead()], clock())
    item = store.lease("add", 10, clock())
    clock.t += 8
    assert store.renew(item, 10, clock())
    clock.t += 8  # past the first expiry
    assert store.maintain(clock()) == 0
    assert store.mark_intent(item, clock())  # still ours
    clock.t += 3
    assert store.maintain(clock()) == 1  # not renewed again: now it expires
    assert not store.renew(item, 10, clock()) and not store.mark_intent(item, clock())


def test_leases_of_dead_workers_are_reclaimed_at_once(store, clock):
    store.put_leads("c", [lead(), lead(phone="+8613900139000")], clock())
    a = store.lease("add", 120, clock())
    pid = int(a.token.rsplit("-", 2)[-2])  # "{pid}-{n}" on disk, "{host}-{pid}-{n}" in Redis
    assert store.reclaim(clock(), dead_pids={pid + 1}) == 0  # someone else
    assert store.reclaim(clock(), dead_pids={pid}) == 1
    again = store.lease("add", 120, clock())
    assert again.id in (a.id, a.id + 1)


def test_attachments_are_personalised_and_checked_before_any_call(store, clock):
    store.put_leads("c", [lead(城市="北京")], clock())
    welcome = FakeWelcome()
    ctx = ctx_for(store, clock, welcome=welcome)
    ctx.settings.welcome.attachments = [{"msgtype": "link", "link": {"title": "{name}的{城市}专属福利", "url": "https://e.x/?c={campaign}"}}]
    process(ctx, store.lease("add", 30, clock()))
    assert process(ctx, store.lease("welcome", 30, clock())) == "done"
    assert welcome.attachments == [{"msgtype": "link", "link": {"title": "张三的北京专属福利", "url": "https://e.x/?c=c"}}]


@pytest.mark.parametrize("attachments, words", [
    ([{"msgtype": "link", "link": {"title": "t", "url": "u"}}] * 10, "at most 9"),
    ([{"msgtype": "voice", "voice": {}}], "msgtype must be one of"),
    ([{"msgtype": "link", "link": {"title": "长" * 43, "url": "u"}}], "link.title is over 128"),
    ([{"msgtype": "link", "link": {"title": "{missing}", "url": "u"}}], "{missing}"),
])
def test_bad_attachments_dead_letter_without_any_call(store, clock, attachments, words):
    store.put_leads("c", [lead()], clock())
    add, welcome = FakeAdd(), FakeWelcome()
    ctx = ctx_for(store, clock, add=add, welcome=welcome)
    ctx.settings.welcome.attachments = attachments
    assert process(ctx, store.lease("add", 30, clock())) == "dead"
    st = state(store, "add")
    assert add.calls == 0 and welcome.calls == 0 and st["kind"] == "invalid" and words in st["error"]


def test_patient_waits_out_an_unavailable_store_and_gives_up_on_stop(monkeypatch, caplog):
    import threading

    from wecomctl.errors import Unavailable
    from wecomctl.pipeline import patience

    monkeypatch.setattr(patience, "FIRST_WAIT_S", 0.001)

    class Flaky:
        path = "redis://host/0"

        def __init__(self):
            self.calls = 0

        def counts(self):
            self.calls += 1
            if self.calls <= 3:
                raise Unavailable("cannot reach the store")
            return {"ok": self.calls}

    stop = threading.Event()
    target = Flaky()
    store = patience.Patient(target, stop, "the store")
    with caplog.at_level("WARNING"):
        assert store.counts() == {"ok": 4} and store.path == "redis://host/0"
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "unreachable" in m]) == 1 and any("is back" in m for m in said)
    target.calls = 0
    stop.set()
    with pytest.raises(Unavailable):
        store.counts()  # stopping: no more waiting
