"""Operating a campaign, end to end over real sockets: logs, status, Prometheus, alerts to
the group robot, write-back to the business system, dead-letter export, secrets."""

import csv
import json
import os
import re
import subprocess
import sys

import httpx
import yaml

from test_e2e import cli, make_leads
from wecomctl import config as cfg
from wecomctl.simulator import SimConfig, start_in_thread

MOBILE = re.compile(r"(?<!\d)1[3-9]\d{9}(?!\d)")


def setup(tmp_path, handle, sc, writeback=False, **sections):
    """A config for the simulator with some sections changed, and the leads imported."""
    data = yaml.safe_load(cfg.simulator_config(handle.url, sc, writeback=writeback))
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    d = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    valid, unknown = make_leads(leads, n_valid=60, n_invalid=0, n_unknown=12, n_dupes=0)
    cli("import", str(leads), "--campaign", "op", "--config", str(conf), "--data-dir", d)
    return str(conf), d, valid, unknown


def sim_get(handle, path):
    return httpx.get(f"{handle.url}{path}", timeout=5).json()


def test_json_logs_masked_phones_and_no_secret_anywhere(tmp_path):
    sc = SimConfig(busy_rate=0.2, seed=5)
    with start_in_thread(sc) as handle:
        conf, d, valid, unknown = setup(tmp_path, handle, sc, writeback=True)
        log = tmp_path / "run.log"
        run = cli("run", "--config", conf, "--data-dir", d, "--workers", "2", "--log-level", "DEBUG",
                  "--log-format", "json", "--log-file", str(log))
        assert run.returncode == 1, run.stderr  # the unknown numbers are dead
        lines = log.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        assert records and all({"ts", "level", "logger", "message"} <= set(r) for r in records)
        failed = [r for r in records if r.get("errcode") == 910001]
        assert failed and all(r["campaign"] == "op" and r["stage"] == "add" and r["lead"] for r in failed)
        assert any("****" in r["message"] for r in records)  # phones are there, masked
        assert not MOBILE.search(log.read_text(encoding="utf-8"))
        # every place a run writes: logs, output, DLQ and result exports, rejects, the store
        dlq = cli("dlq", "list", "--json", "--config", conf, "--data-dir", d).stdout
        exp = cli("export", "--config", conf, "--data-dir", d).stdout
        cli("dlq", "export", "-o", str(tmp_path / "dlq.csv"), "--config", conf, "--data-dir", d)
        token = sim_get(handle, "/_sim/stats")  # the simulator never shows its credentials
        assert sc.corp_secret not in json.dumps(token)
        texts = [log.read_text(encoding="utf-8"), run.stdout, run.stderr, dlq, exp,
                 (tmp_path / "dlq.csv").read_text(encoding="utf-8-sig")]
        for root, _dirs, files in os.walk(d):
            for name in files:
                texts.append(open(os.path.join(root, name), "rb").read().decode("utf-8", "replace"))
        for secret in (sc.corp_secret, sc.gateway_key, sc.robot_key):
            assert not any(secret in t for t in texts), secret


def test_status_json_prometheus_and_check(tmp_path):
    sc = SimConfig(seed=2)
    with start_in_thread(sc) as handle:
        conf, d, valid, unknown = setup(tmp_path, handle, sc, alerts={"dlq_growth": 5, "robot_key": ""})
        cli("run", "--config", conf, "--data-dir", d, "--workers", "1")
        prom = tmp_path / "wecomctl.prom"
        st = cli("status", "--json", "--check", "--prometheus", str(prom), "--config", conf, "--data-dir", d)
        data = json.loads(st.stdout)
        add = data["campaigns"]["op"]["stages"]["add"]
        assert add["done"] == 60 and add["dead"] == 12 and add["dead_by_code"] == {"910001": 12}
        assert add["done_5m"] == 60 and add["failed_5m"] == 12 and add["error_rate_5m"] == round(12 / 72, 4)
        assert add["oldest_ready_s"] is None and data["dead_by_code"] == {"910001": 12}
        assert [a["key"] for a in data["alerts"]] == ["dlq:op:add"]
        assert st.returncode == 1  # --check: an alert is in force
        text = prom.read_text(encoding="utf-8")
        assert 'wecomctl_items{campaign="op",stage="add",state="done"} 60' in text
        assert 'wecomctl_dead_letters{campaign="op",stage="add",errcode="910001"} 12' in text
        assert 'wecomctl_alerts{alert="dlq:op:add"} 1' in text
        assert not list(tmp_path.glob(".wecomctl.prom.*"))  # written by rename, nothing left over
        # below the thresholds --check passes
        relaxed = tmp_path / "relaxed.yaml"
        body = yaml.safe_load(open(conf, encoding="utf-8"))
        body["alerts"].update(dlq_growth=0, error_rate=0)
        relaxed.write_text(yaml.safe_dump(body), encoding="utf-8")
        ok = cli("status", "--check", "--config", str(relaxed), "--data-dir", d)
        assert ok.returncode == 0, ok.stdout


