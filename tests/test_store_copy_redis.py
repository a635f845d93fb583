"""RedisStore.snapshot() and restore(): a campaign copied into another namespace is the
same campaign, with waiting and in-flight items ready again and their intent kept."""

import uuid

import pytest

from conftest import FakeClock, lead
from redis_util import REDIS_URL, redis_prefix  # noqa: F401 (fixture; fails without Redis under CI=true)
from wecomctl.errors import StoreError
from wecomctl.store.base import STAGES, Failure
from wecomctl.store.disk import DiskStore
from wecomctl.store.redis import RedisStore

KW = {"max_attempts": 3, "max_deliveries": 3, "writeback": True}
MOVED = ("delayed", "leased")  # ready in the copy


@pytest.fixture
def stores(redis_prefix):  # noqa: F811 (fixture)
    """RedisStores in namespaces under this test's prefix (all deleted afterwards)."""
    opened = []

    def open_one(name=None, **kw):
        s = RedisStore(REDIS_URL, namespace=f"{redis_prefix}:{name or uuid.uuid4().hex[:8]}", **{**KW, **kw})
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        s.close()


def fill(store, clock):
    """Two campaigns with every state: a duplicate at import; done and welcomed (a ledger
    entry, write-back queued); delayed; dead with an errcode (write-back queued); leased with
    an intent; still ready. Returns the leased item."""
    phones = [f"+861380013{i:04d}" for i in range(6)]
    store.put_leads("a", [lead(phone=p) for p in phones] + [lead(phone=phones[0], name="dup")], clock())
    store.put_leads("b:2", [lead(phone="+8613900139000"), lead(phone="+8613900139001")], clock())
    clock.t += 1.25
    first = store.lease("add", 30, clock())
    store.complete(first, clock(), updates={"external_userid": "wm:1"}, enqueue_next=True)
    w = store.lease("welcome", 30, clock())
    store.mark_intent(w, clock())
    store.complete(w, clock(), updates={"welcome_status": "sent"})
    clock.t += 0.5
    store.retry(store.lease("add", 30, clock()), clock() + 60, Failure(-1, "busy", "retry"), clock())
    store.bury(store.lease("add", 30, clock()), Failure(60111, "no such staff", "dead"), clock())
    held = store.lease("add", 30, clock())
    assert store.mark_intent(held, clock() + 0.000123)
    return held


def states(x):
    return {s: x[s]["state"] for s in STAGES if s in x}


def copied_state(state):
    return "ready" if state in MOVED else state


def expected_counts(counts):
    out = {}
    for camp, c in counts.items():
        stages = {}
        for stage, row in c["stages"].items():
            row = dict(row)
            row["ready"] += sum(row.pop(m) for m in MOVED)
            row.update({m: 0 for m in MOVED})
            stages[stage] = row
        out[camp] = {**c, "stages": stages}
    return out


def ledger(store, campaign, euid):
    return store.welcome_ledger(campaign, euid)


