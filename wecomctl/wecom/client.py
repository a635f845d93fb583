"""HTTP clients for WeCom and the add-by-phone gateway.

This is the boundary where httpx errors and errcodes become the project's ApiError (with
the errcode's class from the table). Every call passes the shared rate limiter first.
Bodies go out as UTF-8 JSON without \\uXXXX escapes (WeCom answers 40033 otherwise).
Secrets and tokens are scrubbed from every message that leaves this module.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx

from wecomctl.config import Secret
from wecomctl.errors import ApiError, ConfigError, NetworkError
from wecomctl.ratelimit.limiter import SlotWaitStopped
from wecomctl.wecom import errcodes


class LeaseLost(Exception):
    """The item's lease expired before the call: someone else has it, do not call."""


def redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def api_error(api: str, errcode: int, errmsg: str) -> ApiError:
    info = errcodes.lookup(errcode)
    return ApiError(api, errcode, errmsg, info.kind, info.meaning)


class HttpApi:
    """Sends one request through the limiter and returns the decoded WeCom envelope."""

    def __init__(self, http: httpx.Client, limiter, should_stop: Callable[[], bool] = lambda: False):
        self.http = http
        self.limiter = limiter
        self.should_stop = should_stop
        self.secrets: list[str] = []

    def send(self, api: str, method: str, url: str, *, params: dict | None = None,
             body: Any = None, headers: dict | None = None, on_send: Callable[[], bool] | None = None) -> dict:
        slot = self.limiter.acquire(api, self.should_stop)
        if not slot:
            raise NetworkError(api, "stopped while waiting for the rate limit")
        # The last moment before the request leaves: the caller records its intent here,
        # so time spent waiting for a rate slot never makes a call look interrupted.
        if on_send is not None and not on_send():
            raise LeaseLost(api)
        content = None
        hdrs = dict(headers or {})
        if body is not None:
            content = json.dumps(body, ensure_ascii=False).encode("utf-8")
            hdrs["Content-Type"] = "application/json; charset=utf-8"
        late = getattr(self.limiter, "late", lambda _api, _slot: False)
        try:
            with self.limiter.hold(api, self.should_stop):
                # Too late for the slot taken (the intent or a concurrency slot took long,
                # the store was down, the thread woke late): take a new one, or the calls
                # held back would all go out together and overrun the window.
                while late(api, slot):
                    slot = self.limiter.acquire(api, self.should_stop)
                    if not slot:
                        raise NetworkError(api, "stopped while waiting for the rate limit")
                resp = self.http.request(method, url, params=params, content=content, headers=hdrs)
        except SlotWaitStopped:
            raise NetworkError(api, "stopped while waiting for a concurrency slot") from None
        except httpx.HTTPError as exc:
            msg = redact(f"{type(exc).__name__}: {exc}", self.secrets)
            # Only a failure to connect proves the request never left.
            unsent = isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout))
            raise NetworkError(api, f"{msg} (is {httpx.URL(url).host} reachable?)", maybe_sent=not unsent) from None
        if resp.status_code != 200:
            # 4xx (wrong URL, refused) and 503/429 mean the request was not carried out.
            code = resp.status_code
            raise NetworkError(api, f"HTTP {code} from {httpx.URL(url).host}{' (check base_url)' if code == 404 else ''}",
                               maybe_sent=code >= 500 and code != 503)
        try:
            data = resp.json()
        except ValueError:
            raise NetworkError(api, "the answer was not JSON", maybe_sent=True) from None
        if not isinstance(data, dict):
            raise NetworkError(api, "the answer was not a JSON object", maybe_sent=True)
        return data


def check(api: str, data: dict) -> dict:
    code = data.get("errcode", 0)
    if code in (0, None):
        return data
    try:
        code = int(code)
    except (TypeError, ValueError):
        raise NetworkError(api, f"errcode is not a number: {code!r}") from None
    raise api_error(api, code, str(data.get("errmsg", "")))


class WecomClient:
    """Official WeCom API calls with the shared access token."""

    def __init__(self, base_url: str, corp_id: str, secret: Secret, http: HttpApi, token_cache_factory):
        if not corp_id:
            raise ConfigError("wecom.corp_id is not set (put your corp ID in the config file)")
        if not secret:
            raise ConfigError("the WeCom secret is not set: export it in the environment variable named by wecom.corp_secret_env (default WECOM_CORP_SECRET)")
        self.base = base_url.rstrip("/")
        self.corp_id = corp_id
        self.secret = secret
        self.http = http
        http.secrets.append(secret.get())
        self.tokens = token_cache_factory(self._gettoken)

    def _gettoken(self) -> tuple[str, float]:
        data = check("gettoken", self.http.send(
            "gettoken", "GET", f"{self.base}/cgi-bin/gettoken",
            params={"corpid": self.corp_id, "corpsecret": self.secret.get()}))
        token = data.get("access_token")
        if not token:
            raise NetworkError("gettoken", "no access_token in the answer")
        self.http.secrets.append(token)
        return token, float(data.get("expires_in", 7200))

    def post(self, api: str, path: str, body: dict, on_send: Callable[[], bool] | None = None) -> dict:
        # 40014/42001: drop the token, fetch once, repeat once; never loop.
        for attempt in (1, 2):
            token = self.tokens.get()
            if token not in self.http.secrets:
                self.http.secrets.append(token)
            data = self.http.send(api, "POST", f"{self.base}{path}", params={"access_token": token}, body=body,
                                  on_send=on_send)
            try:
                return check(api, data)
            except ApiError as exc:
                if exc.kind == "token" and attempt == 1:
                    self.tokens.invalidate(token)
                    continue
                raise
        raise AssertionError("unreachable")


class GatewayClient:
    """The add-by-phone gateway (see README: "The gateway API")."""

    def __init__(self, base_url: str, key: Secret, http: HttpApi):
        if not base_url:
            raise ConfigError("gateway.base_url is not set (the add step needs an add-by-phone gateway)")
        if not key:
            raise ConfigError("the gateway key is not set: export it in the environment variable named by gateway.key_env (default WECOMCTL_GATEWAY_KEY)")
        self.base = base_url.rstrip("/")
        self.key = key
        self.http = http
        http.secrets.append(key.get())

    def _post(self, api: str, path: str, body: dict, on_send: Callable[[], bool] | None = None) -> dict:
        return check(api, self.http.send(api, "POST", f"{self.base}{path}", body=body, on_send=on_send,
                                         headers={"Authorization": f"Bearer {self.key.get()}"}))

    def check_reachable(self) -> None:
        """Raise NetworkError unless the gateway answers HTTP at all (any status will do)."""
        try:
            self.http.http.request("GET", self.base)
        except httpx.HTTPError as exc:
            raise NetworkError("gateway", redact(f"{type(exc).__name__}: {exc}", self.http.secrets)) from None

    def add_by_phone(self, mobile: str, userid: str, on_send: Callable[[], bool] | None = None) -> dict:
        return self._post("add_by_phone", "/gateway/v1/add_by_phone", {"mobile": mobile, "userid": userid}, on_send)

    def send_text(self, userid: str, external_userid: str, text: str, request_id: str | None = None,
                  on_send: Callable[[], bool] | None = None) -> dict:
        """request_id: the gateway sends nothing for a request_id it has seen before."""
        body = {"userid": userid, "external_userid": external_userid, "text": text}
        if request_id:
            body["request_id"] = request_id
        return self._post("send_text", "/gateway/v1/send_text", body, on_send)
