"""The add and welcome providers: one small class per route, same shape each.

add:     gateway        the add-by-phone gateway (returns external_userid, maybe a welcome_code)
welcome: msg_template   official 企业群发 add_msg_template, sender = the lead's owner
         gateway        the gateway's send_text
         welcome_code   official send_welcome_msg with the code relayed from the add event

Each call returns a status string or raises ApiError. Repeating a call that may already
have happened (its worker died, or its answer was lost) is safe only where the other side
dedupes: `idempotent` says so — the gateway answers a repeated add with "already_added"
and a repeated send_text request_id with the first msgid; WeCom answers a reused
welcome_code with 41051. A repeated 企业群发 would greet twice, so that provider instead
`resolve`s the question: it looks up the sender's 群发 tasks since the intent and tells
whether one already reaches the customer.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import tenacity

from wecomctl.errors import ApiError
from wecomctl.wecom.client import GatewayClient, WecomClient

OnSend = Callable[[], bool] | None


class GatewayAdd:
    api = "add_by_phone"
    idempotent = True

    def __init__(self, gateway: GatewayClient):
        self.gateway = gateway

    def add(self, lead: dict[str, Any], now: float, on_send: OnSend = None) -> dict[str, Any]:
        data = self.gateway.add_by_phone(lead["phone"], lead["owner"], on_send=on_send)
        euid = data.get("external_userid")
        if not euid:
            raise ApiError(self.api, None, "no external_userid in the gateway's answer", "retry", "bad answer")
        return {
            "external_userid": euid,
            "add_status": data.get("status", "added"),
            "welcome_code": data.get("welcome_code"),
            "welcome_code_at": now if data.get("welcome_code") else None,
        }


class MsgTemplateWelcome:
    api = "add_msg_template"
    idempotent = False
    LOOKBACK_S = 60  # WeCom's clock and ours may differ a little

    def __init__(self, client: WecomClient):
        self.client = client

    def send(self, lead: dict[str, Any], text: str, now: float, on_send: OnSend = None,
             attachments: list | tuple = ()) -> str:
        euid = lead["external_userid"]
        body = {"chat_type": "single", "external_userid": [euid], "sender": lead["owner"], "text": {"content": text}}
        if attachments:
            body["attachments"] = list(attachments)
        data = self.client.post(self.api, "/cgi-bin/externalcontact/add_msg_template", body, on_send=on_send)
        if euid in (data.get("fail_list") or []):
            raise ApiError(self.api, None, f"WeCom put {euid} in fail_list: not a customer of {lead['owner']}",
                           "dead", "customer cannot be targeted")
        # 企业群发 creates a task the staff member confirms in the WeCom client.
        return "task_created"

    def resolve(self, lead: dict[str, Any], text: str, since: float, now: float) -> bool:
        """Did a 群发 from the lead's owner with this text reach this customer since `since`?

        The sender's task list carries each task's text, so only tasks with exactly this
        text are opened to see whom they reach: a few calls, not one per task.
        """
        euid, owner = lead["external_userid"], lead["owner"]
        cursor = ""
        while True:
            page = self._post("get_groupmsg_list_v2", "/cgi-bin/externalcontact/get_groupmsg_list_v2", {
                "chat_type": "single", "start_time": int(since) - self.LOOKBACK_S, "end_time": int(now) + 60,
                "creator": owner, "filter_type": 2, "limit": 100, "cursor": cursor,
            })
            for msg in page.get("group_msg_list") or []:
                content = (msg.get("text") or {}).get("content")
                if content not in (None, text):
                    continue
                if self._reaches(msg["msgid"], owner, euid):
                    return True
            cursor = page.get("next_cursor") or ""
            if not cursor:
                return False

    def _reaches(self, msgid: str, owner: str, euid: str) -> bool:
        cursor = ""
        while True:
            page = self._post("get_groupmsg_send_result", "/cgi-bin/externalcontact/get_groupmsg_send_result",
                              {"msgid": msgid, "userid": owner, "limit": 1000, "cursor": cursor})
            if any(r.get("external_userid") == euid for r in page.get("send_list") or []):
                return True
            cursor = page.get("next_cursor") or ""
            if not cursor:
                return False

    def _post(self, api: str, path: str, body: dict) -> dict:
        """A lookup call, retried in place on transient errors: the answer settles an item
        that cannot go back through the queue without losing what is known about it."""
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, ApiError) and e.kind in ("retry", "network", "throttle")),
            wait=tenacity.wait_random_exponential(multiplier=0.2, max=3), stop=tenacity.stop_after_attempt(5), reraise=True)
        return retrying(self.client.post, api, path, body)


class GatewayWelcome:
    api = "send_text"
    idempotent = True  # request_id: the gateway sends a repeated request once

    def __init__(self, gateway: GatewayClient):
        self.gateway = gateway

    def send(self, lead: dict[str, Any], text: str, now: float, on_send: OnSend = None,
             attachments: list | tuple = ()) -> str:
        # The welcome's idempotency key: one per (campaign, customer).
        key = hashlib.sha256(f"{lead['campaign']}\0{lead['external_userid']}".encode()).hexdigest()[:32]
        data = self.gateway.send_text(lead["owner"], lead["external_userid"], text, request_id=f"welcome-{key}",
                                      on_send=on_send)
        return "already_sent" if data.get("duplicate") else "sent"


class WelcomeCodeWelcome:
    api = "send_welcome_msg"
    idempotent = True  # a reused code answers 41051 "already delivered"

    def __init__(self, client: WecomClient):
        self.client = client

    def send(self, lead: dict[str, Any], text: str, now: float, on_send: OnSend = None,
             attachments: list | tuple = ()) -> str:
        code = lead.get("welcome_code")
        if not code:
            raise ApiError(self.api, None, "no welcome_code: WeCom sends none when the two were already friends",
                           "dead", "no welcome_code")
        body = {"welcome_code": code, "text": {"content": text}}
        if attachments:
            body["attachments"] = list(attachments)
        self.client.post(self.api, "/cgi-bin/externalcontact/send_welcome_msg", body, on_send=on_send)
        return "sent"
