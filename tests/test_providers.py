"""Providers against the real simulator: lookups that settle an interrupted 企业群发, and the
gateway's request_id dedupe that makes send_text safe to repeat."""

import time

import httpx
import pytest

from conftest import NoLimit

from wecomctl.config import Secret
from wecomctl.simulator import SimConfig, start_in_thread
from wecomctl.wecom.client import GatewayClient, HttpApi, WecomClient
from wecomctl.wecom.providers import GatewayAdd, GatewayWelcome, MsgTemplateWelcome
from wecomctl.wecom.token import TokenCache



@pytest.fixture
def sim():
    sc = SimConfig()
    with start_in_thread(sc) as handle:
        yield sc, handle


def clients(tmp_path, sc, url):
    api = HttpApi(httpx.Client(), NoLimit())
    gw = GatewayClient(url, Secret(sc.gateway_key), api)
    wc = WecomClient(url, sc.corp_id, Secret(sc.corp_secret), api,
                     lambda fetch: TokenCache(str(tmp_path / "tok"), sc.corp_id, "app", 60, fetch))
    return gw, wc


def lead_for(gw, phone="+8613800138000", owner="zhangsan", campaign="c"):
    lead = {"phone": phone, "owner": owner, "campaign": campaign, "name": "张三"}
    lead.update(GatewayAdd(gw).add(lead, time.time()))
    return lead


def test_msg_template_lookup_finds_a_task_that_happened_and_not_one_that_did_not(tmp_path, sim):
    sc, handle = sim
    gw, wc = clients(tmp_path, sc, handle.url)
    a, b = lead_for(gw), lead_for(gw, phone="+8613900139000")
    p = MsgTemplateWelcome(wc)
    since = time.time()
    assert p.send(a, "您好张三", since) == "task_created"
    assert p.resolve(a, "您好张三", since, time.time()) is True
    assert p.resolve(b, "您好张三", since, time.time()) is False  # never sent to b
    assert p.resolve(a, "another text", since, time.time()) is False
    assert handle.stats()["welcomes"] == 1


def test_gateway_send_text_with_the_same_request_id_greets_once(tmp_path, sim):
    sc, handle = sim
    gw, _ = clients(tmp_path, sc, handle.url)
    a = lead_for(gw)
    p = GatewayWelcome(gw)
    assert p.send(a, "hi", time.time()) == "sent"
    assert p.send(a, "hi", time.time()) == "already_sent"  # e.g. a redelivery after a kill
    other_campaign = dict(a, campaign="d")
    assert p.send(other_campaign, "hi", time.time()) == "sent"  # one welcome per campaign
    stats = handle.stats()
    assert stats["welcomes"] == 2
