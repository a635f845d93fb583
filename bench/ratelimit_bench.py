#!/usr/bin/env python3
"""Rate-limit benchmark: how close each approach runs to a strict limit L, and whether it
ever exceeds it.

    python bench/ratelimit_bench.py [--limit 3000 --window 60] [--latency-ms 100] [--leads 3000]

One simulator, strict: a SLIDING window of L calls per window per API (no window anywhere
may hold more than L; WeCom's own limits are per minute and per hour) and 100 ms latency.
Side by side, in one run:

  wecomctl            `wecomctl run` (2 processes x 8 threads) on --leads leads: add then
                      welcome (企业群发), each API limited to L by the shared limiter
  sync loop           the loop the design started from: for each lead, add, then welcome,
                      one call at a time
  per-worker limiter  the common setup: 4 processes, each told "L per window" on its own
                      (so together they may send 4 x L)

For each: successful calls per second per API against L, 45009 answers, the most calls
the simulator admitted in any window, and the p99 of the gap between consecutive calls.
Prints a table and writes bench/results/ratelimit-L-per-WINDOWs.json.
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

from wecomctl import config as cfg
from wecomctl.simulator import SimConfig, start_process

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import write_leads  # noqa: E402


def window_stats(times: list[float], codes: list[int], window: float) -> dict:
    ok = sorted(t for t, c in zip(times, codes) if c != 45009)
    if len(ok) < 2:
        return {"ok_calls": len(ok), "max_in_window": len(ok), "p99_gap_ms": None, "ok_per_s": 0.0}
    most = max(bisect.bisect_left(ok, t + window) - i for i, t in enumerate(ok))
    gaps = sorted(b - a for a, b in zip(ok, ok[1:]))
    span = ok[-1] - ok[0]
    return {"ok_calls": len(ok), "max_in_window": most, "p99_gap_ms": round(gaps[int(0.99 * (len(gaps) - 1))] * 1000, 2),
            "ok_per_s": round((len(ok) - 1) / span, 3) if span else 0.0}


def summarise(name: str, sim, apis: list[str], limit: int, window: float, elapsed: float) -> dict:
    row = {"name": name, "elapsed_s": round(elapsed, 1), "apis": {}}
    for api in apis:
        log = sim.calls(api)
        st = window_stats(log["t"], log["errcode"], window)
        st["calls"] = log["count"]
        st["45009"] = sum(1 for c in log["errcode"] if c == 45009)
        st["ratio_to_limit"] = round(st["ok_per_s"] * window / limit, 4)
        row["apis"][api] = st
    return row


def run_wecomctl(sim, sc: SimConfig, leads: int, work: Path) -> float:
    conf_data = yaml.safe_load(cfg.simulator_config(sim.url, sc))
    conf_data["run"].update(workers=2, concurrency=8)
    conf = work / "c.yaml"
    conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
    import random
    write_leads(work / "leads.csv", leads, random.Random(3))
    data = str(work / "data")
    subprocess.run([sys.executable, "-m", "wecomctl", "import", str(work / "leads.csv"), "--campaign", "b",
                    "-c", str(conf), "-d", data], check=True, capture_output=True)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "wecomctl", "run", "-c", str(conf), "-d", data], capture_output=True,
                   env={**os.environ, "WECOMCTL_SHARED_DIR": str(work / "shared")})
    return time.time() - t0


def run_sync_loop(sim, sc: SimConfig, seconds: float) -> float:
    """For each lead: add, then welcome. One call at a time, no limiter."""
    auth = {"Authorization": f"Bearer {sc.gateway_key}"}
    t0 = time.time()
    with httpx.Client(base_url=sim.url) as c:
        token = c.get("/cgi-bin/gettoken", params={"corpid": sc.corp_id, "corpsecret": sc.corp_secret}).json()["access_token"]
        i = 0
        while time.time() - t0 < seconds:
            i += 1
            mobile = f"+86139{i:08d}"
            r = c.post("/gateway/v1/add_by_phone", json={"mobile": mobile, "userid": "zhangsan"}, headers=auth).json()
            if r.get("errcode") == 0:
                c.post("/cgi-bin/externalcontact/add_msg_template", params={"access_token": token},
                       json={"chat_type": "single", "external_userid": [r["external_userid"]], "sender": "zhangsan",
                             "text": {"content": "hi"}})
    return time.time() - t0


def _per_worker(url: str, key: str, limit: float, seconds: float, threads: int, offset: int) -> None:
    """One process with its own limiter at `limit` calls/s, as if it were alone."""
    lock, nxt = threading.Lock(), [time.time()]
    stop = time.time() + seconds

    def slot() -> None:
        with lock:
            t = max(nxt[0], time.time())
            nxt[0] = t + 1.0 / limit
        time.sleep(max(0.0, t - time.time()))

    def loop(k: int) -> None:
        with httpx.Client(base_url=url) as c:
            i = 0
            while time.time() < stop:
                slot()
                i += 1
                c.post("/gateway/v1/add_by_phone", headers={"Authorization": f"Bearer {key}"},
                       json={"mobile": f"+86137{offset + k * 100000 + i:08d}", "userid": "zhangsan"})

    ts = [threading.Thread(target=loop, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def run_per_worker(sim, sc: SimConfig, limit: float, seconds: float, procs: int = 4) -> float:
    ctx = mp.get_context("spawn")
    ps = [ctx.Process(target=_per_worker, args=(sim.url, sc.gateway_key, limit, seconds, 8, p * 10_000_000))
          for p in range(procs)]
    t0 = time.time()
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=3000, help="L: calls per window per API")
    ap.add_argument("--window", type=float, default=60.0, help="window length in seconds (1, 60 or 3600)")
    ap.add_argument("--latency-ms", type=float, default=100.0)
    ap.add_argument("--leads", type=int, default=3000, help="wecomctl makes 2 calls per lead")
    ap.add_argument("--seconds", type=float, default=30.0, help="how long each baseline runs")
    args = ap.parse_args()
    L, W = args.limit, args.window
    rows = []
    work = Path(tempfile.mkdtemp(prefix="wecomctl-ratebench-"))

    def fresh() -> SimConfig:
        # block_s 0: a 45009 refuses that call only, so the baselines keep showing how
        # often they overshoot instead of sitting out long blocks
        return SimConfig(rate_limit=L, rate_window_s=W, rate_mode="sliding", block_s=0.0,
                         latency_ms=args.latency_ms, latency_jitter_ms=args.latency_ms * 0.2, seed=1)

    sc = fresh()
    with start_process(sc) as sim:
        elapsed = run_wecomctl(sim, sc, args.leads, work)
        rows.append(summarise("wecomctl", sim, ["add_by_phone", "add_msg_template"], L, W, elapsed))
    sc = fresh()
    with start_process(sc) as sim:
        elapsed = run_sync_loop(sim, sc, args.seconds)
        rows.append(summarise("sync loop", sim, ["add_by_phone", "add_msg_template"], L, W, elapsed))
    sc = fresh()
    with start_process(sc) as sim:
        elapsed = run_per_worker(sim, sc, L / W, args.seconds)
        rows.append(summarise("per-worker limiter x4", sim, ["add_by_phone"], L, W, elapsed))

    print(f"\nlimit L = {L} per {W:g} s per API (sliding window), latency {args.latency_ms:.0f} ms + up to 20%\n")
    head = f"{'approach':<24}{'api':<18}{'calls':>7}{'ok/s':>9}{'x L':>8}{'45009':>7}{'max in window':>15}{'p99 gap ms':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        for api, st in r["apis"].items():
            print(f"{r['name']:<24}{api:<18}{st['calls']:>7}{st['ok_per_s']:>9}{st['ratio_to_limit']:>8}"
                  f"{st['45009']:>7}{st['max_in_window']:>15}{str(st['p99_gap_ms']):>12}")
    RESULTS.mkdir(exist_ok=True)
    out = {"bench": "ratelimit", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "limit": L, "window_s": W,
           "latency_ms": args.latency_ms, "rows": rows}
    (RESULTS / f"ratelimit-{L}-per-{W:g}s.json").write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
