#!/usr/bin/env python
"""How much load the WeCom simulator takes, so benchmarks know it is not their bottleneck.

Starts the simulator in its own process (start_process) and drives add_by_phone, then
send_text (to the customers just added), from client processes using httpx.AsyncClient
with keep-alive connections and 64 requests in flight in all, with simulator latency 0 and
100 ms. Reports requests/s and client-side p50/p99 latency, plus the simulator's own CPU
use read from /proc/<pid>/stat: "sim req/s/core" = requests ÷ simulator CPU seconds is
what one core of simulator serves when the client is not the limit. A last row drives
the same endpoint with aiohttp's client, which costs far less CPU per request than
httpx, as a direct look at the simulator's throughput.

    python bench/sim_capacity.py                     # ≤ 20,000 requests per run, ~60 s in all
    python bench/sim_capacity.py --requests 5000 --latencies 0 --no-reference
Writes bench/results/sim_capacity.json.

Why each client worker has its own one-connection AsyncClient: with one shared pool of 64
connections httpcore rescans every connection on each request (encode/httpx#3215), and
without `sniffio` installed it retries a failed import on every lock it creates
(encode/httpcore#1103). Measured here: a shared pool manages about 150–200 req/s; one
client per worker about three times that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

import httpx  # noqa: E402

from wecomctl.simulator import SimConfig, external_userid, start_process  # noqa: E402

AUTH = {"Authorization": f"Bearer {SimConfig().gateway_key}"}
USERS = SimConfig().staff
PATHS = {"add_by_phone": "/gateway/v1/add_by_phone", "send_text": "/gateway/v1/send_text"}


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def mobile(i: int) -> str:
    return f"+86139{i:08d}"


def payload(api: str, i: int, customers: list[int]) -> bytes:
    if api == "add_by_phone":
        return json.dumps({"mobile": mobile(i), "userid": USERS[i % len(USERS)]}).encode()
    j = customers[i % len(customers)]  # only customers the add run created
    body = {"userid": USERS[j % len(USERS)], "external_userid": external_userid(mobile(j)),
            "text": "您好，欢迎参加活动！"}
    return json.dumps(body, ensure_ascii=False).encode()


# ---- one client process ------------------------------------------------------------------
async def _drive(url: str, driver: str, api: str, idx: range, customers: list[int], inflight: int,
                 ready_q, go, start) -> dict:
    """Send requests for indices `idx` with `inflight` workers until done or the deadline."""
    if driver == "httpx":
        clients = [httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) for _ in range(inflight)]

        async def post(c, body: bytes) -> int:
            r = await c.post(PATHS[api], content=body, headers=AUTH)
            return r.json()["errcode"]

        async def warm(c) -> None:
            await c.get("/_sim/stats")
    else:
        import aiohttp

        session = aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=inflight))
        clients = [session] * inflight

        async def post(c, body: bytes) -> int:
            async with c.post(PATHS[api], data=body, headers=AUTH) as r:
                return (await r.json())["errcode"]

        async def warm(c) -> None:
            async with c.get("/_sim/stats") as r:
                await r.read()

    # Open every keep-alive connection before the clock starts.
    await asyncio.gather(*(warm(c) for c in clients))
    ready_q.put(os.getpid())
    await asyncio.to_thread(go.wait)
    stop_at = start.value
    latencies: list[float] = []
    codes: dict[int, int] = {}
    done: list[int] = []
    it = iter(idx)

    async def worker(c) -> None:
        for i in it:  # a shared iterator: each index is sent once
            if time.monotonic() >= stop_at:
                return
            body = payload(api, i, customers)
            t0 = time.perf_counter()
            code = await post(c, body)
            latencies.append(time.perf_counter() - t0)
            codes[code] = codes.get(code, 0) + 1
            done.append(i)

    await asyncio.gather(*(worker(c) for c in clients))
    for c in set(clients):
        await c.aclose() if driver == "httpx" else await c.close()
    return {"latencies": latencies, "codes": codes, "done": done}


def client_process(url, driver, api, idx, customers, inflight, ready_q, go, start, out_q) -> None:
    out_q.put(asyncio.run(_drive(url, driver, api, idx, customers, inflight, ready_q, go, start)))


# ---- one run -----------------------------------------------------------------------------
def run(sim, driver: str, api: str, n: int, customers: list[int], concurrency: int, procs: int,
        budget_s: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ready_q, out_q, go, start = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    share = [concurrency // procs + (k < concurrency % procs) for k in range(procs)]
    workers = [ctx.Process(target=client_process, daemon=True,
                           args=(sim.url, driver, api, range(k, n, procs), customers, share[k],
                                 ready_q, go, start, out_q)) for k in range(procs)]
    for w in workers:
        w.start()
    for _ in workers:
        ready_q.get(timeout=120)
    before = sim.stats()["calls"][api]
    cpu0, t0 = cpu_seconds(sim.pid), time.monotonic()
    start.value = t0 + budget_s  # the deadline, on the system-wide monotonic clock
    go.set()
    parts = [out_q.get(timeout=budget_s + 120) for _ in workers]
    wall = time.monotonic() - t0
    cpu1 = cpu_seconds(sim.pid)
    for w in workers:
        w.join(10)
    latencies = sorted(x for p in parts for x in p["latencies"])
    codes: dict[int, int] = {}
    for p in parts:
        for c, k in p["codes"].items():
            codes[c] = codes.get(c, 0) + k
    stats = sim.stats()
    done = len(latencies)
    # The simulator must have seen exactly what we sent, and answered all with success.
    assert stats["calls"][api] - before == done, (stats["calls"][api] - before, done)
    assert codes == {0: done}, codes
    server_cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "driver": driver, "api": api, "latency_ms": stats["config"]["latency_ms"], "concurrency": concurrency,
        "client_procs": procs, "requests": done, "wall_s": wall, "rps": done / wall,
        "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000,
        "max_ms": latencies[-1] * 1000 if latencies else None, "errcodes": codes,
        "server_cpu_s": server_cpu, "server_cpu_util": None if server_cpu is None else server_cpu / wall,
        "server_rps_per_core": None if not server_cpu else done / server_cpu,
        "max_in_flight": stats["max_in_flight"][api],
        "_done": sorted(i for p in parts for i in p["done"]),  # indices answered (not in the JSON)
    }


def render(rows: list[dict]) -> None:
    headers = ["client", "latency", "api", "requests", "wall s", "req/s", "p50 ms", "p99 ms",
               "sim CPU", "sim req/s/core", "in flight"]
    table = [[r["driver"], f"{r['latency_ms']:g} ms", r["api"], f"{r['requests']:,}", f"{r['wall_s']:.1f}",
              f"{r['rps']:,.0f}", f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}",
              "-" if r["server_cpu_util"] is None else f"{r['server_cpu_util']:.0%}",
              "-" if r["server_rps_per_core"] is None else f"{r['server_rps_per_core']:,.0f}",
              str(r["max_in_flight"])] for r in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
        for row in [headers, *table]:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        return
    t = Table(title="WeCom simulator capacity (client processes → simulator process)")
    for h in headers:
        t.add_column(h, justify="left" if h in ("client", "api") else "right", no_wrap=True)
    for row in table:
        t.add_row(*row)
    Console(width=140).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20_000, help="most requests per run (default 20,000)")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight in all (default 64)")
    ap.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--latencies", default="0,100", help="simulator latency_ms values (default 0,100)")
    ap.add_argument("--budget-s", type=float, default=40.0, help="time for all runs' traffic (default 40)")
    ap.add_argument("--no-reference", action="store_true", help="skip the aiohttp-client reference run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sim_capacity.json"))
    args = ap.parse_args()

    latencies = [float(x) for x in args.latencies.split(",") if x.strip()]
    n_runs = 2 * len(latencies) + (0 if args.no_reference else 1)
    per_run = args.budget_s / n_runs
    rows: list[dict] = []
    for lat in latencies:
        # unknown_suffix "" so every add succeeds: the bench measures the happy path.
        with start_process(SimConfig(latency_ms=lat, unknown_suffix="")) as sim:
            add = run(sim, "httpx", "add_by_phone", args.requests, [], args.concurrency, args.procs, per_run)
            rows.append(add)
            rows.append(run(sim, "httpx", "send_text", args.requests, add["_done"], args.concurrency,
                            args.procs, per_run))
            rows[-1]["welcomes"] = sim.stats()["welcomes"]
    if not args.no_reference:
        with start_process(SimConfig(unknown_suffix="")) as sim:
            rows.append(run(sim, "aiohttp", "add_by_phone", args.requests, [], args.concurrency, 1, per_run))
    for r in rows:
        del r["_done"]
    render(rows)

    import aiohttp

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "sim_capacity",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "env": {"python": platform.python_version(), "platform": platform.platform(),
                "cpus": os.cpu_count(), "aiohttp": aiohttp.__version__, "httpx": httpx.__version__},
        "params": {"requests": args.requests, "concurrency": args.concurrency, "procs": args.procs,
                   "latencies_ms": latencies, "budget_s_per_run": per_run},
        "results": rows,  # json turns the errcode keys into strings
    }
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
