"""The Redis store end to end: two "hosts" on one Redis and one strict rate limit, and a
run that rides out a Redis restart. Real processes, real sockets."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from redis_util import REDIS_URL, redis_client_or_skip
from test_e2e import cli, make_leads
from wecomctl import config as cfg
from wecomctl.simulator import SimConfig, start_in_thread


def _cleanup(client, namespace):
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)


def test_two_hosts_on_one_redis_share_the_queue_and_the_limit(tmp_path):
    client = redis_client_or_skip()
    namespace = f"wecomctl-test-{uuid.uuid4().hex[:10]}"
    store = f"{REDIS_URL}?namespace={namespace}"
    sc = SimConfig(rate_limit=20, rate_mode="sliding", latency_ms=20)
    try:
        with start_in_thread(sc) as handle:
            conf = tmp_path / "c.yaml"
            conf.write_text(cfg.simulator_config(handle.url, sc), encoding="utf-8")
            leads = tmp_path / "l.csv"
            make_leads(leads, n_valid=120, n_invalid=0, n_unknown=0, n_dupes=0)
            cli("import", str(leads), "--campaign", "two", "--config", str(conf), "--data-dir",
                str(tmp_path / "a"), "--store", store)
            procs = []
            for host in ("a", "b"):
                # each "host" has its own data dir and its own machine-local shared dir: only
                # Redis connects them
                env = {**os.environ, "WECOMCTL_SHARED_DIR": str(tmp_path / f"shared-{host}")}
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "wecomctl", "run", "--config", str(conf), "--data-dir",
                     str(tmp_path / host), "--store", store, "--workers", "1", "--json"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            outs = [p.communicate(timeout=180) for p in procs]
            stats = handle.stats()
            calls = httpx.get(f"{handle.url}/_sim/calls", params={"api": "add_by_phone"}).json()
        assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
        import json

        this = [json.loads(o[0])["this_run"] for o in outs]
        assert this[0]["added"] > 0 and this[1]["added"] > 0  # both hosts did work
        assert this[0]["added"] + this[1]["added"] == 120  # each lead once
        assert stats["welcomes"] == 120 and stats["duplicate_welcomes"] == 0
        assert not any("45009" in errs for errs in stats["errors"].values())  # sliding window never exceeded
        times = sorted(calls["t"])
        worst = max(sum(1 for u in times[i:] if u - t < 1.0) for i, t in enumerate(times))
        assert worst <= 20
        check = cli("check", "--config", str(conf), "--data-dir", str(tmp_path / "a"), "--store", store)
        assert check.returncode == 0, check.stdout
    finally:
        _cleanup(client, namespace)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(port: int, workdir) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise AssertionError("redis-server did not start")


def test_a_run_rides_out_a_redis_restart(tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    port = _free_port()
    server = _start_redis(port, tmp_path)
    store = f"redis://127.0.0.1:{port}/0?namespace=restart"
    # sliding: the simulator refuses (45009) any call that puts 31 in some 1 s window
    sc = SimConfig(latency_ms=30, rate_limit=30, rate_mode="sliding")
    try:
        with start_in_thread(sc) as handle:
            conf = tmp_path / "c.yaml"
            conf.write_text(cfg.simulator_config(handle.url, sc), encoding="utf-8")
            leads = tmp_path / "l.csv"
            make_leads(leads, n_valid=150, n_invalid=0, n_unknown=0, n_dupes=0)
            cli("import", str(leads), "--campaign", "rs", "--config", str(conf), "--data-dir", str(tmp_path / "d"),
                "--store", store)
            log = tmp_path / "run.log"
            run = subprocess.Popen([sys.executable, "-m", "wecomctl", "run", "--config", str(conf), "--data-dir",
                                    str(tmp_path / "d"), "--store", store, "--workers", "2", "--json",
                                    "--log-file", str(log)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            deadline = time.time() + 60
            while handle.stats()["welcomes"] < 30 and time.time() < deadline:
                time.sleep(0.1)
            server.send_signal(signal.SIGTERM)  # a restart: the AOF keeps every acknowledged write
            server.wait(timeout=30)
            time.sleep(3)  # Redis is down meanwhile
            server = _start_redis(port, tmp_path)
            out, errs = run.communicate(timeout=240)
            stats = handle.stats()
        assert run.returncode == 0, errs
        # told the operator while it was down: on the terminal, though logs go to a file
        assert "unreachable" in errs and "is back" in errs
        assert "unreachable" in log.read_text(encoding="utf-8")
        assert stats["welcomes"] == 150 and stats["duplicate_welcomes"] == 0
        # calls held back while Redis was down took new slots instead of going out together
        assert not any("45009" in errs for errs in stats["errors"].values()), stats["errors"]
        check = cli("check", "--config", str(conf), "--data-dir", str(tmp_path / "d"), "--store", store)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)