def test_a_storm_of_dead_letters_sends_one_robot_message(tmp_path):
    sc = SimConfig(seed=4)
    with start_in_thread(sc) as handle:
        conf, d, valid, unknown = setup(tmp_path, handle, sc, alerts={"dlq_growth": 3, "min_interval_s": 600})
        cli("run", "--config", conf, "--data-dir", d, "--workers", "2")
        messages = sim_get(handle, "/_sim/robot")
        assert len(messages) == 1, messages
        assert messages[0]["msgtype"] == "markdown" and "dead letters" in messages[0]["content"]
        # cron asking again: the alert still holds, but it was told already
        again = cli("status", "--check", "--notify", "--json", "--config", conf, "--data-dir", d)
        assert again.returncode == 1 and json.loads(again.stdout)["notified"] == []
        assert len(sim_get(handle, "/_sim/robot")) == 1


def test_write_back_delivers_every_outcome_once_through_failures(tmp_path):
    sc = SimConfig(seed=6, writeback_fail_rate=0.3, writeback_lost_reply_rate=0.2)
    with start_in_thread(sc) as handle:
        # 44% of deliveries fail: with 16 attempts, giving up on one of 72 is a 1-in-7,000 event
        conf, d, valid, unknown = setup(tmp_path, handle, sc, writeback=True,
                                        retry={"max_attempts": 16, "base_delay_s": 0.05, "max_delay_s": 0.5})
        run = cli("run", "--config", conf, "--data-dir", d, "--workers", "2", "--json")
        summary = json.loads(run.stdout)
        assert summary["stages"]["writeback"]["done"] == 72, summary
        got = sim_get(handle, "/_sim/writeback")
        stats = sim_get(handle, "/_sim/stats")
        by_lead = {}
        for key, body in got.items():
            by_lead.setdefault(body["lead_id"], []).append(body)
        assert len(got) == 72 and len(by_lead) == 72  # each outcome stored once
        assert stats["writeback_posts"] > 72 and stats["writeback_repeats"] > 0  # failures were retried
        welcomed = [b[0] for b in by_lead.values() if b[0]["status"] == "welcomed"]
        dead = [b[0] for b in by_lead.values() if b[0]["status"] == "dead"]
        assert len(welcomed) == 60 and len(dead) == 12
        assert all(b["errcode"] == 910001 and b["add_status"] == "dead" for b in dead)
        assert all(b["external_userid"] and b["welcome_status"] == "task_created" for b in welcomed)
        # replaying the dead letters ends them again: the new outcome is written back too
        cli("retry-dlq", "--stage", "add", "--config", conf, "--data-dir", d)
        cli("run", "--config", conf, "--data-dir", d, "--workers", "1")
        got = sim_get(handle, "/_sim/writeback")
        assert len(got) == 84
        versions = sorted(b["version"] for b in got.values() if b["status"] == "dead")
        assert versions == [1] * 12 + [2] * 12
        check = cli("check", "--config", conf, "--data-dir", d)
        assert check.returncode == 0, check.stdout


def test_export_filters_and_dlq_export(tmp_path):
    sc = SimConfig(seed=8)
    with start_in_thread(sc) as handle:
        conf, d, valid, unknown = setup(tmp_path, handle, sc)
        cli("run", "--config", conf, "--data-dir", d, "--workers", "1")
        out = tmp_path / "dead.csv"
        cli("export", "--status", "dead", "--mask-phones", "-o", str(out), "--config", conf, "--data-dir", d)
        rows = list(csv.DictReader(open(out, encoding="utf-8-sig")))
        assert len(rows) == 12 and all(r["status"] == "dead" and "****" in r["phone"] for r in rows)
        assert {r["phone"][-4:] for r in rows} == {u[-4:] for u in unknown}
        bad = cli("export", "--status", "gone", "--config", conf, "--data-dir", d, check=False)
        assert bad.returncode == 2 and "welcomed" in bad.stderr
        fix = tmp_path / "fix.csv"
        cli("dlq", "export", "-o", str(fix), "--stage", "add", "--config", conf, "--data-dir", d)
        letters = list(csv.DictReader(open(fix, encoding="utf-8-sig")))
        assert len(letters) == 12 and all(r["dlq_errcode"] == "910001" and r["dlq_todo"] for r in letters)
        assert {r["dlq_phone"] for r in letters} == {f"+86{u}" for u in unknown}


