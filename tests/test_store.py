"""The stores: states, counters, leases, retries, DLQ and the ledger.

Tests taking the `store` fixture run on both backends (disk and Redis); `disk_store` and
`redis_namespace` tests are about one backend.
"""

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


def test_a_poison_item_keeps_its_intent_through_the_dlq_and_its_replay(store, clock):
    # Its worker may have died after the call went out: the replay must settle that call
    # (look it up) before making it again. An ambiguous one replayed by the operator after
    # checking in WeCom starts without it.
    store.put_leads("c", [lead()], clock())
    for i in range(3):
        item = store.lease("add", 10, clock())
        if i == 0:
            store.mark_intent(item, clock())
        clock.t += 11
        store.maintain(clock())
    assert store.lease("add", 10, clock()) is None
    dead = next(store.leads())["add"]
    assert dead["kind"] == "poison" and dead["intent"] is not None
    assert store.requeue_dead("add", None, clock()) == 1
    replayed = store.lease("add", 10, clock())
    assert replayed.lead["add"]["intent"] == dead["intent"] and replayed.lead["add"]["attempts"] == 0
    store.bury(replayed, Failure(None, "the call may have happened", "ambiguous"), clock())
    assert store.requeue_dead("add", None, clock(), kind="ambiguous") == 1
    assert store.lease("add", 10, clock()).lead["add"]["intent"] is None
    assert invariant(store)["stages"]["add"]["leased"] == 1


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


def test_a_store_of_format_2_is_read_and_worked_on(tmp_path, clock):
    # Format 2 wrote each lead as a pickled dict: such a store opens, its leads are read
    # as they were and go on through the queue; the store then says it is format 3.
    import pickle

    d = str(tmp_path / "d")
    s = DiskStore(d)
    s.put_leads("c", [lead(), lead("+8613900139000")], clock())
    with s._tx():
        for lid, in s._db().execute("SELECT id FROM lead").fetchall():
            s._db().execute("UPDATE lead SET data = ? WHERE id = ?", (pickle.dumps(s.lead(lid)), lid))
        s.cache.set("meta.format", 2)
    before = list(s.leads())
    s.close()
    looked = DiskStore(d)  # status, check, a dry run: reading leaves it a format-2 store
    assert list(looked.leads()) == before and looked.counts() and looked.cache.get("meta.format") == 2
    looked.close()
    s2 = DiskStore(d)
    assert list(s2.leads()) == before and s2.cache.get("meta.format") == 2
    item = s2.lease("add", 30, clock())
    assert item.lead == {**before[0], "add": item.lead["add"]} and item.lead["add"]["state"] == "leased"
    assert s2.cache.get("meta.format") == 3  # a record in the new form was written
    assert invariant(s2)["stages"]["add"]["leased"] == 1
    s2.close()


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
    if isinstance(store, DiskStore):
        store.cache.incr("n:c:add:done", 1)
        orphan = "q.add.lease-000000000000001.99.1-1"
        store.cache.set(orphan, 99)
        store.cache.delete("ledger:welcome:c:wm1")
    else:
        ns = store.namespace
        store.r.hincrby(f"{ns}:n:c", "add:done", 1)
        orphan = "lease:add:99:otherhost-1-1"
        store.r.zadd(f"{ns}:lease:add", {"99:otherhost-1-1": 1.0})
        store.r.delete(f"{ns}:ledger:welcome:c:wm1")
    problems = "\n".join(store.check())
    assert "counter done=2 but 1 leads are done" in problems
    assert f"orphan queue entry {orphan}" in problems
    assert "not in the welcome ledger" in problems


@pytest.mark.parametrize("sqlite_says", ["database or disk is full", "attempt to write a readonly database"])
def test_disk_full_or_read_only_is_a_clear_error_naming_the_path(disk_store, clock, monkeypatch, sqlite_says):
    import contextlib
    import sqlite3

    @contextlib.contextmanager
    def failing(*a, **k):
        raise sqlite3.OperationalError(sqlite_says)
        yield

    monkeypatch.setattr(disk_store.cache, "transact", failing)
    with pytest.raises(StoreError) as e:
        disk_store.put_leads("c", [lead()], clock())
    msg = str(e.value)
    assert disk_store.path in msg and sqlite_says in msg and "read-only" in msg and "nothing was lost" in msg


