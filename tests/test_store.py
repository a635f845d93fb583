"""The embedded store: states, counters, leases, retries, DLQ and the ledger."""

import pytest

from conftest import lead
from wecomctl.errors import StoreError
from wecomctl.store.base import Failure
from wecomctl.store.disk import DiskStore


def invariant(store, campaign="c"):
    counts = store.counts()[campaign]
    add = counts["stages"]["add"]
    assert add["entered"] == counts["imported"]
    for row in counts["stages"].values():
        assert row["entered"] == sum(row[s] for s in ("ready", "delayed", "leased", "done", "dead", "skipped"))
    return counts


def test_put_dedupes_within_campaign_not_across(store, clock):
    r = store.put_leads("c", [lead(), lead(name="dup"), lead(phone="+8613900139000")], clock())
    assert r.accepted == 2 and len(r.duplicates) == 1 and r.duplicates[0][1] == 1
    r2 = store.put_leads("c", [lead()], clock())
    assert r2.accepted == 0 and len(r2.duplicates) == 1
    r3 = store.put_leads("other", [lead()], clock())
    assert r3.accepted == 1
    counts = invariant(store)
    assert counts["imported"] == 2 and counts["skipped"] == 2
    assert counts["stages"]["add"]["ready"] == 2


def test_lease_complete_enqueues_welcome_and_ledger(store, clock):
    store.put_leads("c", [lead()], clock())
    item = store.lease("add", 30, clock())
    assert item.stage == "add" and item.lead["phone"] == "+8613800138000"
    assert store.lease("add", 30, clock()) is None  # leased, not visible
    assert invariant(store)["stages"]["add"]["leased"] == 1
    store.complete(item, clock(), updates={"external_userid": "wmX"}, enqueue_next=True)
    w = store.lease("welcome", 30, clock())
    assert w.lead["external_userid"] == "wmX"
    assert store.welcome_ledger("c", "wmX") is None
    store.complete(w, clock())
    assert store.welcome_ledger("c", "wmX")["lead"] == item.id
    counts = invariant(store)
    assert counts["stages"]["add"]["done"] == 1 and counts["stages"]["welcome"]["done"] == 1


def test_expired_lease_returns_item_and_counts_delivery(store, clock):
    store.put_leads("c", [lead()], clock())
    item = store.lease("add", 30, clock())
    clock.t += 29
    assert store.maintain(clock()) == 0
    clock.t += 2
    assert store.maintain(clock()) == 1
    again = store.lease("add", 30, clock())
    assert again.id == item.id and again.deliveries == 2
    invariant(store)


def test_poison_message_goes_to_dlq_after_max_deliveries(store, clock):
    store.put_leads("c", [lead()], clock())
    for _ in range(3):  # max_deliveries=3: each lease dies without an outcome
        assert store.lease("add", 10, clock()) is not None
        clock.t += 11
        store.maintain(clock())
    assert store.lease("add", 10, clock()) is None
    counts = invariant(store)
    assert counts["stages"]["add"]["dead"] == 1
    dead = next(store.leads())["add"]
    assert dead["kind"] == "poison"


def test_late_ack_after_expiry_is_recorded_once(store, clock):
    store.put_leads("c", [lead()], clock())
    first = store.lease("add", 10, clock())
    clock.t += 11
    store.maintain(clock())
    second = store.lease("add", 10, clock())
    store.complete(first, clock(), updates={"external_userid": "wm1"}, enqueue_next=True)
    store.complete(second, clock(), updates={"external_userid": "wm1"}, enqueue_next=True)
    counts = invariant(store)
    assert counts["stages"]["add"]["done"] == 1
    assert counts["stages"]["welcome"]["entered"] == 1


def test_retry_delays_then_dead_after_max_attempts(store, clock):
    store.put_leads("c", [lead()], clock())
    fail = Failure(-1, "system busy", "retry")
    for attempt in (1, 2):
        item = store.lease("add", 10, clock())
        assert store.retry(item, clock() + 5, fail, clock()) == "delayed"
        assert store.lease("add", 10, clock()) is None  # not due yet
        assert store.next_wakeup() == pytest.approx(clock() + 5, abs=0.002)
        clock.t += 5
        store.maintain(clock())
    item = store.lease("add", 10, clock())
    assert item.attempts == 2 and item.deliveries == 1
    assert store.retry(item, clock() + 5, fail, clock()) == "dead"
    rec = next(store.leads())["add"]
    assert rec["state"] == "dead" and rec["errcode"] == -1 and rec["attempts"] == 3
    invariant(store)


def test_throttle_retry_does_not_use_an_attempt(store, clock):
    store.put_leads("c", [lead()], clock())
    for _ in range(10):
        item = store.lease("add", 10, clock())
        store.retry(item, clock(), Failure(45009, "frequency", "throttle"), clock(), count_attempt=False)
        store.maintain(clock())
    assert store.lease("add", 10, clock()).attempts == 0


def test_release_puts_back_without_counting(store, clock):
    store.put_leads("c", [lead()], clock())
    item = store.lease("add", 10, clock())
    store.release(item, clock())
    again = store.lease("add", 10, clock())
    assert again.deliveries == 1 and again.attempts == 0


