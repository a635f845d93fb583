"""状态回传: POST a lead's final outcome to the business system.

One JSON body per outcome (see `payload`), with the header Idempotency-Key
"{store id}:{lead id}:{version}": the same on every retry of one outcome, new when a
replay produces a new outcome. The receiver stores each key once, so a retry after a lost
answer never records an outcome twice.

Answers: 2xx delivered; 408, 425, 429 and 5xx (and network errors) retried with backoff;
any other 4xx dead-lettered (the receiver refused the body: fix it, then retry-dlq).
"""

from __future__ import annotations

from typing import Any

import httpx

from wecomctl.config import Secret
from wecomctl.errors import ApiError, NetworkError
from wecomctl.ratelimit.limiter import SlotWaitStopped
from wecomctl.report.export import result_row
from wecomctl.wecom.client import HttpApi, redact

API = "writeback"
RETRY_STATUS = {408, 425, 429}


def payload(lead: dict[str, Any], version: int, now: float) -> dict[str, Any]:
    row = result_row(lead)
    row.pop("attempts", None)
    row.pop("writeback_status", None)  # this very delivery
    return {"event": "wecomctl.outcome", "version": version, "at": round(now, 3),
            "lead_id": row.pop("id"), **row}


class WritebackClient:
    def __init__(self, url: str, token: Secret, http: HttpApi, store_id: str):
        self.url, self.token, self.http, self.store_id = url, token, http, store_id
        if token:
            http.secrets.append(token.get())

    def key(self, lead_id: int, version: int) -> str:
        return f"{self.store_id}:{lead_id}:{version}"

    def deliver(self, lead: dict[str, Any], version: int, now: float) -> None:
        """Raises ApiError (kind retry / network / dead) when not delivered."""
        api = self.http
        if not api.limiter.acquire(API, api.should_stop):
            raise NetworkError(API, "stopped while waiting for the rate limit")
        headers = {"Idempotency-Key": self.key(lead["id"], version)}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token.get()}"
        host = httpx.URL(self.url).host
        try:
            with api.limiter.hold(API, api.should_stop):
                resp = api.http.post(self.url, json=payload(lead, version, now), headers=headers)
        except SlotWaitStopped:
            raise NetworkError(API, "stopped while waiting for a concurrency slot") from None
        except httpx.HTTPError as exc:
            raise NetworkError(API, redact(f"{type(exc).__name__}: {exc} (is {host} reachable?)", api.secrets)) from None
        code = resp.status_code
        if 200 <= code < 300:
            return
        body = redact(resp.text, api.secrets)[:200]  # redacted whole: a cut could split a token
        if code in RETRY_STATUS or code >= 500:
            raise ApiError(API, None, f"HTTP {code} from {host}: {body}", "retry", "the business system is busy or down")
        raise ApiError(API, None, f"HTTP {code} from {host}: {body}", "http", "the business system refused the write-back")
