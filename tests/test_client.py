"""The WeCom/gateway boundary: errcodes to exceptions, one token refresh, secrets scrubbed."""

import json

import httpx
import pytest

from conftest import NoLimit
import respx

from wecomctl.config import Secret
from wecomctl.errors import ApiError, ConfigError, NetworkError
from wecomctl.wecom import errcodes
from wecomctl.wecom.client import GatewayClient, HttpApi, WecomClient
from wecomctl.wecom.token import TokenCache

BASE = "http://wecom.test"
SECRET = "s3cr3t-value-123"



def make_client(tmp_path, clock):
    api = HttpApi(httpx.Client(), NoLimit())
    return WecomClient(BASE, "ww1", Secret(SECRET), api,
                       lambda fetch: TokenCache(str(tmp_path / "tok"), "ww1", "app", 60, fetch, clock=clock))


@pytest.mark.parametrize("kind", ["retry", "throttle", "token", "fatal", "dead", "done", "window"])
def test_every_class_in_the_table_maps_to_that_kind(kind):
    codes = [c for c, info in errcodes.table().items() if info.kind == kind]
    assert codes, kind
    for code in codes:
        with respx.mock:
            respx.post(f"{BASE}/x").respond(json={"errcode": code, "errmsg": "m"})
            api = HttpApi(httpx.Client(), NoLimit())
            with pytest.raises(ApiError) as e:
                from wecomctl.wecom.client import check
                check("x", api.send("x", "POST", f"{BASE}/x", body={}))
            assert e.value.kind == kind and e.value.errcode == code


def test_unknown_errcode_is_dead_with_its_errmsg():
    info = errcodes.lookup(999999)
    assert info.kind == "dead"


@respx.mock
def test_token_is_fetched_once_and_refreshed_once_on_42001(tmp_path, clock):
    tok = respx.get(f"{BASE}/cgi-bin/gettoken").mock(side_effect=[
        httpx.Response(200, json={"errcode": 0, "access_token": "T1", "expires_in": 7200}),
        httpx.Response(200, json={"errcode": 0, "access_token": "T2", "expires_in": 7200}),
    ])
    calls = respx.post(f"{BASE}/cgi-bin/p").mock(side_effect=[
        httpx.Response(200, json={"errcode": 0}),
        httpx.Response(200, json={"errcode": 42001, "errmsg": "expired"}),
        httpx.Response(200, json={"errcode": 0}),
    ])
    c = make_client(tmp_path, clock)
    c.post("p", "/cgi-bin/p", {})
    c.post("p", "/cgi-bin/p", {})
    assert tok.call_count == 2 and calls.call_count == 3
    assert calls.calls[2].request.url.params["access_token"] == "T2"


@respx.mock
def test_token_error_twice_does_not_loop(tmp_path, clock):
    respx.get(f"{BASE}/cgi-bin/gettoken").respond(json={"errcode": 0, "access_token": "T", "expires_in": 7200})
    calls = respx.post(f"{BASE}/cgi-bin/p").respond(json={"errcode": 40014, "errmsg": "invalid"})
    c = make_client(tmp_path, clock)
    with pytest.raises(ApiError) as e:
        c.post("p", "/cgi-bin/p", {})
    assert e.value.kind == "token" and calls.call_count == 2


@respx.mock
def test_token_is_shared_through_the_data_dir(tmp_path, clock):
    tok = respx.get(f"{BASE}/cgi-bin/gettoken").respond(json={"errcode": 0, "access_token": "T", "expires_in": 7200})
    respx.post(f"{BASE}/cgi-bin/p").respond(json={"errcode": 0})
    make_client(tmp_path, clock).post("p", "/cgi-bin/p", {})
    make_client(tmp_path, clock).post("p", "/cgi-bin/p", {})  # another process
    assert tok.call_count == 1
    clock.t += 7200 - 59  # inside the refresh margin
    make_client(tmp_path, clock).post("p", "/cgi-bin/p", {})
    assert tok.call_count == 2