def test_bury_and_requeue_dead_with_filters(store, clock):
    store.put_leads("c", [lead(), lead(phone="+8613900139000")], clock())
    a = store.lease("add", 10, clock())
    store.bury(a, Failure(60111, "userid not found", "dead"), clock())
    b = store.lease("add", 10, clock())
    store.bury(b, Failure(910001, "mobile not found", "dead"), clock())
    assert store.requeue_dead("add", None, clock(), errcode=60111, dry_run=True) == 1
    assert invariant(store)["stages"]["add"]["dead"] == 2
    assert store.requeue_dead("add", None, clock(), errcode=60111) == 1
    counts = invariant(store)
    assert counts["stages"]["add"]["dead"] == 1 and counts["stages"]["add"]["ready"] == 1
    assert store.requeue_dead(None, None, clock(), limit=5) == 1


def test_state_survives_reopen_and_format_is_checked(tmp_path, clock):
    d = str(tmp_path / "d")
    s = DiskStore(d)
    s.put_leads("c", [lead()], clock())
    s.close()
    s2 = DiskStore(d)
    assert s2.counts()["c"]["imported"] == 1
    s2.cache.set("meta.format", 99)
    s2.close()
    with pytest.raises(StoreError, match="format 99"):
        DiskStore(d)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="wecomctl import"):
        DiskStore(str(tmp_path / "nothing"), create=False)


def test_check_passes_on_a_healthy_store_and_finds_damage(store, clock):
    store.put_leads("c", [lead(), lead(phone="+8613900139000"), lead(phone="+8613700137000")], clock())
    a = store.lease("add", 10, clock())
    store.complete(a, clock(), updates={"external_userid": "wm1"}, enqueue_next=True)
    w = store.lease("welcome", 10, clock())
    store.complete(w, clock())
    b = store.lease("add", 10, clock())
    store.retry(b, clock() + 5, Failure(-1, "busy", "retry"), clock())
    store.lease("add", 10, clock())  # one left leased
    assert store.check() == []
    # damage: a counter off by one, an orphan lease, a ledger entry lost
    store.cache.incr("n:c:add:done", 1)
    store.cache.set("q.add.lease-000000000000001.99.1-1", 99)
    store.cache.delete("ledger:welcome:c:wm1")
    problems = "\n".join(store.check())
    assert "counter done=2 but 1 leads are done" in problems
    assert "orphan queue entry q.add.lease-000000000000001.99.1-1" in problems
    assert "not in the welcome ledger" in problems


@pytest.mark.parametrize("sqlite_says", ["database or disk is full", "attempt to write a readonly database"])
def test_disk_full_or_read_only_is_a_clear_error_naming_the_path(store, clock, monkeypatch, sqlite_says):
    import contextlib
    import sqlite3

    @contextlib.contextmanager
    def failing(*a, **k):
        raise sqlite3.OperationalError(sqlite_says)
        yield

    monkeypatch.setattr(store.cache, "transact", failing)
    with pytest.raises(StoreError) as e:
        store.put_leads("c", [lead()], clock())
    msg = str(e.value)
    assert store.path in msg and sqlite_says in msg and "read-only" in msg and "nothing was lost" in msg


def test_a_corrupt_or_foreign_store_is_refused_with_the_path(tmp_path):
    d = tmp_path / "d"
    (d / "store").mkdir(parents=True)
    (d / "store" / "cache.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as e:
        DiskStore(str(d))
    assert str(d / "store") in str(e.value)


def test_recent_outcomes_dlq_codes_and_oldest_ready(store, clock):
    store.put_leads("c", [lead(phone=f"+861380013{i:04d}") for i in range(5)], clock())
    clock.sleep(90)
    items = [store.lease("add", 30, clock()) for _ in range(4)]
    store.complete(items[0], clock(), updates={"external_userid": "wm0"}, enqueue_next=True)
    store.bury(items[1], Failure(60111, "no such user", "dead"), clock())
    store.bury(items[2], Failure(None, "bad template", "invalid"), clock(), called=False)
    assert store.retry(items[3], clock() + 5, Failure(-1, "busy", "retry"), clock()) == "delayed"
    recent = store.recent(clock())["c"]["add"]
    assert recent == {"done": 1, "dead": 2, "failed": 2}  # the invalid one made no call
    assert store.dead_by_code() == {"c": {"add": {"60111": 1, "invalid": 1}}}
    ages = store.oldest_ready(clock())["c"]
    assert ages["add"] == 90.0 and ages["welcome"] == 0.0  # the 5th lead waited since import
    # ten minutes later the window has moved on; the DLQ has not
    clock.sleep(600)
    assert store.recent(clock())["c"]["add"] == {"done": 0, "dead": 0, "failed": 0}
    # a replay takes letters out of the DLQ counters
    assert store.requeue_dead("add", "c", clock(), errcode=60111) == 1
    assert store.dead_by_code() == {"c": {"add": {"invalid": 1}}}
    assert store.check() == []
