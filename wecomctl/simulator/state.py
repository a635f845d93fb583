"""All of the simulator's logic, free of sockets and sleeps.

The clock (`now`, monotonic seconds) and the dice (`random.Random`) are injected, so tests
step time by hand and replay the same faults from a seed. The aiohttp layer (server.py)
only parses HTTP, sleeps the latency this module decides, and renders the dicts it returns.

Lifecycle of one API call, as server.py drives it:

    ticket, code = state.begin(api)      # counts the call; 45033 / 45009 decided here
    ... sleep state.delay() unless code == 45033 ...
    if code == 0 and state.busy(api): code = -1
    reply = state.<endpoint>(...) if code == 0 else state.error(code)
    state.finish(ticket, reply["errcode"])
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import re
import time
from collections import deque
from typing import Any, Callable

from wecomctl.simulator.config import SimConfig

APIS = ("gettoken", "add_msg_template", "send_welcome_msg", "add_by_phone", "send_text",
        "get_groupmsg_list_v2", "get_groupmsg_send_result")

ERRMSG = {
    0: "ok",
    -1: "system busy",
    40001: "invalid credential",
    40013: "invalid corpid",
    40014: "invalid access_token",
    41001: "access_token missing",
    42001: "access_token expired",
    40033: "invalid charset: the request contains \\uXXXX escapes, send UTF-8 JSON",
    40035: "invalid parameter",
    41048: "no customer to send to: external_userid is empty",
    41049: "missing welcome_code",
    41050: "welcome_code invalid or expired",
    41051: "welcome message already sent for this welcome_code",
    41064: "too many attachments: at most 9",
    44004: "empty text content",
    45002: "content too large: text is over 4000 bytes",
    45009: "api freq out of limit",
    45033: "concurrency limit exceeded",
    60111: "userid not found",
    84061: "not external contact: no relationship between this userid and external_userid",
    910001: "mobile not found: no WeChat/WeCom account for this number",
    910401: "gateway key invalid",
}

MAX_TEXT_BYTES = 4000
MAX_ATTACHMENTS = 9
MAX_RECIPIENTS = 10_000
CALL_LOG_MAX = 200_000
ESCAPE_RE = re.compile(rb"\\u[0-9a-fA-F]{4}")
MOBILE_RE = re.compile(r"\+\d{8,15}")
_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def error(code: int, errmsg: str | None = None) -> dict[str, Any]:
    return {"errcode": code, "errmsg": errmsg or ERRMSG.get(code, "error")}


def external_userid(mobile: str) -> str:
    """Deterministic id of the customer behind a mobile (same for every staff member, as in WeCom)."""
    return "wm" + hashlib.sha256(mobile.encode()).hexdigest()[:30]


class _Bad(Exception):
    """Raised inside a body check to answer with an errcode."""

    def __init__(self, code: int, errmsg: str | None = None):
        self.reply = error(code, errmsg)


class Ticket:
    __slots__ = ("api", "arrival", "in_flight")

    def __init__(self, api: str, arrival: float, in_flight: bool):
        self.api, self.arrival, self.in_flight = api, arrival, in_flight


class _Api:
    """Per-API counters and fault state."""

    __slots__ = ("calls", "errors", "in_flight", "max_in_flight", "window", "window_count",
                 "blocked_until", "admitted", "log_t", "log_code")

    def __init__(self) -> None:
        self.calls = 0
        self.errors: dict[int, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.window = -1  # index of the current fixed rate window
        self.window_count = 0  # calls admitted in it
        self.blocked_until = -math.inf
        self.admitted: deque[float] = deque()  # sliding mode: arrival times inside the window
        self.log_t: deque[float] = deque(maxlen=CALL_LOG_MAX)
        self.log_code: deque[int] = deque(maxlen=CALL_LOG_MAX)


class SimState:
    def __init__(self, cfg: SimConfig, now: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, wall: Callable[[], float] = time.time):
        cfg.validate()
        self.cfg = cfg
        self.now = now
        self.rng = rng if rng is not None else random.Random(cfg.seed)
        self.wall = wall
        self._staff = frozenset(cfg.staff)
        # token -> expiry (monotonic). Expired tokens stay so that they answer 42001, not
        # 40014; at most one is added per ttl, so this never grows much.
        self._tokens: dict[str, float] = {}
        self._current: str | None = None
        self.reset()

    # ---- stats and reset -------------------------------------------------------------
    def reset(self) -> None:
        """Clear stats, relationships, welcome codes and the call log (tokens stay valid)."""
        self.apis = {a: _Api() for a in APIS}
        self.started_at = self.wall()
        self._started_mono = self.now()
        self.adds = 0
        self.welcomes = 0
        self.duplicate_welcomes = 0
        self._greeted: dict[str, int] = {}  # external_userid -> welcomes received
        self._rel: set[tuple[str, str]] = set()  # (userid, external_userid)
        # code -> [userid, external_userid, issued_at, used]; insertion order = issue order
        self._codes: dict[str, list[Any]] = {}
        self._msg_seq = 0
        # 企业群发 tasks for the lookup APIs: msgid -> (creator, create_time, [external_userid], text)
        self._tasks: dict[str, tuple[str, int, list[str], str]] = {}
        self._requests: dict[str, str] = {}  # send_text request_id -> msgid (gateway dedupe)
        self.robot_messages: list[dict[str, Any]] = []  # what the group robot received
        self.writebacks: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> body stored
        self.writeback_posts = 0
        self.writeback_repeats = 0  # deliveries of a key already stored (deduped)

    def stats(self) -> dict[str, Any]:
        a = self.apis
        return {
            "calls": {k: v.calls for k, v in a.items()},
            "errors": {k: {str(c): n for c, n in v.errors.items()} for k, v in a.items()},
            "adds": self.adds,
            "welcomes": self.welcomes,
            "duplicate_welcomes": self.duplicate_welcomes,
            "recipients": len(self._greeted),
            "relationships": len(self._rel),
            "robot_messages": len(self.robot_messages),
            "writebacks": len(self.writebacks),
            "writeback_posts": self.writeback_posts,
            "writeback_repeats": self.writeback_repeats,
            "max_in_flight": {k: v.max_in_flight for k, v in a.items()},
            "in_flight": {k: v.in_flight for k, v in a.items()},
            "started_at": self.started_at,
            "uptime_s": round(self.now() - self._started_mono, 3),
            "config": self.cfg.public_dict(),
            "call_log_enabled": self.cfg.call_log,
        }

    def calls(self, api: str) -> dict[str, Any]:
        """Arrival times (monotonic s, sorted) and errcodes of the last calls of `api`."""
        st = self.apis[api]
        pairs = sorted(zip(st.log_t, st.log_code))  # finish order != arrival order under jitter
        return {"api": api, "count": len(pairs), "t": [p[0] for p in pairs],
                "errcode": [p[1] for p in pairs]}

    # ---- faults --------------------------------------------------------------------------
    def begin(self, api: str) -> tuple[Ticket, int]:
        """A call arrives: count it and decide concurrency (45033) and rate (45009) faults."""
        cfg, st, t = self.cfg, self.apis[api], self.now()
        st.calls += 1
        if cfg.max_concurrency and st.in_flight >= cfg.max_concurrency:
            return Ticket(api, t, False), 45033
        st.in_flight += 1
        if st.in_flight > st.max_in_flight:
            st.max_in_flight = st.in_flight
        return Ticket(api, t, True), self._rate(st, t)

    def _rate(self, st: _Api, t: float) -> int:
        cfg = self.cfg
        if not cfg.rate_limit:
            return 0
        if t < st.blocked_until:
            return 45009  # blocked calls do not count toward any window
        if cfg.rate_mode == "sliding":
            # The strictest reading: no window of rate_window_s, wherever it starts, may
            # hold more than rate_limit admitted calls.
            recent = st.admitted
            while recent and recent[0] <= t - cfg.rate_window_s:
                recent.popleft()
            if len(recent) < cfg.rate_limit:
                recent.append(t)
                return 0
            st.blocked_until = t + (cfg.rate_window_s if cfg.block_s is None else cfg.block_s)
            return 45009
        w = math.floor(t / cfg.rate_window_s)  # fixed windows aligned to the clock
        if w != st.window:
            st.window, st.window_count = w, 0
        if st.window_count < cfg.rate_limit:
            st.window_count += 1
            return 0
        st.blocked_until = (w + 1) * cfg.rate_window_s if cfg.block_s is None else t + cfg.block_s
        return 45009

    def delay(self) -> float:
        """Seconds of latency for this call (successful or failed alike)."""
        cfg = self.cfg
        d = cfg.latency_ms
        if cfg.latency_jitter_ms:
            d += self.rng.uniform(0.0, cfg.latency_jitter_ms)
        return d / 1000.0

    def busy(self, api: str) -> bool:
        """Roll the -1 dice. gettoken is never busy (a token outage would stall every test)."""
        rate = self.cfg.busy_rate
        return bool(rate) and api != "gettoken" and self.rng.random() < rate

    def finish(self, ticket: Ticket, errcode: int | None) -> None:
        """The call is answered (errcode None: the client went away, nothing to count)."""
        st = self.apis[ticket.api]
        if ticket.in_flight:
            st.in_flight -= 1
        if errcode is None:
            return
        if errcode:
            st.errors[errcode] = st.errors.get(errcode, 0) + 1
        if self.cfg.call_log:
            st.log_t.append(ticket.arrival)
            st.log_code.append(errcode)

    # ---- tokens ----------------------------------------------------------------------------
    def gettoken(self, corpid: str | None, secret: str | None) -> dict[str, Any]:
        if not _same(corpid, self.cfg.corp_id):
            return error(40013)
        if not _same(secret, self.cfg.corp_secret):
            return error(40001)
        t = self.now()
        tok = self._current
        if tok is None or self._tokens[tok] <= t:
            tok = self._random(43)
            self._tokens[tok] = t + self.cfg.token_ttl_s
            self._current = tok
        # Like WeCom, a fetch inside validity returns the same token; expires_in is what is
        # left of it, so a client that trusts expires_in never uses it past expiry.
        left = max(1, math.ceil(self._tokens[tok] - t))
        return {"errcode": 0, "errmsg": "ok", "access_token": tok, "expires_in": left}

    def check_token(self, token: str | None) -> int:
        if not token:
            return 41001
        exp = self._tokens.get(token)
        if exp is None:
            return 40014
        return 42001 if exp <= self.now() else 0

    def check_gateway_key(self, authorization: str | None) -> int:
        scheme, _, key = (authorization or "").partition(" ")
        ok = scheme.lower() == "bearer" and _same(key.strip(), self.cfg.gateway_key)
        return 0 if ok else 910401

    # ---- endpoints -------------------------------------------------------------------------
    def add_msg_template(self, token: str | None, raw: bytes) -> dict[str, Any]:
        try:
            self._need(self.check_token(token))
            body = _parse(raw)
            sender = body.get("sender")
            self._staff_member(sender)
            if body.get("chat_type", "single") != "single":
                raise _Bad(40035, "invalid parameter: only chat_type single is simulated")
            ids = body.get("external_userid")
            if not ids:
                raise _Bad(41048)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise _Bad(40035, "invalid parameter: external_userid must be a list of strings")
            if len(ids) > MAX_RECIPIENTS:
                raise _Bad(40035, "invalid parameter: external_userid over 10000")
            _check_message(body)
        except _Bad as bad:
            return bad.reply
        fail_list, seen = [], set()
        for e in ids:
            if e in seen:
                continue  # one task reaches a customer once however often listed
            seen.add(e)
            if (sender, e) in self._rel:
                self._greet(e)
            else:
                fail_list.append(e)
        msgid = self._msgid()
        text = (body.get("text") or {}).get("content") or ""
        self._tasks[msgid] = (sender, int(self.wall()), [e for e in seen if e not in fail_list], text)
        return {"errcode": 0, "errmsg": "ok", "fail_list": fail_list, "msgid": msgid}

    def get_groupmsg_list_v2(self, token: str | None, raw: bytes) -> dict[str, Any]:
        """企业群发 records by creator and time range (one page; next_cursor always "")."""
        try:
            self._need(self.check_token(token))
            body = _parse(raw)
            start, end = body.get("start_time"), body.get("end_time")
            if not isinstance(start, int) or not isinstance(end, int) or end < start:
                raise _Bad(40035, "invalid parameter: start_time and end_time (epoch seconds) are required")
            creator = body.get("creator")
        except _Bad as bad:
            return bad.reply
        found = [{"msgid": m, "creator": c, "create_time": t, "create_type": 0, "text": {"content": text}}
                 for m, (c, t, _, text) in self._tasks.items()
                 if start <= t <= end and (creator is None or creator == c)]
        return {"errcode": 0, "errmsg": "ok", "next_cursor": "", "group_msg_list": found}

    def get_groupmsg_send_result(self, token: str | None, raw: bytes) -> dict[str, Any]:
        """Who a 企业群发 task reaches (status 1: sent; the simulator's members confirm at once)."""
        try:
            self._need(self.check_token(token))
            body = _parse(raw)
            task = self._tasks.get(body.get("msgid"))
            if task is None:
                raise _Bad(40035, "invalid parameter: unknown msgid")
        except _Bad as bad:
            return bad.reply
        creator, t, ids, _ = task
        return {"errcode": 0, "errmsg": "ok", "next_cursor": "",
                "send_list": [{"external_userid": e, "userid": creator, "status": 1, "send_time": t} for e in ids]}

    def send_welcome_msg(self, token: str | None, raw: bytes) -> dict[str, Any]:
        try:
            self._need(self.check_token(token))
            body = _parse(raw)
            code = body.get("welcome_code")
            if not code:
                raise _Bad(41049)
            entry = self._codes.get(code) if isinstance(code, str) else None
            if entry is None:
                raise _Bad(41050)
            # A used code answers 41051 even after its 20 s: the welcome was delivered, and
            # telling a retrying client "expired" would make it dead-letter a success.
            if entry[3]:
                raise _Bad(41051)
            if self.now() - entry[2] > self.cfg.welcome_code_ttl_s:
                raise _Bad(41050)
            _check_message(body)
        except _Bad as bad:
            return bad.reply
        entry[3] = True
        self._greet(entry[1])
        return {"errcode": 0, "errmsg": "ok"}

    def add_by_phone(self, authorization: str | None, raw: bytes) -> dict[str, Any]:
        try:
            self._need(self.check_gateway_key(authorization))
            body = _parse(raw)
            userid = body.get("userid")
            self._staff_member(userid)
            mobile = body.get("mobile")
            if not isinstance(mobile, str) or not MOBILE_RE.fullmatch(mobile):
                raise _Bad(40035, "invalid parameter: mobile must be E.164, e.g. +8613800138000")
            if self.cfg.unknown_suffix and mobile.endswith(self.cfg.unknown_suffix):
                raise _Bad(910001)
        except _Bad as bad:
            return bad.reply
        e = external_userid(mobile)
        if (userid, e) in self._rel:
            # Already friends: WeCom pushes no welcome_code in that case.
            return {"errcode": 0, "errmsg": "ok", "external_userid": e, "status": "already_added"}
        self._rel.add((userid, e))
        self.adds += 1
        code = self._random(32)
        self._prune_codes()
        self._codes[code] = [userid, e, self.now(), False]
        return {"errcode": 0, "errmsg": "ok", "external_userid": e, "status": "added", "welcome_code": code}

    def send_text(self, authorization: str | None, raw: bytes) -> dict[str, Any]:
        try:
            self._need(self.check_gateway_key(authorization))
            body = _parse(raw)
            userid = body.get("userid")
            self._staff_member(userid)
            e = body.get("external_userid")
            if not isinstance(e, str) or (userid, e) not in self._rel:
                raise _Bad(84061)
            text = body.get("text")
            if text is not None and not isinstance(text, str):
                raise _Bad(40035, "invalid parameter: text must be a string")
            _check_text(text or "")
            request_id = body.get("request_id")
            if request_id is not None and not isinstance(request_id, str):
                raise _Bad(40035, "invalid parameter: request_id must be a string")
        except _Bad as bad:
            return bad.reply
        if request_id and request_id in self._requests:
            # The gateway dedupes on the caller's request_id: a repeat sends nothing.
            return {"errcode": 0, "errmsg": "ok", "msgid": self._requests[request_id], "duplicate": True}
        self._greet(e)
        msgid = self._msgid()
        if request_id:
            self._requests[request_id] = msgid
        return {"errcode": 0, "errmsg": "ok", "msgid": msgid}

    # ---- helpers ---------------------------------------------------------------------------
    # ---- around WeCom: the group robot and the business system ---------------------------
    def robot(self, key: str | None, raw: bytes) -> dict[str, Any]:
        """A group robot webhook (qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...)."""
        if not _same(key, self.cfg.robot_key):
            return error(93000, "invalid webhook url")
        try:
            body = _parse(raw)
        except _Bad as exc:
            return exc.reply
        kind = body.get("msgtype")
        content = (body.get(kind) or {}).get("content") if isinstance(body.get(kind), dict) else None
        if kind not in ("text", "markdown") or not isinstance(content, str) or not content:
            return error(40008, "invalid message type")
        if len(content.encode("utf-8")) > 4096:
            return error(40058, "markdown.content exceed max length 4096")
        self.robot_messages.append({"msgtype": kind, "content": content, "at": self.wall()})
        return error(0)

    def writeback(self, idem_key: str | None, raw: bytes) -> tuple[int, dict[str, Any]]:
        """The business system's receiver: (HTTP status, body). Stores each key once."""
        self.writeback_posts += 1
        if not idem_key:
            return 400, {"error": "Idempotency-Key header required"}
        if self.rng.random() < self.cfg.writeback_fail_rate:
            return 503, {"error": "temporarily unavailable"}
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return 400, {"error": "body is not JSON"}
        if idem_key in self.writebacks:
            self.writeback_repeats += 1
        else:
            self.writebacks[idem_key] = body
        if self.rng.random() < self.cfg.writeback_lost_reply_rate:
            return 500, {"error": "stored, but the reply was lost"}
        return 200, {"ok": True}

    @staticmethod
    def _need(code: int) -> None:
        if code:
            raise _Bad(code)

    def _staff_member(self, userid: Any) -> None:
        if not isinstance(userid, str) or userid not in self._staff:
            raise _Bad(60111)

    def _greet(self, e: str) -> None:
        n = self._greeted.get(e, 0) + 1
        self._greeted[e] = n
        self.welcomes += 1
        if n == 2:  # a recipient counts once as a duplicate however many extra welcomes
            self.duplicate_welcomes += 1

    def _prune_codes(self) -> None:
        """Forget codes long past their ttl so a million adds do not hold a million codes.

        Codes are kept 10 × ttl (at least 5 min): a reuse within that answers 41051, later
        the code is unknown (41050), as WeCom would not remember it forever either.
        """
        horizon = self.now() - max(300.0, 10 * self.cfg.welcome_code_ttl_s)
        codes = self._codes
        while codes:
            first = next(iter(codes))
            if codes[first][2] >= horizon:
                break
            del codes[first]

    def _random(self, n: int) -> str:
        return "".join(self.rng.choices(_ALNUM, k=n))

    def _msgid(self) -> str:
        self._msg_seq += 1
        return f"msg{self._msg_seq:08d}{self.rng.getrandbits(48):012x}"


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _parse(raw: bytes) -> dict[str, Any]:
    """40033 on a \\uXXXX escape in the raw bytes, 40035 on anything that is not a JSON object."""
    if ESCAPE_RE.search(raw):
        raise _Bad(40033)
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _Bad(40035, "invalid parameter: body is not valid UTF-8 JSON") from None
    if not isinstance(body, dict):
        raise _Bad(40035, "invalid parameter: body must be a JSON object")
    return body


def _check_text(content: str) -> None:
    if not content:
        raise _Bad(44004)
    if len(content.encode("utf-8")) > MAX_TEXT_BYTES:
        raise _Bad(45002)


def _check_message(body: dict[str, Any]) -> None:
    """text.content / attachments rules shared by 群发 and the welcome message."""
    text = body.get("text")
    if text is not None and not isinstance(text, dict):
        raise _Bad(40035, "invalid parameter: text must be an object")
    content = (text or {}).get("content") or ""
    if not isinstance(content, str):
        raise _Bad(40035, "invalid parameter: text.content must be a string")
    attachments = body.get("attachments") or []
    if not isinstance(attachments, list):
        raise _Bad(40035, "invalid parameter: attachments must be a list")
    if not content and not attachments:
        raise _Bad(44004)
    if len(content.encode("utf-8")) > MAX_TEXT_BYTES:
        raise _Bad(45002)
    if len(attachments) > MAX_ATTACHMENTS:
        raise _Bad(41064)
