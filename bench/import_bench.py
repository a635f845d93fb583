#!/usr/bin/env python3
"""Import speed and memory, side by side with sqlite3's .import of the same file.

    python bench/import_bench.py [--rows 1000000]

Generates a GBK CSV the way operators have them (3% invalid numbers, 5% duplicates
written differently), then times, in one run: `wecomctl import` into a fresh store (end
to end: decode, parse, normalise, dedupe, enqueue), and `sqlite3`'s `.import` of the same
file into a table (no validation at all: the ceiling). Prints rows/s, the ratio and peak
RSS (summed over the import and its reader child); writes bench/results/import-ROWS.json.
Target: >= 30,000 rows/s, <= 250 MB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from wecomctl.samples import PREFIXES

RESULTS = Path(__file__).resolve().parent / "results"


def generate(path: Path, rows: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    seen: list[str] = []
    with open(path, "w", encoding="gb18030", newline="") as fh:
        fh.write("手机号码,客户姓名,跟进人,城市\r\n")
        for i in range(rows):
            roll = rng.random()
            if roll < 0.03:
                phone = rng.choice(["12345", f"1.{rng.randrange(10**5):05d}E+10", "010-65521234", "138OO138000"])
            elif roll < 0.08 and seen:
                n = rng.choice(seen)
                phone = f"+86 {n[:3]} {n[3:7]} {n[7:]}"
            else:
                phone = f"{rng.choice(PREFIXES)}{rng.randrange(10**8):08d}"
                if len(seen) < 100_000:
                    seen.append(phone)
            fh.write(f"{phone},客户{i},{rng.choice(['zhangsan', 'lisi', 'wangwu'])},北京\r\n")


def _tree(pid: int) -> list[int]:
    """pid and every process below it."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            pass
    return out


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(cmd: list[str]) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """Wall seconds, peak RSS (MB) of the command's whole process tree (an import reads
    its files in a child process: both count), the largest single process's own peak,
    and the result.

    The tree is sampled from /proc every 10 ms; the single-process peak comes from
    os.wait4, exact (the maximum over the process and the children it reaped)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], sum(_rss_kb(p) for p in _tree(proc.pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        single = rusage.ru_maxrss / 1024
        # Sampling can miss a short peak: the tree's peak is at least its largest process's.
        return (wall, max(peak[0] / 1024, single), single,
                subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="wecomctl-importbench-"))
    csv_path = work / "leads.csv"
    # Generated in another process: on Linux a child's peak RSS starts at its parent's
    # size when it forked, so this process must stay small for the figures to be the
    # children's own.
    ctx = multiprocessing.get_context("spawn")
    gen = ctx.Process(target=generate, args=(csv_path, args.rows))
    gen.start()
    gen.join()
    size_mb = csv_path.stat().st_size / 2**20

    # sqlite3 .import wants UTF-8; converting is part of its cost, as decoding is ours.
    utf8 = work / "leads-utf8.csv"
    t0 = time.perf_counter()
    with open(csv_path, encoding="gb18030") as src, open(utf8, "w", encoding="utf-8") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    convert = time.perf_counter() - t0
    s_wall, s_rss, _, s_proc = timed(["sqlite3", str(work / "ceiling.db"), ".mode csv", f".import {utf8} leads"])
    assert s_proc.returncode == 0, s_proc.stderr
    w_wall, w_rss, w_single, w_proc = timed([sys.executable, "-m", "wecomctl", "import", str(csv_path), "--campaign", "bench",
                                   "-d", str(work / "data"), "--json"])
    assert w_proc.returncode in (0, 1), w_proc.stderr
    report = json.loads(w_proc.stdout)
    rows = {
        "wecomctl import": {"seconds": round(w_wall, 2), "rows_per_s": round(args.rows / w_wall),
                            "peak_rss_mb": round(w_rss, 1), "largest_process_mb": round(w_single, 1),
                            "accepted": report["accepted"],
                            "rejected": report["rejected"], "skipped": report["skipped"]},
        "sqlite3 .import": {"seconds": round(s_wall + convert, 2), "rows_per_s": round(args.rows / (s_wall + convert)),
                            "peak_rss_mb": round(s_rss, 1)},
    }
    ratio = rows["wecomctl import"]["rows_per_s"] / rows["sqlite3 .import"]["rows_per_s"]
    print(f"\n{args.rows:,} rows, {size_mb:.0f} MB of GBK CSV\n")
    print(f"{'':<18}{'seconds':>9}{'rows/s':>10}{'peak RSS MB':>13}   (all processes of the command)")
    for name, r in rows.items():
        print(f"{name:<18}{r['seconds']:>9}{r['rows_per_s']:>10}{r['peak_rss_mb']:>13}")
    print(f"\nwecomctl / sqlite3 = {ratio:.3f}; accepted {report['accepted']:,}, rejected {report['rejected']:,}, "
          f"duplicates {report['skipped']:,}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"import-{args.rows}.json").write_text(json.dumps(
        {"bench": "import", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": args.rows, "mb": round(size_mb, 1),
         "results": rows, "ratio_to_sqlite3": round(ratio, 4)}, indent=1), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
