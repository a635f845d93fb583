#!/usr/bin/env python3
"""How `wecomctl run` scales with worker processes, next to a bare httpx loop (the ceiling).

    python bench/scale_bench.py [--leads 3000] [--workers 1,2,4] [--backends diskcache,redis]

One simulator process with no rate limit, no latency and no busy errors; the welcome goes
through the gateway (`welcome.provider: gateway`), so every lead is two gateway calls,
add_by_phone then send_text, and what limits the run is our own overhead. For each worker
count N:

* the ceiling: N processes x `run.concurrency` threads, each thread with its own
  httpx.Client, making the same two calls per lead (same bodies, same headers) with no
  store, no limiter, no lease; timed from the moment every connection is open to the last
  answer;
* for each backend (the embedded diskcache store in a fresh data dir, and Redis in a fresh
  `?namespace=`, which also puts the limiter and token cache in Redis): `wecomctl import`
  of the same lead file, then `wecomctl run --workers N --json`, timed by the wall clock
  of the whole command (interpreter start, preflight, spawning workers and draining
  included; the JSON's own `elapsed_s` is reported too).

Every run must end with add done = welcome done = leads, `wecomctl check` passing, and the
simulator (reset before each run) counting leads adds, leads welcomes and no duplicate
welcome. CPU seconds of the client side (the ceiling's processes, or the run command and
its workers), of the simulator and of the Redis server are recorded per run, to tell what
the machine spent its cores on. Prints a table; writes bench/results/scale.json (or
scale-LEADS.json when --leads is not the default).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

import httpx  # noqa: E402
import yaml  # noqa: E402

from wecomctl import config as cfg  # noqa: E402
from wecomctl.pipeline.template import render  # noqa: E402
from wecomctl.samples import PREFIXES  # noqa: E402
from wecomctl.simulator import SimConfig, start_process  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OWNERS = ("zhangsan", "lisi", "wangwu")
DEFAULT_LEADS = 3000


# ---- helpers ---------------------------------------------------------------------------------
def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return None


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wecomctl(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "wecomctl", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_leads(path: Path, n: int, seed: int) -> list[dict]:
    """n distinct valid mainland mobiles, none ending in 44 (the simulator's unknown numbers).
    Returns the leads as wecomctl will hold them (E.164 phone, name, owner)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    leads = []
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("手机号,姓名,负责人\n")
        while len(leads) < n:
            num = f"{rng.choice(PREFIXES)}{rng.randrange(10**8):08d}"
            if num in seen or num.endswith("44"):
                continue
            seen.add(num)
            lead = {"phone": f"+86{num}", "name": f"客户{len(leads) + 1}", "owner": OWNERS[len(leads) % len(OWNERS)]}
            leads.append(lead)
            fh.write(f"{num},{lead['name']},{lead['owner']}\n")
    return leads


class RedisCpu:
    """used_cpu_user + used_cpu_sys of the Redis server (shared: others' load counts too)."""

    def __init__(self, url: str):
        import redis

        self.r = redis.Redis.from_url(url)

    def seconds(self) -> float | None:
        try:
            info = self.r.info("cpu")
            return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
        except Exception:
            return None

    def delete_namespace(self, namespace: str) -> int:
        n = 0
        batch = []
        for key in self.r.scan_iter(match=f"{namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += self.r.delete(*batch)
                batch = []
        if batch:
            n += self.r.delete(*batch)
        return n


# ---- the ceiling: a bare httpx loop ------------------------------------------------------------
def _ceiling_process(url: str, key: str, text: str, leads: list[dict], threads: int, ready_q, go, out_q) -> None:
    lock = threading.Lock()
    it = iter(leads)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json; charset=utf-8"}
    codes: dict[str, int] = {}
    done = [0]
    clients = [httpx.Client(base_url=url, timeout=30, trust_env=False) for _ in range(threads)]
    for c in clients:  # open every keep-alive connection before the clock starts
        c.get("/_sim/stats")

    def post(c: httpx.Client, path: str, body: dict) -> dict:
        content = json.dumps(body, ensure_ascii=False).encode("utf-8")
        return c.post(path, content=content, headers=headers).json()

    def work(c: httpx.Client) -> None:
        while True:
            with lock:
                lead = next(it, None)
            if lead is None:
                return
            add = post(c, "/gateway/v1/add_by_phone", {"mobile": lead["phone"], "userid": lead["owner"]})
            ok = add.get("errcode") == 0 and add.get("external_userid")
            if ok:
                body = {"userid": lead["owner"], "external_userid": add["external_userid"],
                        "text": render(text, {**lead, "campaign": "scale"}),
                        "request_id": f"welcome-{uuid.uuid4().hex}"}
                sent = post(c, "/gateway/v1/send_text", body)
                ok = sent.get("errcode") == 0
                label = f"send_text:{sent.get('errcode')}"
            else:
                label = f"add_by_phone:{add.get('errcode')}"
            with lock:
                codes[label] = codes.get(label, 0) + 1
                done[0] += bool(ok)

    ready_q.put(os.getpid())
    go.wait()
    cpu0 = time.process_time()
    pool = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    cpu = time.process_time() - cpu0
    for c in clients:
        c.close()
    out_q.put({"done": done[0], "codes": codes, "cpu_s": cpu})


def ceiling(sim, key: str, text: str, leads: list[dict], workers: int, threads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ready_q, out_q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_ceiling_process, daemon=True,
                         args=(sim.url, key, text, leads[k::workers], threads, ready_q, go, out_q))
             for k in range(workers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready_q.get(timeout=120)
    sim_cpu0 = cpu_seconds(sim.pid)
    t0 = time.perf_counter()
    go.set()
    parts = [out_q.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - t0
    sim_cpu1 = cpu_seconds(sim.pid)
    for p in procs:
        p.join(10)
    codes: dict[str, int] = {}
    for part in parts:
        for k, v in part["codes"].items():
            codes[k] = codes.get(k, 0) + v
    return {"wall_s": wall, "done": sum(p["done"] for p in parts), "codes": codes,
            "client_cpu_s": sum(p["cpu_s"] for p in parts),
            "sim_cpu_s": None if sim_cpu0 is None or sim_cpu1 is None else sim_cpu1 - sim_cpu0}


# ---- one wecomctl run ----------------------------------------------------------------------------
def wecomctl_run(sim, work: Path, conf: Path, csv_path: Path, backend: str, workers: int, leads: int,
                 redis_url: str, rcpu: RedisCpu | None) -> dict:
    tag = f"{backend}-{workers}"
    data = work / f"data-{tag}"
    shutil.rmtree(data, ignore_errors=True)
    where = ["-c", str(conf), "-d", str(data)]
    namespace = None
    if backend == "redis":
        namespace = f"scalebench-{uuid.uuid4().hex[:10]}"
        sep = "&" if "?" in redis_url else "?"
        where += ["--store", f"{redis_url}{sep}namespace={namespace}"]
    try:
        imp = wecomctl("import", str(csv_path), "--campaign", "scale", *where, "--json")
        if imp.returncode != 0:
            raise RuntimeError(f"import failed ({tag}): {imp.stderr[-2000:]}")
        imported = json.loads(imp.stdout)
        sim.reset()
        redis0 = rcpu.seconds() if rcpu else None
        sim0, kids0 = cpu_seconds(sim.pid), children_cpu()
        t0 = time.perf_counter()
        run = wecomctl("run", *where, "--workers", str(workers), "--json")
        wall = time.perf_counter() - t0
        sim1, kids1 = cpu_seconds(sim.pid), children_cpu()
        redis1 = rcpu.seconds() if rcpu else None
        stats = sim.stats()
        summary = json.loads(run.stdout) if run.stdout.strip() else {}
        check = wecomctl("check", *where, "--json")
        check_data = json.loads(check.stdout) if check.stdout.strip() else {"ok": False, "problems": [check.stderr]}
    finally:
        if namespace and rcpu:
            rcpu.delete_namespace(namespace)
        shutil.rmtree(data, ignore_errors=True)
    stages = summary.get("stages", {})
    add_done = stages.get("add", {}).get("done")
    welcome_done = stages.get("welcome", {}).get("done")
    row = {
        "backend": backend, "workers": workers, "wall_s": wall, "elapsed_s": summary.get("elapsed_s"),
        "exit_code": run.returncode, "this_run": summary.get("this_run"), "add_done": add_done,
        "welcome_done": welcome_done, "dead": {s: v.get("dead") for s, v in stages.items()},
        "worker_errors": summary.get("worker_errors"), "fatal": summary.get("fatal"),
        "check_ok": check_data.get("ok"), "check_problems": check_data.get("problems"),
        "sim_calls": {k: v for k, v in stats["calls"].items() if v},
        "sim_errors": {k: v for k, v in stats["errors"].items() if v},
        "sim_adds": stats["adds"], "sim_welcomes": stats["welcomes"],
        "duplicate_welcomes": stats["duplicate_welcomes"],
        "client_cpu_s": kids1 - kids0,  # the run command, its workers (and its check/import: no)
        "sim_cpu_s": None if sim0 is None or sim1 is None else sim1 - sim0,
        "redis_cpu_s": None if redis0 is None or redis1 is None else redis1 - redis0,
        "imported": imported.get("imported", imported.get("enqueued")),
        "stderr_tail": run.stderr.strip().splitlines()[-3:] if run.returncode else [],
    }
    row["ok"] = (run.returncode == 0 and add_done == leads and welcome_done == leads and bool(row["check_ok"])
                 and stats["duplicate_welcomes"] == 0 and stats["adds"] == leads and stats["welcomes"] == leads)
    return row


# ---- output ----------------------------------------------------------------------------------------
def render_table(rows: list[dict]) -> None:
    headers = ["backend", "workers", "seconds", "leads/s", "calls/s", "x ceiling", "run elapsed", "client CPU",
               "sim CPU", "redis CPU", "ok"]

    def pct(v, wall):
        return "-" if v is None else f"{v / wall:.0%}"

    table = []
    for r in rows:
        table.append([r["backend"], str(r["workers"]), f"{r['wall_s']:.1f}", f"{r['leads_per_s']:,.0f}",
                      f"{r['calls_per_s']:,.0f}", "1.00" if r["backend"] == "httpx ceiling" else f"{r['ratio']:.2f}",
                      "-" if r.get("elapsed_s") is None else f"{r['elapsed_s']:.1f}",
                      pct(r["client_cpu_s"], r["wall_s"]), pct(r["sim_cpu_s"], r["wall_s"]),
                      pct(r.get("redis_cpu_s"), r["wall_s"]), "yes" if r["ok"] else "NO"])
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(headers)]
        for row in [headers, *table]:
            print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        return
    t = Table(title="wecomctl run vs a bare httpx loop (2 gateway calls per lead; CPU as share of one core)")
    for h in headers:
        t.add_column(h, justify="left" if h == "backend" else "right", no_wrap=True)
    for row in table:
        t.add_row(*row)
    Console(width=150).print(t)


def git_commit() -> dict:
    """The commit measured, and whether the package had local changes."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "wecomctl"],
                               capture_output=True, text=True)
        return {"commit": head.stdout.strip() or None, "local_changes": dirty.stdout.split("\n")[0] != ""}
    except OSError:
        return {"commit": None, "local_changes": None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leads", type=int, default=DEFAULT_LEADS)
    ap.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    ap.add_argument("--backends", default="diskcache,redis", help="diskcache and/or redis (default both)")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="Redis URL for the redis backend")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default=None, help="default bench/results/scale.json (scale-LEADS.json off default)")
    args = ap.parse_args()
    worker_counts = [int(x) for x in args.workers.split(",") if x.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    assert set(backends) <= {"diskcache", "redis"}, backends

    work = Path(tempfile.mkdtemp(prefix="wecomctl-scale-"))
    csv_path = work / "leads.csv"
    leads = write_leads(csv_path, args.leads, args.seed)
    rcpu = RedisCpu(args.redis) if "redis" in backends else None

    sc = SimConfig(rate_limit=0, latency_ms=0, latency_jitter_ms=0, busy_rate=0.0, seed=args.seed, call_log=False)
    rows: list[dict] = []
    with start_process(sc) as sim:
        conf_data = yaml.safe_load(cfg.simulator_config(sim.url, sc))
        conf_data["welcome"]["provider"] = "gateway"
        conf = work / "scale.yaml"
        conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
        threads = int(conf_data["run"]["concurrency"])
        text = conf_data["welcome"]["text"]
        print(f"{args.leads} leads, workers {worker_counts}, run.concurrency {threads}, backends {backends}, "
              f"{os.cpu_count()} CPUs; simulator at {sim.url}", flush=True)
        for n in worker_counts:
            sim.reset()
            c = ceiling(sim, sc.gateway_key, text, leads, n, threads)
            stats = sim.stats()
            ceil = {"backend": "httpx ceiling", "workers": n, "threads_per_process": threads, **c,
                    "elapsed_s": None, "sim_adds": stats["adds"], "sim_welcomes": stats["welcomes"],
                    "duplicate_welcomes": stats["duplicate_welcomes"], "redis_cpu_s": None}
            ceil["ok"] = (c["done"] == args.leads and stats["adds"] == args.leads
                          and stats["welcomes"] == args.leads and stats["duplicate_welcomes"] == 0)
            ceil["leads_per_s"] = args.leads / c["wall_s"]
            ceil["calls_per_s"] = 2 * args.leads / c["wall_s"]
            rows.append(ceil)
            print(f"  ceiling  N={n}: {c['wall_s']:.1f}s, {ceil['leads_per_s']:.0f} leads/s", flush=True)
            for backend in backends:
                r = wecomctl_run(sim, work, conf, csv_path, backend, n, args.leads, args.redis, rcpu)
                r["leads_per_s"] = args.leads / r["wall_s"]
                r["calls_per_s"] = 2 * args.leads / r["wall_s"]
                r["ratio"] = r["leads_per_s"] / ceil["leads_per_s"]
                r["ratio_by_elapsed"] = (args.leads / r["elapsed_s"] / ceil["leads_per_s"]) if r["elapsed_s"] else None
                rows.append(r)
                print(f"  {backend:<9}N={n}: {r['wall_s']:.1f}s (run's own elapsed {r['elapsed_s']}s), "
                      f"{r['leads_per_s']:.0f} leads/s, x{r['ratio']:.2f} of the ceiling, ok={r['ok']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    render_table(rows)

    out = Path(args.out) if args.out else RESULTS / ("scale.json" if args.leads == DEFAULT_LEADS
                                                     else f"scale-{args.leads}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "bench": "scale",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **git_commit(),
        "env": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                "httpx": httpx.__version__},
        "params": {"leads": args.leads, "calls_per_lead": 2, "workers": worker_counts, "backends": backends,
                   "threads_per_process": threads, "welcome_provider": "gateway", "seed": args.seed,
                   "simulator": {"rate_limit": 0, "latency_ms": 0, "busy_rate": 0, "call_log": False},
                   "seconds": "wall clock of `wecomctl run` (the ceiling: from all connections open to the last answer)",
                   "cpu": "CPU seconds during the run; client = the run command and its workers, or the ceiling's processes"},
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