def test_a_corrupt_or_foreign_store_is_refused_with_the_path(tmp_path):
    d = tmp_path / "d"
    (d / "store").mkdir(parents=True)
    (d / "store" / "cache.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as e:
        DiskStore(str(d))
    assert str(d / "store") in str(e.value)


# -- both backends: timestamps and odd values round-trip exactly ---------------------------
def test_times_and_fields_round_trip_exactly(store):
    now = 1712345678.123456  # more digits than Lua's cjson keeps
    nl = lead(name="O'Brien \"李\" / 测试", 城市="北京", empty="")
    store.put_leads("c/1: x", [nl], now)
    item = store.lease("add", 10.5, now)
    assert item.expires == now + 10.5
    rec = store.lead(item.id)
    assert rec["imported_at"] == now and rec["add"]["at"] == now
    assert rec["name"] == nl.name and rec["fields"] == {"城市": "北京", "empty": ""} and rec["row"] == 1
    assert store.mark_intent(item, now + 0.000001) and item.intent == now + 0.000001
    assert store.find_phone("c/1: x", nl.phone) == item.id and store.find_phone("c", nl.phone) is None
    store.set_flag("fatal", {"api": "x", "errcode": 40001})
    assert store.get_flag("fatal") == {"api": "x", "errcode": 40001}
    store.set_flag("fatal", None)
    assert store.get_flag("fatal") is None
    assert store.campaigns() == ["c/1: x"]


def test_revive_of_a_fixed_row_on_both_backends(store, clock):
    store.put_leads("c", [lead(city="x")], clock())
    item = store.lease("add", 10, clock())
    store.bury(item, Failure(60111, "userid not found", "dead"), clock())
    assert store.put_leads("c", [lead(city="x")], clock()).revived == 0  # same row: not a fix
    r = store.put_leads("c", [lead(city="y"), lead(phone="+8613900139000")], clock())
    assert (r.revived, r.accepted, len(r.duplicates)) == (1, 1, 0)
    again = store.lease("add", 10, clock())
    assert again.id == item.id and again.lead["fields"] == {"city": "y"} and again.attempts == 0
    assert invariant(store)["stages"]["add"]["dead"] == 0
    assert store.check() == []


def test_welcome_skipped_and_late_outcomes_keep_counters(store, clock):
    store.put_leads("c", [lead(), lead(phone="+8613900139000")], clock())
    for _ in range(2):
        a = store.lease("add", 10, clock())
        store.complete(a, clock(), updates={"external_userid": "wm" + str(a.id)}, enqueue_next=True)
    w1 = store.lease("welcome", 10, clock())
    store.complete(w1, clock(), updates={"welcome_status": "already_sent"}, state="skipped", called=False)
    w2 = store.lease("welcome", 10, clock())
    clock.t += 11
    assert store.maintain(clock()) == 1  # w2's lease lapsed
    assert not store.renew(w2, 10, clock()) and not store.mark_intent(w2, clock())
    store.release(w2, clock())  # not held: nothing happens
    store.bury(w2, Failure(41001, "late", "dead"), clock())  # a late outcome is recorded
    assert store.lease("welcome", 10, clock()) is None  # the stale ready entry is dropped
    counts = invariant(store)["stages"]["welcome"]
    assert (counts["skipped"], counts["dead"], counts["ready"]) == (1, 1, 0)
    assert store.check() == []


# -- Redis only ---------------------------------------------------------------------------
def redis_store(url, namespace, **kw):
    from wecomctl.store.redis import RedisStore

    return RedisStore(url, namespace=namespace, **{"max_attempts": 3, "max_deliveries": 3, **kw})


def test_redis_lease_survives_a_consumer_that_disappears(redis_namespace, clock):
    url, ns = redis_namespace
    a = redis_store(url, ns)
    a.put_leads("c", [lead()], clock())
    item = a.lease("add", 30, clock())
    assert item.token.startswith(f"{a._host}-{__import__('os').getpid()}-")
    a.close()  # the consumer is gone without an outcome
    b = redis_store(url, ns)
    assert b.lease("add", 30, clock()) is None
    assert b.next_wakeup() == clock() + 30
    clock.t += 29
    assert b.maintain(clock()) == 0
    clock.t += 2
    assert b.maintain(clock()) == 1
    again = b.lease("add", 30, clock())
    assert again.id == item.id and again.deliveries == 2 and again.token != item.token
    b.complete(again, clock(), enqueue_next=True)
    assert invariant(b)["stages"]["add"]["done"] == 1 and b.check() == []
    b.close()


def test_redis_reclaim_leaves_other_hosts_leases_alone(redis_namespace, clock, monkeypatch):
    import os

    url, ns = redis_namespace
    here = redis_store(url, ns)
    there = redis_store(url, ns)
    there._host = "another-host.example"  # a worker with the same pid on another machine
    here.put_leads("c", [lead(), lead(phone="+8613900139000")], clock())
    theirs = there.lease("add", 30, clock())
    ours = here.lease("add", 30, clock())
    assert theirs.token.startswith("another-host.example-")
    assert here.reclaim(clock(), {os.getpid()}) == 1  # only ours: the pid means nothing there
    assert here.lead(theirs.id)["add"]["state"] == "leased"
    assert here.lead(ours.id)["add"]["state"] == "ready"
    monkeypatch.setattr("wecomctl.store.redis._alive", lambda pid: False)
    assert here.reclaim(clock()) == 0
    clock.t += 31
    assert here.maintain(clock()) == 1  # an expired lease of any host comes back
    assert here.check() == []


def test_redis_errors_name_the_server_never_the_password():
    from wecomctl.store import open_store
    from wecomctl.store.redis import RedisStore

    for url in ("redis://:s3cretpw@127.0.0.1:1/0", "redis://app:s3cretpw@127.0.0.1:1/0",
                "redis://127.0.0.1:1/0?password=s3cretpw"):
        with pytest.raises(StoreError) as e:
            RedisStore(url, namespace="wecomctl-test-refused")
        msg = str(e.value)
        assert "s3cretpw" not in msg and "127.0.0.1:1" in msg and "is Redis running" in msg, msg
    with pytest.raises(StoreError) as e:
        open_store("redis://:s3cretpw@127.0.0.1:1/0", max_attempts=3, max_deliveries=3)
    assert "s3cretpw" not in str(e.value) and "redis://***@127.0.0.1:1/0" in str(e.value)


def test_redis_path_is_the_url_without_password(redis_namespace):
    from wecomctl.store import redact_url

    url, ns = redis_namespace
    assert redact_url("redis://:pw@h:6380/2") == "redis://***@h:6380/2"
    assert redact_url("rediss://u:pw@h/0?password=pw&ssl_cert_reqs=none") == "rediss://***@h/0?ssl_cert_reqs=none"
    assert redact_url("unix:///run/redis.sock?db=1&password=pw") == "unix:///run/redis.sock?db=1"
    assert redis_store(url, ns).path == redact_url(url)


def test_a_typo_in_the_redis_url_is_a_clear_error_not_a_traceback(tmp_path):
    from test_e2e import cli

    from wecomctl.store import unknown_url_parameters

    assert unknown_url_parameters("redis://h/0?db=1&socket_timeout=3&password=x&health_check_interval=5") == []
    assert unknown_url_parameters("redis://h/0?namespce=spring&foo=1") == ["namespce", "foo"]
    leads = tmp_path / "l.csv"
    leads.write_text("phone\n13800138000\n", encoding="utf-8")
    for command in (["status"], ["dlq", "list"], ["import", str(leads), "--campaign", "c", "--owner", "u"]):
        proc = cli(*command, "--store", "redis://u:s3cret@127.0.0.1:6379/0?namespce=spring", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "unknown parameter 'namespce'" in proc.stderr and "s3cret" not in proc.stderr


def test_redis_put_leads_is_one_script_per_thousand_leads_in_one_round_trip(redis_namespace, clock, monkeypatch):
    from redis.connection import Connection

    url, ns = redis_namespace
    s = redis_store(url, ns)
    s.put_leads("warm", [lead()], clock())  # the scripts are loaded once
    calls, sends = [], []
    script = s._scripts["put"]
    monkeypatch.setitem(s._scripts, "put", lambda *a, **k: calls.append(1) or script(*a, **k))
    real_send = Connection.send_packed_command
    monkeypatch.setattr(Connection, "send_packed_command",
                        lambda self, *a, **k: sends.append(1) or real_send(self, *a, **k))
    leads = [lead(phone=f"+86138{i:08d}") for i in range(5000)]
    r = s.put_leads("c", leads + leads[:10], clock())
    assert r.accepted == 5000 and [d[1] for d in r.duplicates] == list(range(2, 12))
    assert len(calls) == 6  # 5,010 leads: six scripts
    assert len(sends) <= 2  # one MULTI/EXEC (and a SCRIPT EXISTS)
    assert invariant(s)["stages"]["add"]["ready"] == 5000
    s.close()


def test_redis_state_survives_reopen_and_format_is_checked(redis_namespace, clock):
    url, ns = redis_namespace
    redis_store(url, ns).put_leads("c", [lead()], clock())
    s2 = redis_store(url, ns)
    assert s2.counts()["c"]["imported"] == 1
    s2.r.set(f"{ns}:meta.format", 99)
    with pytest.raises(StoreError, match="format 99"):
        redis_store(url, ns)


def test_redis_missing_namespace_is_a_clear_error(redis_namespace):
    url, ns = redis_namespace
    with pytest.raises(StoreError, match="wecomctl import"):
        redis_store(url, ns + "-nothing", create=False)


def test_open_store_picks_the_backend(redis_namespace, tmp_path):
    from wecomctl.store import open_store
    from wecomctl.store.redis import RedisStore

    url, ns = redis_namespace
    s = open_store(f"{url}?namespace={ns}", max_attempts=4, max_deliveries=2)
    assert isinstance(s, RedisStore) and s.namespace == ns and s.max_attempts == 4 and s.max_deliveries == 2
    assert "namespace" not in s.path
    d = open_store(str(tmp_path / "d"), max_attempts=4, max_deliveries=2)
    assert isinstance(d, DiskStore) and d.max_deliveries == 2
    with pytest.raises(StoreError, match="wecomctl import"):
        open_store(str(tmp_path / "none"), max_attempts=4, max_deliveries=2, create=False)


def test_open_store_without_the_redis_package_says_what_to_install(monkeypatch):
    import sys

    from wecomctl.store import open_store

    monkeypatch.delitem(sys.modules, "wecomctl.store.redis", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(StoreError) as e:
        open_store("redis://:pw@127.0.0.1/0", max_attempts=3, max_deliveries=3)
    assert "pip install 'wecomctl[redis]'" in str(e.value) and "pw" not in str(e.value)


def test_redis_consumers_on_several_connections_each_get_distinct_items(redis_namespace, clock):
    import threading

    url, ns = redis_namespace
    stores = [redis_store(url, ns) for _ in range(4)]
    stores[0].put_leads("c", [lead(phone=f"+86138{i:08d}") for i in range(400)], clock())
    seen: list[int] = []

    def consume(s):
        while (item := s.lease("add", 30, clock())) is not None:
            seen.append(item.id)
            s.complete(item, clock(), updates={"external_userid": f"wm{item.id}"}, enqueue_next=True)

    threads = [threading.Thread(target=consume, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(1, 401))  # each lead leased once, none lost
    counts = invariant(stores[0])["stages"]
    assert counts["add"]["done"] == 400 and counts["welcome"]["ready"] == 400
    assert stores[0].check() == []
    for s in stores:
        s.close()


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


# -- both backends: the write-back stage, DLQ counters, the store id -------------------------
def reopen(store, **kw):
    """Another open of the same store (another process would do this), with `kw` set."""
    kw = {"max_attempts": 3, "max_deliveries": 3, **kw}
    if isinstance(store, DiskStore):
        from pathlib import Path

        return DiskStore(str(Path(store.path).parent), **kw)
    from conftest import REDIS_URL
    from wecomctl.store.redis import RedisStore

    return RedisStore(REDIS_URL, namespace=store.namespace, **kw)


def _finish_add(store, clock, euid):
    item = store.lease("add", 10, clock())
    store.complete(item, clock(), updates={"external_userid": euid}, enqueue_next=True)
    return item


def test_writeback_is_queued_once_per_final_outcome_with_a_new_version(store, clock):
    wb = reopen(store, writeback=True)
    wb.put_leads("c", [lead(), lead(phone="+8613900139000"), lead(phone="+8613700137000")], clock())
    a = _finish_add(wb, clock, "wmA")  # add done is not final: nothing to write back yet
    assert wb.counts()["c"]["stages"]["writeback"]["entered"] == 0
    assert wb.lease("writeback", 10, clock()) is None
    b = wb.lease("add", 10, clock())
    assert wb.retry(b, clock() + 5, Failure(-1, "busy", "retry"), clock()) == "delayed"  # not final either
    assert wb.counts()["c"]["stages"]["writeback"]["entered"] == 0
    clock.sleep(5)
    wb.maintain(clock())
    b = wb.lease("add", 10, clock())
    wb.bury(b, Failure(60111, "userid not found", "dead"), clock())  # add dead: final
    wb.bury(b, Failure(60111, "late duplicate", "dead"), clock())  # a late outcome again: no second write-back
    w = wb.lease("welcome", 10, clock())
    assert w.id == a.id
    wb.complete(w, clock())  # welcome done: final
    c = _finish_add(wb, clock, "wmC")
    wc = wb.lease("welcome", 10, clock())
    wb.complete(wc, clock(), updates={"welcome_status": "already_sent"}, state="skipped", called=False)
    rows = invariant(wb)["stages"]["writeback"]
    assert rows["entered"] == 3 and rows["ready"] == 3
    got = {}
    while (item := wb.lease("writeback", 10, clock())) is not None:
        got[item.id] = item
        assert item.lead["writeback"]["version"] == 1 and item.attempts == 0 and item.deliveries == 1
    assert sorted(got) == sorted([a.id, b.id, c.id])
    for item in got.values():
        wb.complete(item, clock())
    assert invariant(wb)["stages"]["writeback"]["done"] == 3
    # a replay of the dead add that ends dead again is a new final outcome: version 2
    assert wb.requeue_dead("add", "c", clock()) == 1
    assert wb.counts()["c"]["stages"]["writeback"]["ready"] == 0  # ready again is not final
    again = wb.lease("add", 10, clock())
    assert again.id == b.id
    wb.bury(again, Failure(60111, "userid not found", "dead"), clock())
    item = wb.lease("writeback", 10, clock())
    assert item.id == b.id and item.lead["writeback"]["version"] == 2 and item.attempts == 0
    wb.complete(item, clock())
    rows = invariant(wb)["stages"]["writeback"]
    assert (rows["entered"], rows["done"]) == (3, 3)
    assert wb.lead(b.id)["writeback"]["version"] == 2
    assert wb.recent(clock())["c"]["writeback"] == {"done": 4, "dead": 0, "failed": 0}
    assert wb.check() == []
    wb.close()


def test_writeback_complete_of_an_older_version_leaves_the_newer_one_queued(store, clock):
    wb = reopen(store, writeback=True)
    wb.put_leads("c", [lead()], clock())
    _finish_add(wb, clock, "wm1")
    w = wb.lease("welcome", 10, clock())
    wb.bury(w, Failure(41001, "welcome code expired", "dead"), clock())
    old = wb.lease("writeback", 10, clock())  # version 1 is being written back...
    assert old.lead["writeback"]["version"] == 1
    assert wb.requeue_dead("welcome", "c", clock()) == 1  # ...while an operator replays the lead
    w = wb.lease("welcome", 10, clock())
    wb.complete(w, clock())  # a new final outcome: version 2 queued, the v1 lease dropped
    assert wb.lead(old.id)["writeback"]["state"] == "ready"
    wb.complete(old, clock())  # the v1 call ends: it must not settle version 2
    rec = wb.lead(old.id)["writeback"]
    assert rec["state"] == "ready" and rec["version"] == 2
    assert wb.check() == []
    new = wb.lease("writeback", 10, clock())
    assert new.id == old.id and new.lead["writeback"]["version"] == 2
    wb.complete(new, clock())
    assert wb.lead(old.id)["writeback"]["state"] == "done"
    assert invariant(wb)["stages"]["writeback"]["done"] == 1
    assert wb.check() == []
    wb.close()


def test_writeback_off_never_enters_the_writeback_stage(store, clock):
    assert not store.writeback
    store.put_leads("c", [lead(), lead(phone="+8613900139000")], clock())
    a = _finish_add(store, clock, "wm1")
    store.complete(store.lease("welcome", 10, clock()), clock())
    b = store.lease("add", 10, clock())
    store.bury(b, Failure(60111, "userid not found", "dead"), clock())
    assert "writeback" not in store.lead(a.id) and "writeback" not in store.lead(b.id)
    assert invariant(store)["stages"]["writeback"]["entered"] == 0
    assert store.lease("writeback", 10, clock()) is None
    assert store.check() == []


def test_poison_ticks_dead_counts_under_its_kind_and_is_written_back(store, clock):
    wb = reopen(store, writeback=True)
    wb.put_leads("c", [lead()], clock())
    for _ in range(3):  # max_deliveries=3
        wb.lease("add", 10, clock())
        clock.sleep(11)
        wb.maintain(clock())
    assert wb.lease("add", 10, clock()) is None  # died as poison inside lease
    assert wb.dead_by_code() == {"c": {"add": {"poison": 1}}}
    assert wb.recent(clock())["c"]["add"] == {"done": 0, "dead": 1, "failed": 0}
    item = wb.lease("writeback", 10, clock())
    assert item.lead["writeback"]["version"] == 1
    wb.bury(item, Failure(None, "receiver said 400", "dead"), clock())  # a write-back can die too
    assert wb.dead_by_code() == {"c": {"add": {"poison": 1}, "writeback": {"dead": 1}}}
    assert wb.check() == []
    assert wb.requeue_dead("writeback", None, clock()) == 1
    assert wb.dead_by_code() == {"c": {"add": {"poison": 1}}}
    assert wb.check() == []
    wb.close()


def test_check_finds_a_dlq_counter_out_of_step(store, clock):
    store.put_leads("c", [lead()], clock())
    store.bury(store.lease("add", 10, clock()), Failure(60111, "userid not found", "dead"), clock())
    assert store.check() == []
    if isinstance(store, DiskStore):
        store.cache.incr("dlq:c:add:60111", 1)
        store.cache.incr("dlq:c:welcome:41001", 1)
    else:
        store.r.hincrby(f"{store.namespace}:dlq:c", "add:60111", 1)
        store.r.hincrby(f"{store.namespace}:dlq:c", "welcome:41001", 1)
    problems = store.check()
    assert "DLQ counter dlq:c:add:60111=2 but 1 dead letters have that code" in problems
    assert "DLQ counter dlq:c:welcome:41001=1 but 0 dead letters have that code" in problems


def test_store_id_is_given_once_and_stable_across_opens(store, tmp_path):
    import re

    first = store.store_id()
    assert re.fullmatch(r"[0-9a-f]{12}", first)
    assert store.store_id() == first
    other = reopen(store)
    assert other.store_id() == first
    other.close()
    if isinstance(store, DiskStore):
        elsewhere = DiskStore(str(tmp_path / "elsewhere"))
        assert elsewhere.store_id() != first
        elsewhere.close()
    else:
        from conftest import REDIS_URL, drop_namespace
        from wecomctl.store.redis import RedisStore

        ns = store.namespace + "-other"
        try:
            elsewhere = RedisStore(REDIS_URL, namespace=ns)
            assert elsewhere.store_id() != first
            elsewhere.close()
        finally:
            drop_namespace(ns)