def test_restore_copies_every_lead_counter_and_ledger_entry(stores, clock):
    src = stores("src")
    held = fill(src, clock)
    assert src.has_leases()
    snap = list(src.snapshot())
    kinds = [k for k, _ in snap]
    assert kinds[:2] == ["meta", "campaigns"] and kinds.count("meta") == 1 and kinds.count("campaigns") == 1
    assert kinds == sorted(kinds, key=["meta", "campaigns", "counter", "lead", "ledger"].index)
    assert snap[1][1] == ["a", "b:2"]
    assert [v for k, v in snap if k == "counter"] == [("a", "dupes", 1), ("b:2", "dupes", 0)]
    assert [v for k, v in snap if k == "ledger"] == [("a", "wm:1", {"lead": 1, "at": clock.t - 0.5})]
    assert [v["id"] for k, v in snap if k == "lead"] == list(range(1, 9))
    assert [v for k, v in snap if k == "lead"] == list(src.leads())

    dst = stores("dst")
    assert dst.restore(iter(snap), clock() + 100) == {"leads": 8, "ledger": 1}
    assert dst.check() == []
    assert not dst.has_leases()
    assert dst.store_id() == src.store_id()
    assert dst.campaigns() == ["a", "b:2"]
    assert dst.counts() == expected_counts(src.counts())
    assert dst.counts()["a"]["skipped"] == 1 and dst.counts()["a"]["imported"] == 6
    assert dst.dead_by_code() == src.dead_by_code() == {"a": {"add": {"60111": 1}}}
    assert ledger(dst, "a", "wm:1") == ledger(src, "a", "wm:1") == {"lead": 1, "at": clock.t - 0.5}
    assert dst.recent(clock())["a"]["add"] == {"done": 0, "dead": 0, "failed": 0}  # not copied

    before, after = {x["id"]: x for x in src.leads()}, {x["id"]: x for x in dst.leads()}
    assert after.keys() == before.keys()
    for lid, old in before.items():
        new = after[lid]
        assert new["phone"] == old["phone"] and new["campaign"] == old["campaign"]
        assert states(new) == {s: copied_state(v) for s, v in states(old).items()}
        for stage in STAGES:
            if stage not in old:
                continue
            o, n = old[stage], new[stage]
            assert n["intent"] == o["intent"]  # kept, also for the leased item
            if o["state"] in ("ready", "delayed", "leased"):
                assert n["qkey"].startswith(f"ready:{stage}:") and n["lease"] is None
                same = {k: v for k, v in o.items() if k not in ("state", "qkey", "lease")}
                assert {k: v for k, v in n.items() if k not in ("state", "qkey", "lease")} == same
            else:
                assert n == o
        rest = {k: v for k, v in old.items() if k not in STAGES}
        assert {k: v for k, v in new.items() if k not in STAGES} == rest
    assert after[held.id]["add"]["intent"] == held.lead["add"]["intent"] is not None
    assert after[1]["welcome_status"] == "sent" and after[1]["external_userid"] == "wm:1"

    # the dedupe and the id sequence carry over
    assert dst.find_phone("a", "+8613800130000") == 1 and dst.find_phone("b:2", "+8613900139001") == 8
    r = dst.put_leads("a", [lead(phone="+8613800130000"), lead(phone="+8613700137000")], clock())
    assert r.accepted == 1 and r.duplicates[0][1] == 1 and dst.find_phone("a", "+8613700137000") == 9
    assert dst.check() == []


def test_restored_ready_items_lease_in_id_order_and_settle_the_intent_first(stores, clock):
    src = stores("src")
    held = fill(src, clock)
    delayed = [x["id"] for x in src.leads() if x["add"]["state"] == "delayed"]
    dst = stores("dst")
    dst.restore(src.snapshot(), clock())
    expect = {stage: [x["id"] for x in src.leads() if x.get(stage, {}).get("state") in ("ready", *MOVED)]
              for stage in STAGES}
    assert held.id in expect["add"] and delayed[0] in expect["add"] and expect["writeback"]
    for stage in STAGES:
        got = []
        while (item := dst.lease(stage, 30, clock())) is not None:
            got.append(item.id)
            if item.id == held.id:
                assert item.intent == held.lead["add"]["intent"]  # the next delivery settles it
                assert item.deliveries == 2 and item.lead["add"]["lease"] == item.token
            elif stage == "add":
                assert item.intent is None
        assert got == expect[stage], stage
    assert dst.check() == []


def test_restore_refuses_a_store_that_holds_leads(stores, clock):
    src = stores("src")
    fill(src, clock)
    dst = stores("dst")
    dst.put_leads("other", [lead()], clock())
    sid = dst.store_id()
    with pytest.raises(StoreError, match="already holds 1 leads"):
        dst.restore(src.snapshot(), clock())
    assert dst.store_id() == sid and dst.campaigns() == ["other"] and dst.check() == []
    # and a store just restored into holds leads too
    fresh = stores("fresh")
    fresh.restore(src.snapshot(), clock())
    with pytest.raises(StoreError, match="already holds 8 leads"):
        fresh.restore(src.snapshot(), clock())
    assert fresh.check() == []


def test_round_trip_restores_identically(stores, clock):
    src = stores("src")
    fill(src, clock)
    one = stores("one")
    one.restore(src.snapshot(), clock())
    first = list(one.snapshot())
    two = stores("two")
    assert two.restore(iter(first), clock() + 5) == {"leads": 8, "ledger": 1}
    second = list(two.snapshot())
    assert second == first
    assert two.counts() == one.counts() and two.dead_by_code() == one.dead_by_code()
    assert two.check() == []