def test_a_wrong_secret_stops_at_once_and_the_robot_hears_of_it(tmp_path):
    sc = SimConfig(seed=9)
    with start_in_thread(sc) as handle:
        conf, d, valid, unknown = setup(tmp_path, handle, sc)
        assert cli("run", "--config", conf, "--data-dir", d, "--workers", "1").returncode == 1  # a token is cached now
        body = yaml.safe_load(open(conf, encoding="utf-8"))
        body["wecom"]["corp_secret"] = "mistyped"  # a rotated or mistyped secret
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(body), encoding="utf-8")
        leads = tmp_path / "more.csv"
        make_leads(leads, n_valid=5, n_invalid=0, n_unknown=0, n_dupes=0, seed=42)
        cli("import", str(leads), "--campaign", "op", "--config", str(bad), "--data-dir", d)
        run = cli("run", "--config", str(bad), "--data-dir", d, "--workers", "1", check=False)
        assert run.returncode == 3 and "40001" in run.stderr  # not hidden by the cached token
        messages = sim_get(handle, "/_sim/robot")
        assert len(messages) == 1 and "stopped" in messages[0]["content"] and "mistyped" not in messages[0]["content"]
        st = cli("status", "--check", "--config", str(bad), "--data-dir", d)
        assert st.returncode == 1


def test_the_pause_alert_is_about_how_long_an_api_has_been_paused(tmp_path):
    # WeCom blocks for about a minute after a 45009; a block renewed again and again is
    # what the operator must hear about, however little of the current one is left.
    from wecomctl.report import health
    from wecomctl.store.disk import DiskStore

    settings = cfg.load(None, str(tmp_path / "d"))
    settings.alerts.pause_min = 10
    store = DiskStore(str(tmp_path / "d"))
    t0 = 1_800_000_000.0

    def alerts_at(minute, paused):
        snap = {"campaigns": {}, "pauses": {"add_by_phone": 55.0} if paused else {}}
        snap["paused_for"] = health._paused_for(store, snap["pauses"], t0 + minute * 60)
        return [a.key for a in health.evaluate(snap, settings)], snap["paused_for"]

    try:
        assert alerts_at(0, True) == ([], {"add_by_phone": 0.0})
        assert alerts_at(9, True) == ([], {"add_by_phone": 540.0})  # renewed each minute
        keys, paused_for = alerts_at(10, True)
        assert keys == ["pause:add_by_phone"] and paused_for == {"add_by_phone": 600.0}
        assert alerts_at(11, False) == ([], {})  # over: the next pause starts afresh
        assert alerts_at(12, True) == ([], {"add_by_phone": 0.0})
    finally:
        store.close()


def _campaign(ready, done):
    row = {"ready": ready, "delayed": 0, "leased": 0, "done": done, "dead": 0, "skipped": 0, "entered": ready + done}
    empty = {k: 0 for k in row}
    return {"imported": ready + done, "skipped": 0, "stages": {"add": row, "welcome": dict(empty), "writeback": dict(empty)}}


def test_progress_shows_each_campaign_the_run_works_on_and_not_finished_ones():
    import io

    from rich.console import Console

    from wecomctl.report.progress import LiveProgress, PlainProgress

    out = io.StringIO()
    plain = PlainProgress(out, interval=0)
    plain.tick({"old": _campaign(0, 50), "spring": _campaign(10, 0)}, 1.0)
    plain.tick({"old": _campaign(0, 50), "spring": _campaign(4, 6), "autumn": _campaign(8, 0)}, 2.0, final=True)
    first, second = out.getvalue().splitlines()
    assert " add: 0/10 " in first and "spring" not in first and "done=50" not in first  # one campaign: its own
    assert "spring add: 6/10 done=6" in second and "autumn add: 0/8" in second and "old" not in second
    screen = io.StringIO()
    with LiveProgress(Console(file=screen, force_terminal=True, width=120)) as live:
        live.tick({"old": _campaign(0, 50), "spring": _campaign(4, 6), "autumn": _campaign(8, 0)}, 1.0)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "spring add" in text and "6/10" in text and "autumn add" in text and "0/8" in text and "old" not in text


