#!/usr/bin/env python3
"""wecomctl's limiter against pyrate-limiter, shared by several processes, side by side.

    pip install pyrate-limiter && python bench/limiter_compare.py [--rate 100] [--procs 4] [--seconds 5]

Each of --procs processes runs 8 threads that acquire as fast as they are allowed for
--seconds, all sharing one limit of --rate per second: wecomctl's GCRA on a locked file,
and pyrate-limiter's SQLite bucket with its file lock (its documented multi-process
setup). Measured: calls per second against the rate, the most calls in any 1 s window
(the sliding guarantee), and CPU per acquire. Writes bench/results/limiter_compare.json.
"""

from __future__ import annotations

import argparse
import bisect
import json
import multiprocessing as mp
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _ours(directory: str, rate: int, seconds: float, q) -> None:
    from wecomctl.config import Limit
    from wecomctl.ratelimit.limiter import FileLimiterBackend, RateLimiter

    lim = RateLimiter(FileLimiterBackend(directory), {"api": Limit(per_second=rate, guard_ms=5)})
    _drive(lambda: lim.acquire("api"), seconds, q)


def _pyrate(db: str, rate: int, seconds: float, q) -> None:
    from pyrate_limiter import Duration
    from pyrate_limiter.limiter_factory import create_sqlite_limiter

    lim = create_sqlite_limiter(rate_per_duration=rate, duration=Duration.SECOND, db_path=db, use_file_lock=True,
                                buffer_ms=5)
    _drive(lambda: lim.try_acquire("api", blocking=True), seconds, q)


def _drive(acquire, seconds: float, q) -> None:
    stop = time.time() + seconds
    times: list[float] = []
    lock = threading.Lock()

    def loop() -> None:
        while time.time() < stop:
            acquire()
            with lock:
                times.append(time.time())

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    ts = [threading.Thread(target=loop) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    q.put((times, (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)))


def measure(target, arg: str, rate: int, procs: int, seconds: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=target, args=(arg, rate, seconds, q)) for _ in range(procs)]
    for p in ps:
        p.start()
    got = [q.get(timeout=seconds + 60) for _ in ps]
    for p in ps:
        p.join()
    times = sorted(t for ts, _ in got for t in ts)
    cpu = sum(c for _, c in got)
    steady = [t for t in times if t >= times[0] + 1.0]  # after the first second (no burst credit)
    most = max(bisect.bisect_left(times, t + 1.0) - i for i, t in enumerate(times)) if times else 0
    span = steady[-1] - steady[0] if len(steady) > 1 else 0
    return {"calls": len(times), "per_s": round((len(steady) - 1) / span, 2) if span else 0.0,
            "max_in_any_1s": most, "cpu_us_per_call": round(cpu / max(1, len(times)) * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="wecomctl-limcmp-")
    rows = {
        "wecomctl (GCRA, locked file)": measure(_ours, os.path.join(work, "ours"), args.rate, args.procs, args.seconds),
        "pyrate-limiter (SQLite + file lock)": measure(_pyrate, os.path.join(work, "pyrate.db"), args.rate, args.procs,
                                                       args.seconds),
    }
    print(f"\n{args.procs} processes x 8 threads sharing {args.rate}/s for {args.seconds:g} s\n")
    print(f"{'limiter':<38}{'calls':>7}{'per s':>9}{'x rate':>8}{'max in any 1 s':>16}{'CPU us/call':>13}")
    for name, r in rows.items():
        print(f"{name:<38}{r['calls']:>7}{r['per_s']:>9}{r['per_s'] / args.rate:>8.3f}{r['max_in_any_1s']:>16}"
              f"{r['cpu_us_per_call']:>13}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "limiter_compare.json").write_text(json.dumps(
        {"bench": "limiter_compare", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rate": args.rate,
         "procs": args.procs, "seconds": args.seconds, "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
