"""Tests of the WeCom simulator: state.py with a hand-driven clock, then a few over real sockets."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from wecomctl.errors import ConfigError
from wecomctl.simulator import SimConfig, SimState, external_userid, start_in_thread, start_process

SECRET = SimConfig().corp_secret
KEY = SimConfig().gateway_key
AUTH = f"Bearer {KEY}"
CORP = SimConfig().corp_id


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(clock: Clock | None = None, seed: int = 0, **knobs) -> SimState:
    return SimState(SimConfig(**knobs), now=clock or Clock(), rng=random.Random(seed), wall=lambda: 0.0)


def body(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def add(st: SimState, mobile: str = "+8613800138000", userid: str = "zhangsan") -> dict:
    return st.add_by_phone(AUTH, body({"mobile": mobile, "userid": userid}))


def token(st: SimState) -> str:
    return st.gettoken(CORP, SECRET)["access_token"]


def call(st: SimState, api: str) -> int:
    """One call through the fault gates only (begin + busy + finish); returns the fault errcode."""
    ticket, code = st.begin(api)
    if code == 0 and st.busy(api):
        code = -1
    st.finish(ticket, code)
    return code


# ---- tokens ------------------------------------------------------------------------------
def test_gettoken_credentials_and_same_token_within_validity():
    clock = Clock()
    st = make(clock, token_ttl_s=100)
    assert st.gettoken("wrong", SECRET)["errcode"] == 40013
    assert st.gettoken(CORP, "wrong")["errcode"] == 40001
    assert st.gettoken(CORP, None)["errcode"] == 40001
    first = st.gettoken(CORP, SECRET)
    assert first["errcode"] == 0 and len(first["access_token"]) >= 32 and first["expires_in"] == 100
    clock.t += 30
    again = st.gettoken(CORP, SECRET)
    assert again["access_token"] == first["access_token"] and again["expires_in"] == 70


def test_token_expiry_gives_42001_then_a_new_token():
    clock = Clock()
    st = make(clock, token_ttl_s=100)
    tok = token(st)
    assert st.check_token(tok) == 0
    clock.t += 99.9
    assert st.check_token(tok) == 0
    clock.t += 0.1
    assert st.check_token(tok) == 42001
    assert st.add_msg_template(tok, b"{}")["errcode"] == 42001
    assert st.check_token("nope") == 40014
    assert st.check_token(None) == 41001 and st.check_token("") == 41001
    new = token(st)
    assert new != tok and st.check_token(new) == 0 and st.check_token(tok) == 42001


# ---- faults ------------------------------------------------------------------------------
def test_rate_limit_blocks_until_window_end_then_recovers():
    clock = Clock(10.0)
    st = make(clock, rate_limit=3, rate_window_s=1.0)
    assert [call(st, "send_text") for _ in range(3)] == [0, 0, 0]
    assert call(st, "send_text") == 45009  # the 4th in the window
    assert call(st, "add_by_phone") == 0  # limits are per API
    clock.t = 10.999
    assert call(st, "send_text") == 45009  # blocked for the rest of the window
    clock.t = 11.0
    # Blocked calls did not count toward this window: it admits 3 again.
    assert [call(st, "send_text") for _ in range(4)] == [0, 0, 0, 45009]
    assert st.stats()["errors"]["send_text"] == {"45009": 3}
    assert st.stats()["calls"]["send_text"] == 9


def test_rate_limit_with_block_s_outlasts_the_window():
    clock = Clock(10.5)
    st = make(clock, rate_limit=1, rate_window_s=1.0, block_s=2.5)
    assert call(st, "gettoken") == 0
    assert call(st, "gettoken") == 45009  # blocked until 13.0
    clock.t = 12.9
    assert call(st, "gettoken") == 45009
    clock.t = 13.0
    assert [call(st, "gettoken") for _ in range(2)] == [0, 45009]


def test_concurrency_limit_45033_and_max_in_flight():
    st = make(max_concurrency=1)
    t1, c1 = st.begin("send_text")
    t2, c2 = st.begin("send_text")
    assert (c1, c2) == (0, 45033)
    st.finish(t2, c2)
    assert st.begin("add_by_phone")[1] == 0  # per API
    st.finish(t1, 0)
    t3, c3 = st.begin("send_text")
    assert c3 == 0
    st.finish(t3, 0)
    s = st.stats()
    assert s["max_in_flight"]["send_text"] == 1 and s["in_flight"]["send_text"] == 0
    assert s["errors"]["send_text"] == {"45033": 1}


def test_busy_rate_is_seeded_and_roughly_right_and_never_for_gettoken():
    runs = []
    for _ in range(2):
        st = make(seed=42, busy_rate=0.3)
        runs.append([call(st, "send_text") for _ in range(5000)])
    assert runs[0] == runs[1]  # same seed, same faults
    share = runs[0].count(-1) / 5000
    assert 0.27 < share < 0.33
    st = make(seed=42, busy_rate=1.0)
    assert call(st, "gettoken") == 0 and call(st, "send_text") == -1


def test_latency_with_jitter_stays_in_range():
    st = make(latency_ms=100, latency_jitter_ms=50)
    delays = [st.delay() for _ in range(200)]
    assert all(0.1 <= d <= 0.15 for d in delays) and len(set(delays)) > 1
    assert make().delay() == 0.0


# ---- gateway and welcome codes ---------------------------------------------------------
def test_add_by_phone_ids_statuses_and_unknown_suffix():
    st = make()
    r = add(st)
    assert r["status"] == "added" and r["external_userid"] == external_userid("+8613800138000")
    assert r["external_userid"].startswith("wm") and len(r["external_userid"]) == 32
    again = add(st)
    assert again["status"] == "already_added" and "welcome_code" not in again
    assert again["external_userid"] == r["external_userid"]
    other = add(st, userid="lisi")  # same customer, another staff member: a new relationship
    assert other["status"] == "added" and other["external_userid"] == r["external_userid"]
    assert add(st, "+8613800138044")["errcode"] == 910001
    assert add(st, "13800138000")["errcode"] == 40035
    assert add(st, "+86138")["errcode"] == 40035
    assert add(st, userid="nobody")["errcode"] == 60111
    assert st.add_by_phone(None, b"{}")["errcode"] == 910401
    assert st.add_by_phone("Bearer wrong", b"{}")["errcode"] == 910401
    assert st.stats()["adds"] == 2
    assert add(make(unknown_suffix=""), "+8613800138044")["status"] == "added"


def test_welcome_code_expires_after_ttl_and_is_single_use():
    clock = Clock()
    st = make(clock)
    tok = token(st)
    msg = {"text": {"content": "您好"}}
    code = add(st)["welcome_code"]
    clock.t += 20.001
    assert st.send_welcome_msg(tok, body({"welcome_code": code, **msg}))["errcode"] == 41050
    code = add(st, "+8613800138001")["welcome_code"]
    clock.t += 19.9
    # A failed call does not use the code up.
    assert st.send_welcome_msg(tok, body({"welcome_code": code, "text": {"content": ""}}))["errcode"] == 44004
    assert st.send_welcome_msg(tok, body({"welcome_code": code, **msg}))["errcode"] == 0
    assert st.send_welcome_msg(tok, body({"welcome_code": code, **msg}))["errcode"] == 41051
    clock.t += 60
    assert st.send_welcome_msg(tok, body({"welcome_code": code, **msg}))["errcode"] == 41051
    assert st.send_welcome_msg(tok, body({"welcome_code": "unknown", **msg}))["errcode"] == 41050
    assert st.send_welcome_msg(tok, body(msg))["errcode"] == 41049
    assert st.stats()["welcomes"] == 1


def test_duplicate_welcomes_count_recipients_across_endpoints():
    st = make()
    tok = token(st)
    a = add(st, "+8613800138001")
    b = add(st, "+8613800138002")
    ea, eb = a["external_userid"], b["external_userid"]
    send = lambda e: st.send_text(AUTH, body({"userid": "zhangsan", "external_userid": e, "text": "您好"}))  # noqa: E731
    assert send(ea)["errcode"] == 0
    assert send(ea)["errcode"] == 0
    r = st.add_msg_template(tok, body({"sender": "zhangsan", "external_userid": [ea, eb, eb, "wmnobody"],
                                       "text": {"content": "活动"}}))
    assert r["errcode"] == 0 and r["fail_list"] == ["wmnobody"] and r["msgid"].startswith("msg")
    assert st.send_welcome_msg(tok, body({"welcome_code": b["welcome_code"], "text": {"content": "hi"}}))["errcode"] == 0
    s = st.stats()
    assert s["welcomes"] == 5 and s["recipients"] == 2
    assert s["duplicate_welcomes"] == 2  # ea thrice and eb twice: two recipients
    # Not a customer of that sender: fail_list / 84061.
    assert st.add_msg_template(tok, body({"sender": "lisi", "external_userid": [ea], "text": {"content": "x"}}))["fail_list"] == [ea]
    assert st.send_text(AUTH, body({"userid": "lisi", "external_userid": ea, "text": "x"}))["errcode"] == 84061
    st.reset()
    s = st.stats()
    assert s["welcomes"] == s["adds"] == s["relationships"] == 0 and s["calls"]["send_text"] == 0
    assert st.send_text(AUTH, body({"userid": "zhangsan", "external_userid": ea, "text": "x"}))["errcode"] == 84061


def test_add_msg_template_checks_in_order():
    st = make()
    tok = token(st)
    e = add(st)["external_userid"]
    ok = {"sender": "zhangsan", "external_userid": [e], "text": {"content": "x"}}

    def code(raw_or_obj) -> int:
        raw = raw_or_obj if isinstance(raw_or_obj, bytes) else body(raw_or_obj)
        return st.add_msg_template(tok, raw)["errcode"]

    assert code(json.dumps({**ok, "text": {"content": "您好"}}).encode()) == 40033
    assert code(b"{not json") == 40035 and code(b"[]") == 40035
    assert code({**ok, "sender": "nobody"}) == 60111
    assert code({**ok, "external_userid": []}) == 41048
    assert code({k: v for k, v in ok.items() if k != "external_userid"}) == 41048
    over = st.add_msg_template(tok, body({**ok, "external_userid": ["wm%d" % i for i in range(10_001)]}))
    assert over["errcode"] == 40035 and "10000" in over["errmsg"]
    assert code({**ok, "text": {"content": ""}}) == 44004
    assert code({**ok, "text": {"content": ""}, "attachments": [{"msgtype": "link"}]}) == 0
    assert code({**ok, "text": {"content": "字" * 1333 + "a"}}) == 0  # exactly 4000 bytes
    assert code({**ok, "text": {"content": "字" * 1334}}) == 45002  # 4002 bytes
    assert code({**ok, "attachments": [{"msgtype": "link"}] * 10}) == 41064
    assert code({**ok, "text": {"content": "x" * 4001}, "attachments": [{}] * 10}) == 45002


def test_send_text_checks():
    st = make()
    e = add(st)["external_userid"]

    def code(**kw) -> int:
        return st.send_text(AUTH, body({"userid": "zhangsan", "external_userid": e, "text": "x", **kw}))["errcode"]

    assert code(userid="nobody") == 60111
    assert code(external_userid="wmnobody") == 84061
    assert code(text="") == 44004
    assert code(text="a" * 4001) == 45002
    assert st.send_text(AUTH, json.dumps({"userid": "zhangsan", "external_userid": e, "text": "好"}).encode())["errcode"] == 40033
    assert st.send_text("Bearer nope", b"{}")["errcode"] == 910401
    assert code() == 0


# ---- config ------------------------------------------------------------------------------
def test_config_yaml_and_no_secrets_shown(tmp_path):
    p = tmp_path / "sim.yaml"
    p.write_text("simulator:\n  rate_limit: 5\n  latency_ms: 20\n  unknown_suffix: 99\n  staff: [a, b]\n"
                 "  block_s: 2\n  extra_knob: whatever\nwecom: {}\n", encoding="utf-8")
    cfg = SimConfig.from_yaml(p)
    assert (cfg.rate_limit, cfg.latency_ms, cfg.unknown_suffix, cfg.staff, cfg.block_s) == (5, 20.0, "99", ("a", "b"), 2.0)
    p.write_text("rate_limit: lots\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="rate_limit"):
        SimConfig.from_yaml(p)
    p.write_text("busy_rate: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="busy_rate"):
        SimConfig.from_yaml(p)
    shown = repr(SimConfig()) + json.dumps(SimConfig().public_dict())
    assert SECRET not in shown and KEY not in shown


# ---- over real sockets ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim():
    with start_in_thread(SimConfig(seed=7)) as handle:
        yield handle


@pytest.fixture
def client(sim):
    with httpx.Client(base_url=sim.url, trust_env=False, timeout=10) as c:
        yield c


def test_envelope_utf8_json_without_escapes(sim, client):
    assert sim.url.startswith("http://127.0.0.1:") and sim.port == int(sim.url.rsplit(":", 1)[1])
    r = client.get("/cgi-bin/gettoken", params={"corpid": CORP, "corpsecret": "bad"})
    assert r.status_code == 200 and r.json() == {"errcode": 40001, "errmsg": "invalid credential"}
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    tok = client.get("/cgi-bin/gettoken", params={"corpid": CORP, "corpsecret": SECRET}).json()["access_token"]
    r = client.post("/cgi-bin/externalcontact/add_msg_template", params={"access_token": tok},
                    content=body({"sender": "zhangsan", "external_userid": ["客户甲"], "text": {"content": "您好"}}))
    assert r.status_code == 200 and r.json()["fail_list"] == ["客户甲"]
    assert "客户甲".encode() in r.content and b"\\u" not in r.content
    r = client.post("/cgi-bin/externalcontact/send_welcome_msg", content=b"{}")
    assert r.status_code == 200 and r.json()["errcode"] == 41001


def test_unicode_escape_in_body_gives_40033(client):
    r = client.post("/gateway/v1/add_by_phone", headers={"Authorization": AUTH},
                    content=json.dumps({"mobile": "+8613800138000", "userid": "zhangsan", "note": "您好"}).encode())
    assert r.status_code == 200 and r.json()["errcode"] == 40033


def test_stats_shape_and_no_secrets(sim, client):
    tok = client.get("/cgi-bin/gettoken", params={"corpid": CORP, "corpsecret": SECRET}).json()["access_token"]
    client.post("/gateway/v1/add_by_phone", headers={"Authorization": "Bearer wrong"}, content=b"{}")
    raw = client.get("/_sim/stats").text
    for secret in (SECRET, KEY, tok):
        assert secret not in raw
    s = json.loads(raw)
    apis = {"gettoken", "add_msg_template", "send_welcome_msg", "add_by_phone", "send_text",
            "get_groupmsg_list_v2", "get_groupmsg_send_result"}
    assert set(s["calls"]) == set(s["errors"]) == set(s["max_in_flight"]) == apis
    for k in ("adds", "welcomes", "duplicate_welcomes", "started_at", "config", "call_log_enabled"):
        assert k in s
    assert s["errors"]["add_by_phone"]["910401"] >= 1 and s["calls"]["gettoken"] >= 1
    assert s["config"]["seed"] == 7 and "corp_secret" not in s["config"] and "gateway_key" not in s["config"]
    log = client.get("/_sim/calls", params={"api": "add_by_phone"}).json()
    assert log["count"] == len(log["t"]) == len(log["errcode"]) >= 1 and 910401 in log["errcode"]
    assert client.get("/_sim/calls", params={"api": "nope"}).status_code == 400
    assert client.post("/_sim/reset").json()["errcode"] == 0
    assert sim.stats()["calls"]["add_by_phone"] == 0 and sim.calls("add_by_phone")["count"] == 0


def test_concurrency_limit_over_sockets():
    with start_in_thread(SimConfig(max_concurrency=1, latency_ms=300)) as sim:
        def go(_):
            with httpx.Client(trust_env=False, timeout=10) as c:
                return c.post(sim.url + "/gateway/v1/send_text", headers={"Authorization": AUTH},
                              content=b'{"userid":"zhangsan","external_userid":"wmx","text":"hi"}').json()["errcode"]

        with ThreadPoolExecutor(2) as pool:
            codes = sorted(pool.map(go, range(2)))
        assert codes == [45033, 84061]  # one refused at the door, one let in (then not a customer)
        s = sim.stats()
        assert s["max_in_flight"]["send_text"] == 1 and s["errors"]["send_text"] == {"45033": 1, "84061": 1}


def test_start_process_serves_and_stops():
    with start_process(SimConfig(unknown_suffix="")) as sim:
        r = httpx.post(sim.url + "/gateway/v1/add_by_phone", headers={"Authorization": AUTH},
                       json={"mobile": "+8613800138044", "userid": "lisi"}, trust_env=False)
        assert r.json()["status"] == "added"
        assert sim.stats()["adds"] == 1
    with pytest.raises(httpx.TransportError):
        httpx.get(sim.url + "/_sim/stats", trust_env=False, timeout=2)


def test_sliding_rate_mode_bounds_every_window():
    from wecomctl.simulator import SimConfig, SimState

    t = [100.0]
    st = SimState(SimConfig(rate_limit=3, rate_mode="sliding", block_s=0.0), now=lambda: t[0])

    def call():
        ticket, code = st.begin("send_text")
        st.finish(ticket, code or None)
        return code

    # 3 calls late in one aligned second and 1 early in the next: fixed windows allow it,
    # a sliding window does not.
    for at in (100.7, 100.8, 100.9):
        t[0] = at
        assert call() == 0
    t[0] = 101.1
    assert call() == 45009
    t[0] = 101.75
    assert call() == 0  # 100.7 has left the window