@respx.mock
def test_bad_secret_is_fatal_and_never_shows_the_secret(tmp_path, clock):
    respx.get(f"{BASE}/cgi-bin/gettoken").respond(json={"errcode": 40001, "errmsg": "invalid credential"})
    c = make_client(tmp_path, clock)
    with pytest.raises(ApiError) as e:
        c.post("p", "/cgi-bin/p", {})
    assert e.value.kind == "fatal"
    assert SECRET not in str(e.value)


@respx.mock
def test_body_is_utf8_without_unicode_escapes(tmp_path, clock):
    route = respx.post(f"{BASE}/gateway/v1/send_text").respond(json={"errcode": 0})
    gw = GatewayClient(BASE, Secret("k"), HttpApi(httpx.Client(), NoLimit()))
    gw.send_text("zhangsan", "wm1", "您好 😀")
    body = route.calls[0].request.content
    assert b"\\u" not in body and "您好 😀".encode() in body
    assert json.loads(body)["text"] == "您好 😀"
    assert route.calls[0].request.headers["authorization"] == "Bearer k"


@respx.mock
def test_network_errors_are_transient_and_scrubbed():
    respx.get(f"{BASE}/cgi-bin/gettoken").mock(side_effect=httpx.ConnectError(f"refused corpsecret={SECRET}"))
    api = HttpApi(httpx.Client(), NoLimit())
    api.secrets.append(SECRET)
    with pytest.raises(NetworkError) as e:
        api.send("gettoken", "GET", f"{BASE}/cgi-bin/gettoken", params={"corpsecret": SECRET})
    assert e.value.kind == "network" and SECRET not in str(e.value)


@respx.mock
def test_http_500_and_non_json_are_transient():
    respx.post(f"{BASE}/a").respond(500)
    respx.post(f"{BASE}/b").respond(200, text="<html>")
    api = HttpApi(httpx.Client(), NoLimit())
    for path in ("a", "b"):
        with pytest.raises(NetworkError):
            api.send("x", "POST", f"{BASE}/{path}", body={})


def test_missing_secret_says_which_variable(monkeypatch):
    with pytest.raises(ConfigError, match="WECOM_CORP_SECRET"):
        WecomClient(BASE, "ww1", Secret(""), HttpApi(httpx.Client(), NoLimit()), lambda f: None)


@respx.mock
def test_same_token_with_short_remaining_life_is_not_fetched_on_every_call(tmp_path, clock):
    """WeCom returns the same token with its remaining life when asked early."""
    expires_at = clock() + 7200

    def gettoken(request):
        return httpx.Response(200, json={"errcode": 0, "access_token": "T", "expires_in": int(expires_at - clock())})

    tok = respx.get(f"{BASE}/cgi-bin/gettoken").mock(side_effect=gettoken)
    respx.post(f"{BASE}/cgi-bin/p").respond(json={"errcode": 0})
    c = make_client(tmp_path, clock)
    for _ in range(1440):  # a call every 5 s for the token's whole life
        c.post("p", "/cgi-bin/p", {})
        clock.t += 5
    assert tok.call_count <= 12


@respx.mock
def test_a_call_that_missed_its_slot_takes_a_new_one():
    # The intent took longer than the guard (the store was slow or down): going out now on
    # the old slot could put more than the limit in one window.
    import time as _time

    class CountingLimit(NoLimit):
        acquired = 0

        def acquire(self, api, should_stop=None):
            self.acquired += 1
            return _time.time()

        def late(self, api, slot):
            return _time.time() - slot > 0.02

    respx.post(f"{BASE}/x").respond(json={"errcode": 0})
    limiter = CountingLimit()
    api = HttpApi(httpx.Client(), limiter)
    api.send("add_by_phone", "POST", f"{BASE}/x", body={}, on_send=lambda: _time.sleep(0.06) or True)
    assert limiter.acquired == 2
    api.send("add_by_phone", "POST", f"{BASE}/x", body={}, on_send=lambda: True)
    assert limiter.acquired == 3  # in time: one slot
