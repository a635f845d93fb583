"""wecomctl store copy: a campaign moved to another store carries on where it stopped."""

import json
import uuid

import pytest

from conftest import lead
from redis_util import REDIS_URL, redis_client_or_skip
from test_e2e import cli
from wecomctl.store import open_store
from wecomctl.store.base import Failure

KW = {"max_attempts": 3, "max_deliveries": 3, "writeback": True}


def fill(store, clock):
    """Two campaigns with every state: done and welcomed (a ledger entry), delayed, dead,
    leased with an intent, ready, a duplicate; write-back queued for final outcomes."""
    store.put_leads("a", [lead(phone=f"+861380013{i:04d}") for i in range(6)] + [lead(phone="+8613800130000")], clock())
    store.put_leads("b", [lead(phone="+8613900139000")], clock())
    first = store.lease("add", 30, clock())
    store.complete(first, clock(), updates={"external_userid": "wm1"}, enqueue_next=True)
    w = store.lease("welcome", 30, clock())
    store.complete(w, clock(), updates={"welcome_status": "sent"})
    store.retry(store.lease("add", 30, clock()), clock() + 60, Failure(-1, "busy", "retry"), clock())
    store.bury(store.lease("add", 30, clock()), Failure(60111, "no such staff", "dead"), clock())
    held = store.lease("add", 30, clock())
    store.mark_intent(held, clock())
    return held


def test_copy_between_data_dirs_keeps_every_outcome(tmp_path, clock):
    src = open_store(str(tmp_path / "src"), **KW)
    held = fill(src, clock)
    before = src.counts()
    src.release(held, clock())  # a run that stopped gives its items back...
    held = src.lease("add", 30, clock())
    src.mark_intent(held, clock())
    assert src.has_leases()
    src.close()
    refused = cli("store", "copy", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "dst"), check=False)
    assert refused.returncode == 2 and "leased" in refused.stderr  # ...but one is still working

    src = open_store(str(tmp_path / "src"), **KW)
    src.reclaim(clock(), {int(held.token.split("-")[-2])})  # its worker is gone
    assert not src.has_leases()
    leads_before = {x["id"]: x for x in src.leads()}
    sid = src.store_id()
    src.close()
    done = cli("store", "copy", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "dst"), "--json")
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"] and result["leads"] == 7 and result["ledger"] == 1

    dst = open_store(str(tmp_path / "dst"), **KW)
    after = {x["id"]: x for x in dst.leads()}
    assert after.keys() == leads_before.keys()
    for lid, x in after.items():
        for stage in ("add", "welcome", "writeback"):
            old, new = leads_before[lid].get(stage), x.get(stage)
            assert (old is None) == (new is None)
            if old:
                assert new["state"] == ("ready" if old["state"] in ("delayed", "leased") else old["state"])
                assert new.get("intent") == old.get("intent") and new.get("errcode") == old.get("errcode")
    assert dst.store_id() == sid and dst.welcome_ledger("a", "wm1") is not None
    assert dst.dead_by_code() == {"a": {"add": {"60111": 1}}}
    counts = dst.counts()
    assert counts["a"]["imported"] == before["a"]["imported"] and counts["a"]["skipped"] == 1
    assert dst.check() == []
    assert dst.find_phone("a", "+8613800130000") == 1  # dedupe carried over
    assert dst.put_leads("a", [lead(phone="+8613800130000")], clock()).accepted == 0
    dst.close()
    again = cli("store", "copy", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "dst"), check=False)
    assert again.returncode == 2 and "already holds leads" in again.stderr


def test_copy_to_redis_and_back(tmp_path, clock):
    client = redis_client_or_skip()
    namespace = f"wecomctl-test-{uuid.uuid4().hex[:10]}"
    url = f"{REDIS_URL}?namespace={namespace}"
    try:
        src = open_store(str(tmp_path / "src"), **KW)
        fill(src, clock)
        src.reclaim(clock(), set(range(1, 2**22)))  # every worker gone
        before = [(x["id"], x["phone"], {s: (x.get(s) or {}).get("state") for s in ("add", "welcome")})
                  for x in src.leads()]
        src.close()
        up = cli("store", "copy", "--from", str(tmp_path / "src"), "--to", url, "--json")
        assert json.loads(up.stdout)["ok"], up.stdout
        assert "password" not in up.stdout
        down = cli("store", "copy", "--from", url, "--to", str(tmp_path / "back"), "--json")
        assert json.loads(down.stdout)["ok"], down.stdout
        back = open_store(str(tmp_path / "back"), **KW)
        after = [(x["id"], x["phone"], {s: (x.get(s) or {}).get("state") for s in ("add", "welcome")})
                 for x in back.leads()]
        assert [a[:2] for a in after] == [b[:2] for b in before]
        assert back.check() == [] and back.welcome_ledger("a", "wm1") is not None
        back.close()
    finally:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)


def test_copy_refuses_a_store_a_run_is_working_on(tmp_path, clock):
    import time

    src = open_store(str(tmp_path / "src"), **KW)
    src.put_leads("a", [lead()], clock())
    # a run whose items all wait to retry holds no lease, but it is alive
    src.set_flag("heartbeat", {"at": time.time(), "by": "host-123"})
    src.close()
    refused = cli("store", "copy", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "dst"), check=False)
    assert refused.returncode == 2 and "host-123" in refused.stderr and "stop every run" in refused.stderr
    src = open_store(str(tmp_path / "src"), **KW)
    src.set_flag("heartbeat", {"at": time.time() - 60, "by": "host-123"})  # that run ended a minute ago
    src.close()
    assert cli("store", "copy", "--from", str(tmp_path / "src"), "--to", str(tmp_path / "dst")).returncode == 0


@pytest.mark.parametrize("backend", ["disk", "redis"])
def test_copy_after_a_killed_run_gives_its_expired_leases_back(tmp_path, backend):
    # kill -9 leaves leases behind; once they have expired the copy goes ahead, with the
    # items ready (the leased one keeps its intent, settled before any new call).
    import time

    from conftest import FakeClock

    if backend == "redis":
        client = redis_client_or_skip()
        namespace = f"wecomctl-test-{uuid.uuid4().hex[:10]}"
        location = f"{REDIS_URL}?namespace={namespace}"
    else:
        location = str(tmp_path / "src")
    try:
        past = FakeClock(time.time() - 1000)  # the killed run leased these 1000 s ago
        src = open_store(location, **KW)
        src.put_leads("a", [lead(phone=f"+861380013{i:04d}") for i in range(3)], past())
        held = src.lease("add", 30, past())
        src.mark_intent(held, past())
        src.lease("add", 30, past())
        assert src.has_leases()
        src.close()
        done = cli("store", "copy", "--from", location, "--to", str(tmp_path / "dst"), "--json", check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["ok"]
        dst = open_store(str(tmp_path / "dst"), **KW)
        states = sorted(x["add"]["state"] for x in dst.leads())
        intents = [x["add"].get("intent") for x in dst.leads() if x["add"].get("intent")]
        assert states == ["ready"] * 3 and len(intents) == 1 and dst.check() == []
        dst.close()
    finally:
        if backend == "redis":
            keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
            if keys:
                client.delete(*keys)