def test_messages_show_brackets_as_written_and_unknown_campaigns_are_errors(tmp_path):
    # rich would read "[bold]" in a file name as markup and swallow it.
    missing = cli("import", str(tmp_path / "leads[bold].csv"), "--campaign", "c", "-d", str(tmp_path / "d"),
                  check=False)
    assert missing.returncode == 2 and "leads[bold].csv" in missing.stderr
    device = cli("import", os.devnull, "--campaign", "c", "-d", str(tmp_path / "d"), check=False)
    assert device.returncode == 2 and "not a regular file" in device.stderr
    leads = tmp_path / "l[1].csv"
    make_leads(leads, n_valid=3, n_invalid=0, n_unknown=0, n_dupes=0)
    imported = cli("import", str(leads), "--campaign", "[b]spring", "--owner", "u", "-d", str(tmp_path / "d"))
    assert "l[1].csv" in imported.stdout
    # A mistyped campaign would list, export or move nothing and look like success.
    for command in (["export", "-o", str(tmp_path / "x.csv")], ["dlq", "list"], ["retry-dlq"],
                    ["dlq", "export", "-o", str(tmp_path / "y.csv")], ["status"]):
        proc = cli(*command, "--campaign", "sprnig", "-d", str(tmp_path / "d"), check=False)
        assert proc.returncode == 2 and "no campaign 'sprnig'" in proc.stderr and "[b]spring" in proc.stderr, command
    assert not (tmp_path / "x.csv").exists()


def test_the_to_fix_file_from_dlq_export_goes_back_in_fixed_rows_only(tmp_path):
    # dlq export -> a person fixes some rows -> import: the fixed rows are queued again
    # with every column the welcome uses; the rows left as they were stay dead.
    from wecomctl.store.base import Failure
    from wecomctl.store.disk import DiskStore

    d = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    with open(leads, "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("手机号", "姓名", "负责人", "城市", "备注", "标签"),
                                  ("13800138001", "张三", "ghost", "北京", "vip", "a"),
                                  ("13800138002", "李四", "ghost", "上海", "", "b"),
                                  ("13800138003", "王五", "lisi", "广州", "", "")])
    cli("import", str(leads), "--campaign", "c", "-d", d)
    store = DiskStore(d)
    for _ in range(2):  # the two with an owner WeCom does not know die
        item = store.lease("add", 30, 1.0)
        store.bury(item, Failure(60111, "invalid userid", "dead"), 1.0)
    store.close()
    to_fix = tmp_path / "to-fix.csv"
    cli("dlq", "export", "-o", str(to_fix), "-d", d)
    with open(to_fix, encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["城市"] for r in rows] == ["北京", "上海"] and rows[0]["dlq_errcode"] == "60111"
    assert "remark" not in rows[0] and "tags" not in rows[0]  # the file's own 备注 and 标签 only
    assert rows[0]["dlq_todo"] and rows[0]["负责人"] == "ghost"
    same = json.loads(cli("import", str(to_fix), "--campaign", "c", "-d", d, "--json").stdout)
    assert (same["revived"], same["skipped"]) == (0, 2)  # nothing fixed, nothing comes back
    rows[1]["负责人"] = "zhangsan"  # the person fixes one row
    with open(to_fix, "w", encoding="utf-8-sig", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fixed = json.loads(cli("import", str(to_fix), "--campaign", "c", "-d", d, "--json").stdout)
    assert (fixed["revived"], fixed["skipped"]) == (1, 1)
    store = DiskStore(d)
    lead = store.lead(store.find_phone("c", "+8613800138002"))
    store.close()
    assert lead["owner"] == "zhangsan" and lead["add"]["state"] == "ready"
    assert lead["fields"] == {"手机号": "13800138002", "姓名": "李四", "负责人": "zhangsan", "城市": "上海",
                              "备注": "", "标签": "b", "remark": "", "tags": "b"}


def test_status_watch_follows_the_store_until_ctrl_c(tmp_path):
    import signal
    import time

    d = str(tmp_path / "d")
    first = tmp_path / "a.csv"
    make_leads(first, n_valid=3, n_invalid=0, n_unknown=0, n_dupes=0)
    cli("import", str(first), "--campaign", "w", "--owner", "u", "-d", d)
    watch = subprocess.Popen([sys.executable, "-m", "wecomctl", "status", "--watch", "--interval", "0.5", "--json",
                              "-d", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert json.loads(watch.stdout.readline())["imported"] == 3
        more = tmp_path / "b.csv"
        make_leads(more, n_valid=5, n_invalid=0, n_unknown=0, n_dupes=0, seed=9)
        cli("import", str(more), "--campaign", "w", "--owner", "u", "-d", d)
        deadline = time.monotonic() + 30
        while json.loads(watch.stdout.readline())["imported"] != 8:  # each snapshot is read afresh
            assert time.monotonic() < deadline
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 0 and "Traceback" not in watch.stderr.read()
    finally:
        if watch.poll() is None:
            watch.kill()
