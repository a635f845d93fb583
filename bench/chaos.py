#!/usr/bin/env python3
"""Chaos run: SIGKILL workers and then the whole run, finish with a second run, check.

    python bench/chaos.py [--leads 2000] [--workers 4] [--kills 10] [--store disk|redis]

Simulator with latency, 5% "system busy", expiring tokens and a rate limit; the leads are
imported; `wecomctl run` starts; one random worker is SIGKILLed every second (the pool
replaces it) for --kills kills; then the run's parent and all its workers are SIGKILLed;
then `wecomctl run` runs again to the end. Afterwards it must hold that `wecomctl check`
passes, imported = done + dead + skipped for every stage, the simulator saw no customer
greeted twice, and ambiguous dead letters <= the number of kills. Prints a table and
writes bench/results/chaos-PROVIDER-LEADS.json. tests/test_chaos.py runs a shortened version.

--store redis runs the same on the Redis store (queue, rate limiter and token cache): a
private redis-server on a free 127.0.0.1 port with the AOF on and fsynced on every write,
and every wecomctl command gets --store redis://127.0.0.1:PORT/0?namespace=chaos. With
--redis-restart (the default for redis), halfway through the kills that redis-server is
stopped (SIGTERM), kept down about 3 s and started again on the same port and dir while
the worker kills go on; the run must wait it out and carry on. The results say when the
restart happened, how long Redis was down and how long the run took to make progress
again; they go to bench/results/chaos-PROVIDER-LEADS-redis.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from wecomctl import config as cfg
from wecomctl.samples import PREFIXES
from wecomctl.simulator import SimConfig, start_process

RESULTS = Path(__file__).resolve().parent / "results"


def wecomctl(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wecomctl", *args], capture_output=True, text=True, timeout=600, **kw)


def children(pid: int) -> list[int]:
    """Worker processes of a run: its direct children that are multiprocessing workers."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
            out.append(int(entry))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_answers(port: int) -> bool:
    """PING gets PONG: the server is up and has loaded its AOF (while loading it says LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A private redis-server with the AOF on (every acknowledged write survives a restart)."""

    def __init__(self, directory: Path, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None
        self.url = f"redis://127.0.0.1:{self.port}/0?namespace=chaos"

    def start(self, timeout: float = 30.0) -> None:
        self._log = open(self.dir / "redis.log", "a")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while not _redis_answers(self.port):
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start; see {self.dir / 'redis.log'}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean shutdown: the AOF is flushed
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _restart(server: RedisServer, down_s: float, into: dict, progress) -> None:
    """Stop the server, keep it down about down_s, start it again on the same port and dir."""
    into["at_progress"] = progress()
    t0 = time.time()
    try:
        server.stop()
        into["stopped_after_s"] = round(time.time() - t0, 2)
        time.sleep(down_s)
        server.start()
    except Exception as exc:  # noqa: BLE001 - reported in the results
        into["error"] = repr(exc)
        return
    into["back_at"] = time.time()
    into["down_s"] = round(into["back_at"] - t0, 2)
    into["restarted"] = True


def write_leads(path: Path, n: int, rng: random.Random) -> int:
    """n leads, about 2% unknown to the gateway. Returns how many are unknown."""
    seen, unknown = set(), 0
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("手机号,姓名,负责人\n")
        while len(seen) < n:
            num = f"{rng.choice(PREFIXES)}{rng.randrange(10**8):08d}"
            if num in seen:
                continue
            seen.add(num)
            unknown += num.endswith("44")
            fh.write(f"{num},客户{len(seen)},{rng.choice(['zhangsan', 'lisi', 'wangwu'])}\n")
    return unknown


def chaos(leads: int = 2000, workers: int = 4, kills: int = 10, rate: int = 100, seed: int = 1,
          provider: str = "msg_template", workdir: str | None = None, log=print, store: str = "disk",
          redis_restart: bool | None = None, redis_down_s: float = 3.0) -> dict:
    if store not in ("disk", "redis"):
        raise ValueError(f"store must be disk or redis, not {store!r}")
    if redis_restart is None:
        redis_restart = store == "redis"
    rng = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="wecomctl-chaos-"))
    server = None
    extra: list[str] = []
    if store == "redis":
        if shutil.which("redis-server") is None:
            raise RuntimeError("--store redis needs redis-server on PATH")
        server = RedisServer(work / "redis")
        server.start()
        extra = ["--store", server.url]
        log(f"redis-server on port {server.port}, AOF in {server.dir}")
    try:
        return _chaos(leads, workers, kills, rate, seed, provider, work, log, store, server, extra,
                      redis_restart and server is not None, redis_down_s, rng)
    finally:
        if server is not None:
            server.stop()