def test_restore_writes_in_batches(stores, monkeypatch):
    """2,500 leads: three restore scripts, not one round trip per lead; the queue order
    and the counters hold across the batch boundaries."""
    clock = FakeClock()
    src = stores("src", writeback=False)
    for c in ("x", "y"):
        src.put_leads(c, [lead(phone=f"+86138{c == 'y':d}{i:07d}") for i in range(1250)], clock())
    for _ in range(7):
        src.complete(src.lease("add", 30, clock()), clock(), enqueue_next=True)
    dst = stores("dst", writeback=False)
    calls = []
    run = dst._run
    monkeypatch.setattr(dst, "_run", lambda name, *a, **kw: (calls.append(name), run(name, *a, **kw))[1])
    assert dst.restore(src.snapshot(), clock()) == {"leads": 2500, "ledger": 0}
    assert calls.count("restore") == 3
    assert dst.counts() == src.counts() and dst.check() == []
    assert [dst.lease("add", 30, clock()).id for _ in range(3)] == [8, 9, 10]
    assert [dst.lease("welcome", 30, clock()).id for _ in range(7)] == list(range(1, 8))


def test_restore_refuses_leads_out_of_id_order(stores, clock):
    src = stores("src")
    src.put_leads("a", [lead(phone="+8613800138000"), lead(phone="+8613800138001")], clock())
    snap = list(src.snapshot())
    leads = [r for r in snap if r[0] == "lead"]
    swapped = [r for r in snap if r[0] != "lead"] + leads[::-1]
    with pytest.raises(StoreError, match="id order"):
        stores("dst").restore(swapped, clock())


def test_ledger_keys_of_campaigns_that_contain_a_colon(stores, clock):
    """ledger:welcome:{campaign}:{euid} with campaigns "x" and "x:y": each entry goes back
    to the campaign of the lead it greeted."""
    src = stores("src")
    for camp, euid in (("x", "y:2"), ("x:y", "3")):
        src.put_leads(camp, [lead()], clock())
        src.complete(src.lease("add", 30, clock()), clock(), updates={"external_userid": euid}, enqueue_next=True)
        src.complete(src.lease("welcome", 30, clock()), clock())
    entries = [v[:2] for k, v in src.snapshot() if k == "ledger"]
    assert entries == [("x", "y:2"), ("x:y", "3")]
    dst = stores("dst")
    assert dst.restore(src.snapshot(), clock())["ledger"] == 2
    assert dst.welcome_ledger("x", "y:2")["lead"] == 1 and dst.welcome_ledger("x:y", "3")["lead"] == 2
    assert dst.check() == []


def test_copy_from_disk_to_redis_and_back(tmp_path, stores, clock):
    """The two backends read each other's snapshots: the same leads, stage records,
    counters, DLQ counts, ledger and store id."""
    disk = DiskStore(str(tmp_path / "src"), **KW)
    fill(disk, clock)
    red = stores("red")
    assert red.restore(disk.snapshot(), clock()) == {"leads": 8, "ledger": 1}
    assert red.check() == [] and red.store_id() == disk.store_id()
    assert red.counts() == expected_counts(disk.counts()) and red.dead_by_code() == disk.dead_by_code()
    strip = lambda x: {k: ({f: w for f, w in v.items() if f not in ("qkey", "lease")} if k in STAGES else v)
                       for k, v in x.items()}
    for d, r in zip(disk.leads(), red.leads(), strict=True):
        assert states(r) == {s: copied_state(v) for s, v in states(d).items()}
        assert {k: v for k, v in strip(r).items() if k not in STAGES} == \
            {k: v for k, v in strip(d).items() if k not in STAGES}
        for stage in STAGES:
            if stage in d:
                assert {**strip(r)[stage], "state": None} == {**strip(d)[stage], "state": None}
    back = DiskStore(str(tmp_path / "back"), **KW)
    assert back.restore(red.snapshot(), clock()) == {"leads": 8, "ledger": 1}
    assert back.check() == [] and back.store_id() == disk.store_id()
    assert [strip(x) for x in back.leads()] == [strip(x) for x in red.leads()]
    assert back.welcome_ledger("a", "wm:1") == disk.welcome_ledger("a", "wm:1")
    disk.close()
    back.close()
