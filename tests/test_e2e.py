"""The spine, end to end over real sockets: simulator with faults, CLI import, run, status, export."""

import csv
import io
import json
import os
import random
import re
import subprocess
import sys

import pytest
import yaml

from wecomctl import config as cfg
from wecomctl.samples import PREFIXES
from wecomctl.simulator import SimConfig, start_in_thread

STAFF = ["zhangsan", "lisi", "wangwu"]


def cli(*args, check=True, env=None):
    proc = subprocess.run([sys.executable, "-m", "wecomctl", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    if check and proc.returncode not in (0, 1):
        raise AssertionError(f"wecomctl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_leads(path, n_valid=470, n_invalid=10, n_unknown=10, n_dupes=10, seed=1):
    rng = random.Random(seed)
    valid = set()
    while len(valid) < n_valid:
        num = f"{rng.choice(PREFIXES)}{rng.randrange(10**8):08d}"
        if not num.endswith("44"):
            valid.add(num)
    valid = sorted(valid)
    unknown = [f"139{rng.randrange(10**6):06d}44" for _ in range(n_unknown)]
    rows = [(v, f"客户{i}", STAFF[i % 3]) for i, v in enumerate(valid)]
    rows += [(u, "未知", "lisi") for u in unknown]
    rows += [("12345", "坏号", "lisi")] * n_invalid
    rows += [(f"+86 {v[:3]} {v[3:7]} {v[7:]}", "重复", "lisi") for v in valid[:n_dupes]]
    rng.shuffle(rows)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["手机号", "姓名", "负责人"])
        w.writerows(rows)
    return valid, unknown


def prepare(tmp_path, handle, sc, n_valid, campaign):
    """The simulator's own config, n_valid good leads, imported. Returns (config, data dir)."""
    conf = tmp_path / "c.yaml"
    conf.write_text(cfg.simulator_config(handle.url, sc), encoding="utf-8")
    data = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    make_leads(leads, n_valid=n_valid, n_invalid=0, n_unknown=0, n_dupes=0)
    cli("import", str(leads), "--campaign", campaign, "--config", str(conf), "--data-dir", data)
    return conf, data


@pytest.fixture
def sim():
    sc = SimConfig(latency_ms=20, latency_jitter_ms=20, busy_rate=0.05, token_ttl_s=3, rate_limit=40, seed=3)
    with start_in_thread(sc) as handle:
        yield sc, handle


def test_campaign_end_to_end(tmp_path, sim):
    sc, handle = sim
    conf = tmp_path / "sim.yaml"
    conf.write_text(cfg.simulator_config(handle.url, sc), encoding="utf-8")
    data = str(tmp_path / "data")
    leads = tmp_path / "leads.csv"
    valid, unknown = make_leads(leads)

    imp = cli("import", str(leads), "--campaign", "e2e", "--config", str(conf), "--data-dir", data, "--json")
    report = json.loads(imp.stdout)
    assert report["accepted"] == 480 and report["rejected"] == 10 and report["skipped"] == 10
    assert imp.returncode == 1  # rejects
    with open(report["rejects_file"], encoding="utf-8-sig") as fh:
        rejects = list(csv.DictReader(fh))
    assert len(rejects) == 10 and all(r["raw"] == "12345" and r["reason"] for r in rejects)
    # importing the same file again adds nothing
    again = json.loads(cli("import", str(leads), "--campaign", "e2e", "--config", str(conf), "--data-dir", data, "--json").stdout)
    assert again["accepted"] == 0 and again["skipped"] == 490

    log = tmp_path / "run.out"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "wecomctl", "run", "--config", str(conf), "--data-dir", data,
                               "--workers", "2", "--progress-interval", "2"],
                              stdout=fh, stderr=subprocess.PIPE, text=True, timeout=300)
    out = log.read_text()
    assert proc.returncode == 1, proc.stderr  # the unknown numbers are dead
    assert "\x1b" not in out and "\r" not in out  # no terminal control codes in a file
    assert re.search(r"progress \d+s add: \d+/480", out)
    assert re.search(r"add: .* rate=[\d.]+/s \(limit 40/s\) eta=", out)  # against the limit, with time left

    st = json.loads(cli("status", "--json", "--config", str(conf), "--data-dir", data).stdout)
    add, welcome = st["stages"]["add"], st["stages"]["welcome"]
    assert st["imported"] == 480 == add["done"] + add["dead"]
    assert add["dead"] == len(unknown)
    assert welcome["entered"] == add["done"] == welcome["done"]

    stats = handle.stats()
    assert stats["duplicate_welcomes"] == 0
    assert stats["welcomes"] == len(valid)
    assert "45009" not in json.dumps(stats["errors"])  # configured at the simulator's limit
    assert stats["errors"].get("add_by_phone", {}).get("910001") == len(unknown)
    assert stats["errors"].get("add_by_phone", {}).get("-1", 0) > 0  # faults really happened
    assert stats["calls"]["gettoken"] >= 2  # tokens expired and were refreshed

    dlq = json.loads(cli("dlq", "list", "--json", "--config", str(conf), "--data-dir", data).stdout)
    assert {d["errcode"] for d in dlq} == {910001}
    assert sorted(d["phone"] for d in dlq) == sorted("+86" + u for u in unknown)

    exp = cli("export", "--format", "csv", "--config", str(conf), "--data-dir", data).stdout
    rows = list(csv.DictReader(io.StringIO(exp.lstrip("\ufeff"))))
    assert len(rows) == 480
    welcomed = [r for r in rows if r["welcome_status"] == "task_created"]
    assert len(welcomed) == len(valid) and all(r["external_userid"].startswith("wm") for r in welcomed)
    dead = [r for r in rows if r["add_status"] == "dead"]
    assert all(r["errcode"] == "910001" for r in dead)

    # secrets never reach logs, exports or the store's readable outputs
    for text in (out, proc.stderr, exp, json.dumps(dlq)):
        assert sc.corp_secret not in text and sc.gateway_key not in text


