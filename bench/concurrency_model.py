#!/usr/bin/env python3
"""Threads or asyncio for keeping calls in flight with httpx? Measured side by side.

    python bench/concurrency_model.py [--latency-ms 100] [--inflight 8 32] [--seconds 8]

The simulator (own process, no rate limit) answers after --latency-ms. One client process
keeps N calls in flight, once with N threads sharing one httpx.Client, once with N asyncio
tasks sharing one httpx.AsyncClient. Measured: calls/s (the ideal is N / latency) and the
client's CPU per call. Writes bench/results/concurrency_model.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import resource
import threading
import time
from pathlib import Path

import httpx

from wecomctl.simulator import SimConfig, start_process

RESULTS = Path(__file__).resolve().parent / "results"
BODY = {"mobile": "+8613800138000", "userid": "zhangsan"}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _threads(url: str, key: str, n: int, seconds: float, q) -> None:
    client = httpx.Client(base_url=url, limits=httpx.Limits(max_connections=n, max_keepalive_connections=n))
    headers = {"Authorization": f"Bearer {key}"}
    count = [0]
    lock = threading.Lock()
    stop = time.time() + seconds

    def loop() -> None:
        while time.time() < stop:
            client.post("/gateway/v1/add_by_phone", json=BODY, headers=headers)
            with lock:
                count[0] += 1

    c0, t0 = _cpu(), time.time()
    ts = [threading.Thread(target=loop) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    q.put((count[0], time.time() - t0, _cpu() - c0))


def _asyncio(url: str, key: str, n: int, seconds: float, q) -> None:
    async def main() -> tuple[int, float, float]:
        headers = {"Authorization": f"Bearer {key}"}
        count = 0
        stop = time.time() + seconds
        async with httpx.AsyncClient(base_url=url, limits=httpx.Limits(max_connections=n,
                                                                       max_keepalive_connections=n)) as client:
            async def loop() -> None:
                nonlocal count
                while time.time() < stop:
                    await client.post("/gateway/v1/add_by_phone", json=BODY, headers=headers)
                    count += 1

            c0, t0 = _cpu(), time.time()
            await asyncio.gather(*(loop() for _ in range(n)))
            return count, time.time() - t0, _cpu() - c0

    q.put(asyncio.run(main()))


def measure(target, url: str, key: str, n: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(url, key, n, seconds, q))
    p.start()
    calls, wall, cpu = q.get(timeout=seconds + 60)
    p.join()
    return {"calls": calls, "per_s": round(calls / wall, 1), "cpu_us_per_call": round(cpu / max(calls, 1) * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--inflight", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    sc = SimConfig(latency_ms=args.latency_ms, call_log=False)
    rows = []
    with start_process(sc) as sim:
        for n in args.inflight:
            for name, target in (("threads + httpx.Client", _threads), ("asyncio + httpx.AsyncClient", _asyncio)):
                r = measure(target, sim.url, sc.gateway_key, n, args.seconds)
                r.update(model=name, inflight=n, ideal_per_s=round(n / (args.latency_ms / 1000), 1))
                rows.append(r)
    print(f"\nsimulator latency {args.latency_ms:.0f} ms, one client process\n")
    print(f"{'model':<30}{'in flight':>10}{'calls/s':>9}{'ideal':>8}{'CPU us/call':>13}")
    for r in rows:
        print(f"{r['model']:<30}{r['inflight']:>10}{r['per_s']:>9}{r['ideal_per_s']:>8}{r['cpu_us_per_call']:>13}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "concurrency_model.json").write_text(json.dumps(
        {"bench": "concurrency_model", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "latency_ms": args.latency_ms, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
