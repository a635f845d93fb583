"""The add and welcome providers: one small class per route, same shape each.

add:     gateway        the add-by-phone gateway (returns external_userid, maybe a welcome_code)
welcome: msg_template   official 企业群发 add_msg_template, sender = the lead's owner
         gateway        the gateway's send_text
         welcome_code   official send_welcome_msg with the code relayed from the add event
Each returns a status string or raises ApiError.
"""

from __future__ import annotations

from typing import Any

from wecomctl.errors import ApiError
from wecomctl.wecom.client import GatewayClient, WecomClient


class GatewayAdd:
    def __init__(self, gateway: GatewayClient):
        self.gateway = gateway

    def add(self, lead: dict[str, Any], now: float) -> dict[str, Any]:
        data = self.gateway.add_by_phone(lead["phone"], lead["owner"])
        euid = data.get("external_userid")
        if not euid:
            raise ApiError("add_by_phone", None, "no external_userid in the gateway's answer", "retry", "bad answer")
        return {
            "external_userid": euid,
            "add_status": data.get("status", "added"),
            "welcome_code": data.get("welcome_code"),
            "welcome_code_at": now if data.get("welcome_code") else None,
        }


class MsgTemplateWelcome:
    api = "add_msg_template"

    def __init__(self, client: WecomClient):
        self.client = client

    def send(self, lead: dict[str, Any], text: str, now: float) -> str:
        euid = lead["external_userid"]
        data = self.client.post(self.api, "/cgi-bin/externalcontact/add_msg_template", {
            "chat_type": "single", "external_userid": [euid], "sender": lead["owner"],
            "text": {"content": text},
        })
        if euid in (data.get("fail_list") or []):
            raise ApiError(self.api, None, f"WeCom put {euid} in fail_list: not a customer of {lead['owner']}",
                           "dead", "customer cannot be targeted")
        # 企业群发 creates a task the staff member confirms in the WeCom client.
        return "task_created"


class GatewayWelcome:
    api = "send_text"

    def __init__(self, gateway: GatewayClient):
        self.gateway = gateway

    def send(self, lead: dict[str, Any], text: str, now: float) -> str:
        self.gateway.send_text(lead["owner"], lead["external_userid"], text)
        return "sent"


class WelcomeCodeWelcome:
    api = "send_welcome_msg"
    CODE_TTL_S = 20.0

    def __init__(self, client: WecomClient):
        self.client = client

    def send(self, lead: dict[str, Any], text: str, now: float) -> str:
        code = lead.get("welcome_code")
        if not code:
            raise ApiError(self.api, None, "no welcome_code: WeCom sends none when the two were already friends",
                           "dead", "no welcome_code")
        self.client.post(self.api, "/cgi-bin/externalcontact/send_welcome_msg",
                         {"welcome_code": code, "text": {"content": text}})
        return "sent"