def test_bad_input_gets_one_line_errors(tmp_path):
    cases = [
        (["import", str(tmp_path / "missing.csv"), "--campaign", "x"], 2, "file not found"),
        (["import", str(tmp_path / "missing.csv")], 2, "--campaign"),
        (["status", "--data-dir", str(tmp_path / "none")], 2, "wecomctl import"),
        (["run", "--config", str(tmp_path / "nope.yaml")], 2, "config file not found"),
    ]
    bad = tmp_path / "bad.yaml"
    bad.write_text("wecom: [unclosed", encoding="utf-8")
    cases.append((["status", "--config", str(bad)], 2, "not valid YAML"))
    for args, code, words in cases:
        proc = cli(*args, check=False)
        assert proc.returncode == code, (args, proc.stdout, proc.stderr)
        assert words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)


def test_unreachable_api_stops_the_run_with_items_queued(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(cfg.simulator_config("http://127.0.0.1:9", SimConfig()), encoding="utf-8")  # nothing on 9
    data = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    leads.write_text("phone,name,owner\n13800138000,A,zhangsan\n", encoding="utf-8")
    cli("import", str(leads), "--campaign", "u", "--config", str(conf), "--data-dir", data)
    proc = cli("run", "--config", str(conf), "--data-dir", data, "--workers", "1", check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "cannot reach" in lines[-1]  # one line says what is wrong...
    assert all("could not send an alert" in line for line in lines[:-1])  # (its robot is on that host too)
    st = json.loads(cli("status", "--json", "--config", str(conf), "--data-dir", data).stdout)
    assert st["stages"]["add"]["ready"] == 1 and st["stages"]["add"]["dead"] == 0
    # ...and a cron job's monitoring hears of it: the stop is a fatal alert
    assert st["fatal"] and "cannot reach" in st["fatal"]["error"] and st["alerts"][0]["key"] == "fatal"


def test_bad_secret_stops_before_any_item_is_touched(tmp_path, sim):
    sc, handle = sim
    conf_data = yaml.safe_load(cfg.simulator_config(handle.url, sc))
    conf_data["wecom"]["corp_secret"] = "wrong-secret"
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
    data = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    leads.write_text("phone,name,owner\n13800138000,A,zhangsan\n", encoding="utf-8")
    cli("import", str(leads), "--campaign", "u", "--config", str(conf), "--data-dir", data)
    proc = cli("run", "--config", str(conf), "--data-dir", data, "--workers", "1", check=False)
    assert proc.returncode == 3 and "40001" in proc.stderr and "wrong-secret" not in proc.stderr
    assert handle.stats()["calls"]["add_by_phone"] == 0


@pytest.mark.parametrize("provider", ["gateway", "welcome_code"])
def test_other_welcome_providers_end_to_end(tmp_path, provider):
    sc = SimConfig(latency_ms=10, busy_rate=0.05, rate_limit=80, seed=5)
    with start_in_thread(sc) as handle:
        conf_data = yaml.safe_load(cfg.simulator_config(handle.url, sc))
        conf_data["welcome"]["provider"] = provider
        conf = tmp_path / "c.yaml"
        conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
        data = str(tmp_path / "d")
        leads = tmp_path / "l.csv"
        valid, unknown = make_leads(leads, n_valid=100, n_invalid=0, n_unknown=3, n_dupes=0, seed=9)
        cli("import", str(leads), "--campaign", "p", "--config", str(conf), "--data-dir", data)
        proc = cli("run", "--config", str(conf), "--data-dir", data, "--workers", "1", "--json", check=False)
        assert proc.returncode == 1, proc.stderr
        st = json.loads(cli("status", "--json", "--config", str(conf), "--data-dir", data).stdout)
        stats = handle.stats()
    api = {"gateway": "send_text", "welcome_code": "send_welcome_msg"}[provider]
    assert st["stages"]["welcome"]["done"] == 100 and st["stages"]["add"]["dead"] == 3
    assert stats["calls"][api] >= 100 and stats["calls"].get("add_msg_template", 0) == 0
    assert stats["welcomes"] == 100 and stats["duplicate_welcomes"] == 0


def test_live_view_on_a_terminal(tmp_path):
    """On a terminal (a pty here) the parent draws rich bars instead of plain lines."""
    import pty
    import select

    sc = SimConfig(latency_ms=20, rate_limit=50)
    with start_in_thread(sc) as handle:
        conf, data = prepare(tmp_path, handle, sc, 60, "t")
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80"}  # a plain terminal's width
        env.pop("CI", None)  # rich treats CI as "not interactive"
        proc = subprocess.Popen([sys.executable, "-m", "wecomctl", "run", "--config", str(conf), "--data-dir", data,
                                 "--workers", "1"], stdout=slave, stderr=slave, env=env)
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=60)
        os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0, screen
    assert "\x1b[" in screen  # cursor control: a live view
    assert "add" in screen and "welcome" in screen and "60/60" in screen
    assert "/50/s ETA" in screen  # the rate against the limit and the time left fit in 80 columns
    assert "progress " not in screen  # not the plain-line format


def test_long_rate_waits_keep_their_leases(tmp_path):
    """Calls that wait longer than the lease for their rate slot are not taken by another
    worker: leases are renewed while a call waits."""
    sc = SimConfig()
    with start_in_thread(sc) as handle:
        conf_data = yaml.safe_load(cfg.simulator_config(handle.url, sc))
        conf_data["run"].update(lease_s=2, workers=2, concurrency=8)
        conf_data["limits"]["add_msg_template"] = {"per_second": 4}  # 16 in flight wait up to 4 s
        conf = tmp_path / "c.yaml"
        conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
        data = str(tmp_path / "d")
        leads = tmp_path / "l.csv"
        make_leads(leads, n_valid=30, n_invalid=0, n_unknown=0, n_dupes=0)
        cli("import", str(leads), "--campaign", "w", "--config", str(conf), "--data-dir", data)
        proc = cli("run", "--config", str(conf), "--data-dir", data, check=False)
        stats = handle.stats()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert stats["welcomes"] == 30 and stats["duplicate_welcomes"] == 0
    st = json.loads(cli("status", "--json", "--config", str(conf), "--data-dir", data).stdout)
    assert st["stages"]["welcome"]["done"] == 30 and st["stages"]["welcome"]["dead"] == 0


def test_two_runs_with_different_data_dirs_share_one_rate_limit(tmp_path):
    sc = SimConfig(rate_limit=25, latency_ms=10)
    with start_in_thread(sc) as handle:
        conf = tmp_path / "c.yaml"
        conf.write_text(cfg.simulator_config(handle.url, sc), encoding="utf-8")
        procs = []
        for host in ("a", "b"):
            leads = tmp_path / f"{host}.csv"
            make_leads(leads, n_valid=100, n_invalid=0, n_unknown=0, n_dupes=0, seed=ord(host))
            data = str(tmp_path / host)
            cli("import", str(leads), "--campaign", host, "--config", str(conf), "--data-dir", data)
            procs.append(subprocess.Popen([sys.executable, "-m", "wecomctl", "run", "--config", str(conf),
                                           "--data-dir", data, "--workers", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        codes = [p.wait(timeout=120) for p in procs]
        stats = handle.stats()
    assert codes == [0, 0], [p.stderr.read() for p in procs]
    assert stats["welcomes"] == 200 and stats["duplicate_welcomes"] == 0
    assert not any("45009" in errs for errs in stats["errors"].values())


@pytest.mark.parametrize("configured_cap", [True, False])
def test_concurrency_cap_fleet_wide_and_aimd_on_45033(tmp_path, configured_cap):
    sc = SimConfig(max_concurrency=3, latency_ms=30)
    with start_in_thread(sc) as handle:
        conf_data = yaml.safe_load(cfg.simulator_config(handle.url, sc))
        if not configured_cap:  # WeCom does not publish its cap: learn it from 45033
            for lim in conf_data["limits"].values():
                lim.pop("max_concurrency", None)
        conf = tmp_path / "c.yaml"
        conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
        data = str(tmp_path / "d")
        leads = tmp_path / "l.csv"
        make_leads(leads, n_valid=80, n_invalid=0, n_unknown=0, n_dupes=0)
        cli("import", str(leads), "--campaign", "m", "--config", str(conf), "--data-dir", data)
        proc = cli("run", "--config", str(conf), "--data-dir", data, "--workers", "2", check=False)
        stats = handle.stats()
    assert proc.returncode == 0, proc.stderr
    assert stats["welcomes"] == 80 and stats["duplicate_welcomes"] == 0
    refused = sum(errs.get("45033", 0) for errs in stats["errors"].values())
    if configured_cap:
        assert refused == 0 and max(stats["max_in_flight"].values()) <= 3
    else:
        assert refused > 0  # learnt the hard way, and nothing was dead-lettered for it


def test_status_shows_an_active_fleet_pause(tmp_path):
    from wecomctl.pipeline.worker import make_limiter

    conf = tmp_path / "c.yaml"
    conf.write_text(cfg.simulator_config("http://127.0.0.1:9", SimConfig()), encoding="utf-8")
    data = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    make_leads(leads, n_valid=1, n_invalid=0, n_unknown=0, n_dupes=0)
    cli("import", str(leads), "--campaign", "p", "--config", str(conf), "--data-dir", data)
    import time
    make_limiter(cfg.load(str(conf), data)).pause("add_by_phone", time.time() + 600)
    st = json.loads(cli("status", "--json", "--config", str(conf), "--data-dir", data).stdout)
    assert 500 < st["pauses"]["add_by_phone"] <= 600
    assert "paused: add_by_phone" in cli("status", "--config", str(conf), "--data-dir", data).stdout


def test_two_runs_on_one_data_dir_share_the_work(tmp_path):
    """Overlapping cron runs: each item is leased by one worker; each run reports its own."""
    sc = SimConfig(latency_ms=20)
    with start_in_thread(sc) as handle:
        conf, data = prepare(tmp_path, handle, sc, 150, "o")
        procs = [subprocess.Popen([sys.executable, "-m", "wecomctl", "run", "--config", str(conf), "--data-dir", data,
                                   "--workers", "1", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        stats = handle.stats()
    assert [r["exit_code"] for r in results] == [0, 0]
    assert sum(r["this_run"]["added"] for r in results) == 150  # each counted its own work
    assert sum(r["this_run"]["welcomed"] for r in results) == 150
    assert stats["welcomes"] == 150 and stats["duplicate_welcomes"] == 0 and stats["adds"] == 150
    check = json.loads(cli("check", "--json", "--config", str(conf), "--data-dir", data).stdout)
    assert check["ok"], check["problems"]


def test_one_customer_in_two_campaigns_gets_one_welcome_per_campaign(tmp_path):
    sc = SimConfig()
    with start_in_thread(sc) as handle:
        conf = tmp_path / "c.yaml"
        conf.write_text(cfg.simulator_config(handle.url, sc), encoding="utf-8")
        data = str(tmp_path / "d")
        leads = tmp_path / "l.csv"
        make_leads(leads, n_valid=20, n_invalid=0, n_unknown=0, n_dupes=0)
        for campaign in ("spring", "summer"):
            cli("import", str(leads), "--campaign", campaign, "--config", str(conf), "--data-dir", data)
        cli("run", "--config", str(conf), "--data-dir", data)
        cli("retry-dlq", "--config", str(conf), "--data-dir", data)  # a replay changes nothing
        cli("run", "--config", str(conf), "--data-dir", data)
        stats = handle.stats()
    assert stats["welcomes"] == 40 and stats["recipients"] == 20  # 20 customers, 2 campaigns
    rows = list(csv.DictReader(io.StringIO(cli("export", "--config", str(conf), "--data-dir", data).stdout.lstrip("\ufeff"))))
    per = {}
    for r in rows:
        per.setdefault(r["external_userid"], []).append((r["campaign"], r["welcome_status"]))
    assert len(per) == 20 and all(sorted(v) == [("spring", "task_created"), ("summer", "task_created")] for v in per.values())


def test_a_fatal_errcode_mid_run_stops_every_worker_and_leaves_items_queued(tmp_path):
    """A wrong gateway key passes the start-up check (the gateway has no key check) and
    fails on the first add with 910401, a fatal errcode."""
    sc = SimConfig(latency_ms=20)
    with start_in_thread(sc) as handle:
        conf_data = yaml.safe_load(cfg.simulator_config(handle.url, sc))
        conf_data["gateway"]["key"] = "not-the-key"
        conf = tmp_path / "c.yaml"
        conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
        data = str(tmp_path / "d")
        leads = tmp_path / "l.csv"
        make_leads(leads, n_valid=50, n_invalid=0, n_unknown=0, n_dupes=0)
        cli("import", str(leads), "--campaign", "f", "--config", str(conf), "--data-dir", data)
        proc = cli("run", "--config", str(conf), "--data-dir", data, "--workers", "2", check=False)
        stats = handle.stats()
    assert proc.returncode == 3, proc.stderr
    assert "910401" in proc.stderr and "gateway key" in proc.stderr and "not-the-key" not in proc.stderr
    st = json.loads(cli("status", "--json", "--config", str(conf), "--data-dir", data).stdout)
    add = st["stages"]["add"]
    assert add["dead"] == 0 and add["done"] == 0 and add["ready"] + add["delayed"] == 50 and add["leased"] == 0
    assert stats["calls"]["add_by_phone"] <= 2 * 8  # stopped at once, not after every item
    assert st["fatal"]["errcode"] == 910401
