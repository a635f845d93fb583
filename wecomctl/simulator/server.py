"""aiohttp wiring of the simulator: routes, the fault pipeline, JSON rendering, serving.

Everything that decides an answer lives in state.py; this module only reads HTTP, sleeps the
latency the state chose, and writes the dict back as UTF-8 JSON (never `\\uXXXX`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from typing import Any, Awaitable, Callable

from aiohttp import web

from wecomctl.simulator.config import SimConfig
from wecomctl.simulator.state import APIS, SimState, error

STATE_KEY = web.AppKey("sim_state", SimState)
_JSON = "application/json"


def _json(obj: Any, status: int = 200) -> web.Response:
    body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return web.Response(body=body, status=status, content_type=_JSON, charset="utf-8")


# logic(request, raw body) -> reply dict; run only when no fault answered first.
Logic = Callable[[web.Request, bytes], dict]


def _api(state: SimState, api: str, logic: Logic) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        ticket, code = state.begin(api)
        errcode = None
        try:
            if code == 45033:
                reply = error(code)  # refused at the door: no latency, not in flight
            else:
                raw = await request.read()
                delay = state.delay()
                if delay:
                    await asyncio.sleep(delay)
                # Busy is rolled before any side effect, so a busy call changes nothing.
                if code == 0 and state.busy(api):
                    code = -1
                reply = logic(request, raw) if code == 0 else error(code)
            errcode = reply["errcode"]
        finally:
            state.finish(ticket, errcode)  # errcode None if cancelled: just leave flight
        return _json(reply)

    return handler


def build_app(cfg: SimConfig, state: SimState | None = None) -> web.Application:
    st = state or SimState(cfg)
    app = web.Application(client_max_size=16 * 1024 * 1024)  # 10,000 ids fit easily
    app[STATE_KEY] = st
    q = lambda r, k: r.query.get(k)  # noqa: E731
    auth = lambda r: r.headers.get("Authorization")  # noqa: E731
    routes = [
        ("GET", "/cgi-bin/gettoken", "gettoken",
         lambda r, raw: st.gettoken(q(r, "corpid"), q(r, "corpsecret"))),
        ("POST", "/cgi-bin/externalcontact/add_msg_template", "add_msg_template",
         lambda r, raw: st.add_msg_template(q(r, "access_token"), raw)),
        ("POST", "/cgi-bin/externalcontact/send_welcome_msg", "send_welcome_msg",
         lambda r, raw: st.send_welcome_msg(q(r, "access_token"), raw)),
        ("POST", "/cgi-bin/externalcontact/get_groupmsg_list_v2", "get_groupmsg_list_v2",
         lambda r, raw: st.get_groupmsg_list_v2(q(r, "access_token"), raw)),
        ("POST", "/cgi-bin/externalcontact/get_groupmsg_send_result", "get_groupmsg_send_result",
         lambda r, raw: st.get_groupmsg_send_result(q(r, "access_token"), raw)),
        ("POST", "/gateway/v1/add_by_phone", "add_by_phone", lambda r, raw: st.add_by_phone(auth(r), raw)),
        ("POST", "/gateway/v1/send_text", "send_text", lambda r, raw: st.send_text(auth(r), raw)),
    ]
    for method, path, api, logic in routes:
        app.router.add_route(method, path, _api(st, api, logic))

    async def stats(request: web.Request) -> web.Response:
        return _json(st.stats())

    async def reset(request: web.Request) -> web.Response:
        st.reset()
        return _json({"errcode": 0, "errmsg": "ok"})

    async def calls(request: web.Request) -> web.Response:
        api = request.query.get("api")
        if api is None:
            return _json({a: st.calls(a) for a in APIS})
        if api not in APIS:
            return _json(error(40035, f"invalid parameter: api must be one of {', '.join(APIS)}"), status=400)
        return _json(st.calls(api))

    async def robot(request: web.Request) -> web.Response:
        return _json(st.robot(request.query.get("key"), await request.read()))

    async def writeback(request: web.Request) -> web.Response:
        status, body = st.writeback(request.headers.get("Idempotency-Key"), await request.read())
        return _json(body, status=status)

    async def robot_log(request: web.Request) -> web.Response:
        return _json(st.robot_messages)

    async def writeback_log(request: web.Request) -> web.Response:
        return _json(st.writebacks)

    app.router.add_post("/cgi-bin/webhook/send", robot)
    app.router.add_post("/business/writeback", writeback)
    app.router.add_get("/_sim/robot", robot_log)
    app.router.add_get("/_sim/writeback", writeback_log)
    app.router.add_get("/_sim/stats", stats)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_get("/_sim/calls", calls)
    return app


async def run_until(cfg: SimConfig, stop: asyncio.Event, on_ready: Callable[[str], None] | None = None,
                    state: SimState | None = None) -> None:
    """Listen on cfg.host:cfg.port, call on_ready(url) once bound, serve until `stop` is set."""
    runner = web.AppRunner(build_app(cfg, state), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        # A deep backlog: benchmarks open 64 keep-alive connections at once.
        site = web.TCPSite(runner, cfg.host, cfg.port, backlog=1024)
        await site.start()
        host, port = runner.addresses[0][:2]
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(cfg: SimConfig | None = None, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve in the foreground until SIGINT/SIGTERM (those are handled only on the main thread)."""
    cfg = cfg or SimConfig()
    cfg.validate()

    async def main() -> None:
        stop = asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
        await run_until(cfg, stop, on_ready)

    asyncio.run(main())
