"""Alerts to a WeCom group robot (群机器人 webhook, msgtype markdown).

A storm must send one message, not thousands. Two rules, with their state in the store so
that every process and every cron invocation share it:
  - an alert key that was sent is not sent again within `repeat_min` while it lasts;
  - at most one message per `min_interval_s`: alerts arising meanwhile wait and go
    together in the next one (a fatal stop does not wait).
The robot's key is a secret: it is never logged, and errors show the URL without it.
"""

from __future__ import annotations

import logging
from typing import Callable

import httpx

from wecomctl.config import Settings
from wecomctl.report.health import Alert

log = logging.getLogger("wecomctl.alerts")

MAX_BYTES = 4000  # the robot refuses markdown over 4096 bytes


class Notifier:
    def __init__(self, settings: Settings, store, clock: Callable[[], float],
                 post: Callable[..., httpx.Response] | None = None):
        self.settings, self.store, self.clock = settings, store, clock
        self._post = post or httpx.post

    @property
    def enabled(self) -> bool:
        return bool(self.settings.robot_key())

    def due(self, alerts: list[Alert]) -> list[Alert]:
        """The alerts not sent within repeat_min."""
        now, repeat = self.clock(), self.settings.alerts.repeat_min * 60
        out = []
        for a in alerts:
            sent = self.store.get_flag(f"alert:{a.key}")
            if sent is None or now - sent >= repeat:
                out.append(a)
        return out

    def notify(self, alerts: list[Alert], campaign_hint: str = "") -> list[Alert]:
        """Send what is due in one message; returns what was sent."""
        if not self.enabled:
            return []
        due = self.due(alerts)
        if not due:
            return []
        now = self.clock()
        last = self.store.get_flag("alert:_last_message")
        urgent = any(a.key == "fatal" for a in due)
        if last is not None and now - last < self.settings.alerts.min_interval_s and not urgent:
            return []  # they wait for the next message
        self.store.set_flag("alert:_last_message", now)
        if not self._send(self._render(due, campaign_hint)):
            return []
        for a in due:
            self.store.set_flag(f"alert:{a.key}", now)
        return due

    @staticmethod
    def _render(alerts: list[Alert], hint: str) -> str:
        head = f"### wecomctl{f' · {hint}' if hint else ''}: {len(alerts)} alert{'s' if len(alerts) > 1 else ''}"
        lines = [head] + [f"> {a.text}" for a in alerts]
        text = "\n".join(lines)
        while len(text.encode("utf-8")) > MAX_BYTES and len(lines) > 2:
            lines.pop(-1)
            text = "\n".join(lines + ["> … and more: run `wecomctl status`"])
        return text

    def _send(self, content: str) -> bool:
        url = self.settings.alerts.robot_url
        body = {"msgtype": "markdown", "markdown": {"content": content}}
        try:
            resp = self._post(url, params={"key": self.settings.robot_key().get()}, json=body, timeout=5.0)
            data = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("could not send an alert to the group robot at %s: %s", url, type(exc).__name__)
            return False
        if data.get("errcode") != 0:
            where = (f"${self.settings.alerts.robot_key_env}" if self.settings.alerts.robot_key_env
                     else "alerts.robot_key")
            log.warning("the group robot at %s refused an alert: errcode %s %s (is the robot's key in %s right? "
                        "it is the key= part of the webhook URL shown in the group's robot settings)",
                        url, data.get("errcode"), data.get("errmsg"), where)
            return False
        return True


def check_and_notify(store, settings: Settings, clock: Callable[[], float] = None) -> list[Alert]:
    """Evaluate the alert rules now and send what is due. Never raises: a run must not
    stop because its alerting failed."""
    import time

    from wecomctl.report import health

    clock = clock or time.time
    notifier = Notifier(settings, store, clock)
    if not notifier.enabled:
        return []
    try:
        snap = health.snapshot(store, settings, clock())
        return notifier.notify([health.Alert(a["key"], a["text"]) for a in snap["alerts"]])
    except Exception as exc:  # noqa: BLE001 - alerting is best effort; say so and go on
        log.warning("alert check failed: %s", type(exc).__name__)
        return []
