"""`wecomctl demo`: the whole job on built-in defaults against the built-in simulator."""

from __future__ import annotations

import json
import os
import tempfile

from rich.console import Console
from rich.table import Table

from wecomctl import config as cfg
from wecomctl import samples
from wecomctl.errors import EXIT_DEAD, EXIT_OK, UsageError
from wecomctl.ingest.importer import Importer
from wecomctl.pipeline import pool
from wecomctl.pipeline.worker import open_store
from wecomctl.report.export import dead_letters
from wecomctl.report.progress import make_progress, totals

# Faults on, so the demo shows retries, token refresh and the rate limit at work.
DEMO_SIM = dict(latency_ms=60.0, latency_jitter_ms=60.0, rate_limit=40, busy_rate=0.05, token_ttl_s=12.0, seed=7)


def run_demo(out: Console, err: Console, data_dir: str | None, workers: int, as_json: bool) -> int:
    from wecomctl.simulator import SimConfig, start_process

    d = data_dir or tempfile.mkdtemp(prefix="wecomctl-demo-")
    if os.path.exists(d) and (not os.path.isdir(d) or os.listdir(d)):
        # The demo talks to a simulator: it must never touch real campaign data.
        raise UsageError(f"demo needs a new or empty --data-dir; {d} is not (leave out --data-dir for a temporary one)")
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {d}: {exc.strerror or exc}") from None
    sim_cfg = SimConfig(**DEMO_SIM)
    log = err if as_json else out
    with start_process(sim_cfg) as sim:
        conf = os.path.join(d, "demo-config.yaml")
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(cfg.simulator_config(sim.url, sim_cfg))
        settings = cfg.load(conf, d)
        log.print(f"simulator on {sim.url}: latency {sim_cfg.latency_ms:.0f}+{sim_cfg.latency_jitter_ms:.0f} ms, "
                  f"{sim_cfg.busy_rate:.0%} 'system busy', tokens expire every {sim_cfg.token_ttl_s:.0f} s, "
                  f"limit {sim_cfg.rate_limit}/s per API", highlight=False)
        files = [str(p) for p in samples.write(os.path.join(d, "samples"))]
        store = open_store(settings)
        report = Importer(store, "demo", staff=settings.staff_for("demo"), rejects_dir=os.path.join(d, "rejects")).run(files)
        store.close()
        log.print(f"imported {report.accepted} leads from {len(files)} files "
                  f"({report.rejected} rejected, {report.skipped} duplicates); rejects: {report.rejects_file}", highlight=False)
        prog = make_progress(log, settings.run.progress_interval_s, settings)
        with prog:
            result = pool.run(settings, workers, True, on_tick=prog.tick)
            prog.tick(result.counts, result.elapsed, final=True)
        stats = sim.stats()
    store = open_store(settings, create=False)
    dead_by_reason: dict[str, int] = {}
    for row in dead_letters(store.leads()):
        key = f"{row['stage']} {row['errcode'] if row['errcode'] is not None else row['kind']}: {row['meaning'] or row['error']}"
        dead_by_reason[key] = dead_by_reason.get(key, 0) + 1
    store.close()
    rows = totals(result.counts)
    per_api = {api: round(n / result.elapsed, 1) for api, n in stats["calls"].items()
               if n and api != "gettoken" and result.elapsed}
    summary = {
        "data_dir": d, "imported": report.accepted, "rejected_at_import": report.rejected,
        "duplicates_at_import": report.skipped, "added": rows["add"]["done"], "welcomed": rows["welcome"]["done"],
        "dead": rows["add"]["dead"] + rows["welcome"]["dead"], "dead_by_reason": dead_by_reason,
        "duplicate_welcomes": stats["duplicate_welcomes"], "elapsed_s": round(result.elapsed, 2),
        "calls": stats["calls"], "errors": stats["errors"],
        "calls_per_s": per_api,
        "limit_per_api_per_s": sim_cfg.rate_limit, "exit_code": result.exit_code,
    }
    code = result.exit_code if result.exit_code not in (EXIT_OK, EXIT_DEAD) else (EXIT_DEAD if summary["dead"] else EXIT_OK)
    summary["exit_code"] = code
    if as_json:
        print(json.dumps(summary, ensure_ascii=False))
        return code
    t = Table(title="demo summary", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    for k in ("imported", "rejected_at_import", "duplicates_at_import", "added", "welcomed", "dead", "duplicate_welcomes", "elapsed_s"):
        t.add_row(k.replace("_", " "), str(summary[k]))
    for api, rate in per_api.items():
        t.add_row(f"calls/s {api}", f"{rate} (limit {sim_cfg.rate_limit})")
    out.print(t)
    for reason, n in sorted(dead_by_reason.items(), key=lambda kv: -kv[1]):
        out.print(f"  dead {n:>4}  {reason}", highlight=False)
    out.print(f"\ndata kept in {d}; try:\n  wecomctl status -d {d}\n  wecomctl dlq list -d {d}\n"
              f"  wecomctl export -d {d} -o results.csv", highlight=False)
    if code == EXIT_DEAD:
        out.print("exit 1: some leads were dead-lettered (the samples hold numbers no one can add, on purpose)")
    return code
