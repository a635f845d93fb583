"""A local WeCom (企业微信) simulator: a real HTTP server on 127.0.0.1 for trying, testing
and benchmarking wecomctl without touching the real service.

Start it with `wecomctl simulate` (foreground), or from Python::

    from wecomctl.simulator import SimConfig, start_in_thread, start_process, serve
    with start_in_thread(SimConfig(latency_ms=50)) as sim:   # tests
        ...  # sim.url, sim.port, sim.stats(), sim.calls("send_text"), sim.reset()
    with start_process(SimConfig(rate_limit=100)) as sim:    # own process, own GIL
        ...
    serve(SimConfig(port=8080), on_ready=print)              # blocks until SIGINT/SIGTERM

Envelope
--------
Like WeCom, every API answer is HTTP 200 with a JSON body `{"errcode": N, "errmsg": "..."}`
(0 = success), sent as UTF-8 without `\\uXXXX` escapes. Only `/_sim/calls?api=<unknown>`
answers HTTP 400; unknown paths get aiohttp's plain 404/405.

Endpoints
---------
`GET /cgi-bin/gettoken?corpid=ID&corpsecret=SECRET` (api `gettoken`)
    40013 wrong corpid; 40001 wrong secret; else `access_token` (43 random characters) and
    `expires_in`. Inside its validity a fetch returns the same token, and `expires_in` is
    the whole seconds it has left (`token_ttl_s` on the first fetch). Calls with a token
    past its ttl get 42001, with an unknown token 40014, without `access_token` 41001.

`POST /cgi-bin/externalcontact/add_msg_template?access_token=T` (api `add_msg_template`, 企业群发)
    Checks in order: token (41001/40014/42001); `\\uXXXX` escape in the raw body 40033;
    body not a JSON object 40035; `sender` not in staff 60111; `chat_type` other than
    "single" 40035; `external_userid` missing or empty 41048, not a list of strings 40035,
    over 10,000 40035 ("external_userid over 10000"); no `text.content` and no attachments
    44004; text over 4000 UTF-8 bytes 45002; over 9 attachments 41064.
    Success: `fail_list` (ids that are not customers of `sender`, i.e. not added through
    the gateway with that userid) and `msgid`. Every other id counts one welcome at once
    (the real task waits for the staff member to confirm it in the client; ids listed
    twice in one call count once).

`POST /cgi-bin/externalcontact/send_welcome_msg?access_token=T` (api `send_welcome_msg`)
    Token; 40033; 40035; `welcome_code` missing 41049; unknown or older than
    `welcome_code_ttl_s` 41050; already used 41051 (also after its ttl: the welcome was
    delivered); then the text/attachment checks above. Success counts a welcome for the
    customer the code was issued for. A code is consumed only by a successful call.
    Codes are remembered for max(300 s, 10 × ttl), after which they are unknown (41050).

Gateway (third-party "add by phone"; our own documented design), header
`Authorization: Bearer <gateway_key>`, wrong or missing → 910401 "gateway key invalid":

`POST /gateway/v1/add_by_phone` `{"mobile": "+8613800138000", "userid": "zhangsan"}` (api `add_by_phone`)
    Key 910401; 40033; 40035; `userid` not in staff 60111; `mobile` not E.164
    (`+` and 8–15 digits) 40035; **unknown-number rule**: a mobile whose digits end with
    `unknown_suffix` (default "44", e.g. +8613800138044) is permanently unknown to the
    gateway → 910001 "mobile not found: no WeChat/WeCom account for this number".
    Success: `external_userid` = "wm" + first 30 hex digits of sha256(mobile) (the same for
    every staff member), `status` "added" with a fresh `welcome_code` (valid
    `welcome_code_ttl_s`, once, bound to that userid and customer), or, when that
    (mobile, userid) pair was added before, "already_added" with no `welcome_code` (WeCom
    sends none between existing friends). Only "added" counts in `adds`.

`POST /gateway/v1/send_text` `{"userid": "zhangsan", "external_userid": E, "text": "..."}` (api `send_text`)
    Key 910401; 40033; 40035; unknown userid 60111; E not a customer of that userid
    84061; empty text 44004; text over 4000 bytes 45002. Success: `msgid`, one welcome to E.

Test hooks (no faults, no auth; never show the secret, the gateway key or tokens):

* `GET /_sim/stats` → `calls` {api: n}, `errors` {api: {"errcode": n}}, `adds`,
  `welcomes`, `duplicate_welcomes` (recipients greeted more than once, by any endpoint),
  `recipients`, `relationships`, `max_in_flight` {api: n}, `in_flight` {api: n},
  `started_at` (wall-clock epoch s), `uptime_s`, `config` (the knobs without secrets),
  `call_log_enabled`.
* `POST /_sim/reset` → clears stats, relationships, welcome codes and the call log
  (tokens stay valid).
* `GET /_sim/calls?api=X` → `{"api", "count", "t": [arrival, monotonic s, sorted],
  "errcode": [...]}` for the last 200,000 answered calls of X (all APIs without `api`).
  `time.monotonic()` is system-wide on Linux, so a parent process can compare its own
  clock with these. Off (empty) when `call_log` is false.

Group robot and business system (the other ends of alerts and write-back)
----------------------------------------------------------------------------
`POST /cgi-bin/webhook/send?key=K` (a WeCom group robot; not an `api` of the stats)
    K other than `robot_key` 93000 "invalid webhook url"; body not a JSON object 40035;
    `msgtype` other than text/markdown, or no `{msgtype}.content`, 40008; content over
    4096 UTF-8 bytes 40058. Success stores `{"msgtype", "content", "at"}`:
    `GET /_sim/robot` lists what arrived, in order.

`POST /business/writeback` (the business system's receiver for write-back)
    No `Idempotency-Key` header: HTTP 400. A share `writeback_fail_rate` of deliveries is
    answered 503 before storing; a body that is not JSON 400; else the body is stored once
    per key (a repeat counts in `writeback_repeats`), and a share
    `writeback_lost_reply_rate` is answered 500 *after* storing (the sender cannot tell
    and must retry). `GET /_sim/writeback` → {key: body} of everything stored.

Fault knobs
-----------
Applied to every API above (not `/_sim/*`), in this order, per API:

1. concurrency: calls in flight (latency included); beyond `max_concurrency` → 45033
   "concurrency limit exceeded" at once, with no latency.
2. rate limit: fixed windows of `rate_window_s` aligned to the monotonic clock; the
   (`rate_limit`+1)-th call in a window gets 45009, and then every call gets 45009 until
   the window ends (or for `block_s` seconds, if set). Blocked calls count toward no window.
3. latency: `latency_ms` + uniform [0, `latency_jitter_ms`], slept for every answer
   (successes and errors alike, except 45033).
4. busy: with probability `busy_rate` the answer is -1 "system busy", decided before any
   side effect (a busy call changes nothing). gettoken is never busy, but it does obey
   concurrency, rate limit and latency.
5. the endpoint's own checks, as listed above.

Every call counts in `calls`, every non-zero errcode in `errors`.

Knobs (`SimConfig`, also from YAML via `SimConfig.from_yaml(path)`: same keys at the top
level or under `simulator:`, other keys ignored; quote `unknown_suffix`)
-------------------------------------------------------------------------------------
=====================  ==========================================  =======================
knob                   default                                     meaning
=====================  ==========================================  =======================
host                   "127.0.0.1"                                 listen address
port                   0                                           0 = a free port
corp_id                "wwsim00000000000001"                       gettoken corpid
corp_secret            "sim-secret-not-for-production"             gettoken corpsecret
gateway_key            "sim-gateway-key-not-for-production"        gateway Bearer key
latency_ms             0.0                                         added per call
latency_jitter_ms      0.0                                         uniform extra
rate_limit             0                                           calls/window/API, 0 = none
rate_window_s          1.0                                         window length
block_s                None                                        45009 block; None = window end
rate_mode              "fixed"                                     fixed windows, or "sliding":
                                                                   no window anywhere over the
                                                                   limit (block: one window)
max_concurrency        0                                           in flight per API, 0 = none
busy_rate              0.0                                         share answered -1
token_ttl_s            7200                                        then 42001
staff                  zhangsan lisi wangwu zhaoliu sunqi          known userids (else 60111)
                       zhouba wujiu zhengshi
unknown_suffix         "44"                                        910001 rule; "" disables
welcome_code_ttl_s     20.0                                        then 41050
seed                   None                                        seeds tokens, codes, dice
call_log               True                                        keep /_sim/calls data
robot_key              "sim-robot-key-not-for-production"          group robot webhook key
writeback_fail_rate    0.0                                         share answered 503
writeback_lost_reply_rate 0.0                                      share stored, then 500
=====================  ==========================================  =======================
"""

from wecomctl.simulator.config import SimConfig
from wecomctl.simulator.runner import SimHandle, start_in_thread, start_process
from wecomctl.simulator.server import build_app, serve
from wecomctl.simulator.state import SimState, external_userid

__all__ = ["SimConfig", "SimHandle", "SimState", "build_app", "external_userid", "serve",
           "start_in_thread", "start_process"]