def _chaos(leads, workers, kills, rate, seed, provider, work, log, store, server, extra, redis_restart,
           redis_down_s, rng) -> dict:
    sc = SimConfig(latency_ms=40, latency_jitter_ms=40, busy_rate=0.05, token_ttl_s=8, rate_limit=rate, seed=seed)
    restart: dict = {"restarted": False}
    with start_process(sc) as sim:
        conf_data = yaml.safe_load(cfg.simulator_config(sim.url, sc))
        conf_data["run"].update(workers=workers, lease_s=3, max_deliveries=20)
        conf_data["welcome"]["provider"] = provider
        conf = work / "chaos.yaml"
        conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
        data = str(work / "data")
        unknown = write_leads(work / "leads.csv", leads, rng)
        imp = wecomctl("import", str(work / "leads.csv"), "--campaign", "chaos", "-c", str(conf), "-d", data, "--json",
                       *extra)
        assert imp.returncode == 0, imp.stderr
        log(f"imported {leads} leads ({unknown} unknown to the gateway) into {data}")

        t0 = time.time()
        with open(work / "run1.out", "w") as out:
            run = subprocess.Popen([sys.executable, "-m", "wecomctl", "run", "-c", str(conf), "-d", data, *extra],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            done_kills = 0
            restarter = None

            def progress() -> int:
                st = sim.stats()
                return st["adds"] + st["welcomes"]

            while done_kills < kills and run.poll() is None:
                time.sleep(1.0)
                pids = children(run.pid)
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    done_kills += 1
                if redis_restart and restarter is None and done_kills >= kills // 2:
                    # in a thread: the worker kills go on while Redis is down
                    restart["at_kill"] = done_kills
                    restart["at_s"] = round(time.time() - t0, 1)
                    restarter = threading.Thread(target=_restart, args=(server, redis_down_s, restart, progress))
                    restarter.start()
            if restarter is not None:
                restarter.join()
                if not restart["restarted"]:
                    raise RuntimeError(f"the Redis restart failed: {restart.get('error')}")
                log(f"restarted redis-server at kill {restart['at_kill']}: down {restart['down_s']}s")
                # the run has to make progress again before it is killed as a whole
                deadline = time.time() + 60
                while progress() <= restart["at_progress"] and run.poll() is None and time.time() < deadline:
                    time.sleep(0.1)
                moved = progress() > restart["at_progress"]
                restart["resumed"] = moved
                restart["resumed_after_s"] = round(time.time() - restart["back_at"], 1) if moved else None
                restart["run_said_waiting"] = restart["run_said_back"] = False
            log(f"killed {done_kills} workers in {time.time() - t0:.1f}s; now SIGKILL the whole run")
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        if restart["restarted"]:
            said = (work / "run1.out").read_text(encoding="utf-8", errors="replace")
            restart["run_said_waiting"] = "unreachable" in said
            restart["run_said_back"] = "is back" in said
        mid = json.loads(wecomctl("status", "--json", "-c", str(conf), "-d", data, *extra).stdout)

        second = wecomctl("run", "-c", str(conf), "-d", data, "--json", *extra)
        elapsed = time.time() - t0
        check = wecomctl("check", "--json", "-c", str(conf), "-d", data, *extra)
        status = json.loads(wecomctl("status", "--json", "-c", str(conf), "-d", data, *extra).stdout)
        dlq = json.loads(wecomctl("dlq", "list", "--json", "-c", str(conf), "-d", data, *extra).stdout)
        stats = sim.stats()

    stages = status["stages"]
    ambiguous = sum(1 for d in dlq if d["kind"] == "ambiguous")
    result = {
        "bench": "chaos", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {"leads": leads, "workers": workers, "kills": kills, "rate_limit": rate, "seed": seed,
                   "provider": provider},
        "lookups": {api: stats["calls"].get(api, 0) for api in ("get_groupmsg_list_v2", "get_groupmsg_send_result")},
        "kills": done_kills + 1, "worker_kills": done_kills, "unknown_numbers": unknown,
        "queued_after_kill": {s: mid["stages"][s]["ready"] + mid["stages"][s]["delayed"] + mid["stages"][s]["leased"]
                              for s in ("add", "welcome")},
        "second_run_exit": second.returncode, "elapsed_s": round(elapsed, 1),
        "check_ok": json.loads(check.stdout)["ok"] if check.stdout else False,
        "check_problems": json.loads(check.stdout)["problems"] if check.stdout else [check.stderr],
        "imported": status["imported"], "stages": stages, "ambiguous": ambiguous,
        "dead_by_kind": _by_kind(dlq), "duplicate_welcomes": stats["duplicate_welcomes"],
        "sim_welcomes": stats["welcomes"], "sim_adds": stats["adds"],
    }
    result["holds"] = {
        "check passes": result["check_ok"],
        "add: imported = done + dead + skipped": status["imported"] == sum(stages["add"][k] for k in ("done", "dead", "skipped")),
        "welcome: entered = done + dead + skipped": stages["welcome"]["entered"] == sum(stages["welcome"][k] for k in ("done", "dead", "skipped")),
        "nothing left queued": all(stages[s][k] == 0 for s in stages for k in ("ready", "delayed", "leased")),
        "duplicate_welcomes = 0": stats["duplicate_welcomes"] == 0,
        "ambiguous <= kills": ambiguous <= result["kills"],
    }
    if store == "redis":
        result["params"]["store"] = "redis"
        restart.pop("back_at", None)
        restart.pop("at_progress", None)
        result["redis_restart"] = restart
        if redis_restart:
            result["holds"]["run carried on after the Redis restart"] = bool(restart.get("resumed"))
    return result


def _by_kind(dlq: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dlq:
        key = f"{d['stage']}:{d['errcode'] if d['errcode'] is not None else d['kind']}"
        out[key] = out.get(key, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--leads", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--rate", type=int, default=100, help="simulator and config limit, calls/s per API")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--provider", default="msg_template", choices=["msg_template", "gateway", "welcome_code"])
    ap.add_argument("--store", default="disk", choices=["disk", "redis"],
                    help="disk: the data dir (default); redis: a private redis-server with the AOF on")
    ap.add_argument("--redis-restart", action=argparse.BooleanOptionalAction, default=None,
                    help="stop redis-server mid-kills for about 3 s, then start it again (default: on for redis)")
    args = ap.parse_args()
    r = chaos(args.leads, args.workers, args.kills, args.rate, args.seed, args.provider, store=args.store,
              redis_restart=args.redis_restart)
    print(f"\n{'what':<42} value")
    for k in ("kills", "imported", "ambiguous", "duplicate_welcomes", "sim_welcomes", "lookups", "elapsed_s",
              "second_run_exit"):
        print(f"{k:<42} {r[k]}")
    for stage, row in r["stages"].items():
        print(f"{stage:<42} " + " ".join(f"{k}={v}" for k, v in row.items()))
    print(f"{'dead by kind':<42} {r['dead_by_kind']}")
    if "redis_restart" in r:
        print(f"{'redis restart':<42} " + " ".join(f"{k}={v}" for k, v in r["redis_restart"].items()))
    for what, ok in r["holds"].items():
        print(f"{what:<42} {'yes' if ok else 'NO'}")
    RESULTS.mkdir(exist_ok=True)
    suffix = "-redis" if args.store == "redis" else ""
    (RESULTS / f"chaos-{args.provider}-{args.leads}{suffix}.json").write_text(json.dumps(r, ensure_ascii=False, indent=1), encoding="utf-8")
    sys.exit(0 if all(r["holds"].values()) else 1)


if __name__ == "__main__":
    main()
