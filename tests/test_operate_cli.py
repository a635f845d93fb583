"""Operating a campaign through the real CLI against the simulator: dead-letter filters,
replays, result exports, robot alerts and secrets.

Most tests share one campaign data set (two campaigns, dead letters in two stages under
three errcodes), built once by a real run and copied for the tests that change it.
Time-based alert rules are driven by moving the state the store keeps (when an alert or
a message was last sent, when an item became ready) back in time, never by sleeping.
"""

import asyncio
import contextlib
import csv
import ctypes
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml

from test_e2e import STAFF, cli, make_leads
from wecomctl import config as cfg
from wecomctl.simulator import SimConfig, SimState, external_userid, start_in_thread
from wecomctl.simulator.server import run_until
from wecomctl.store.disk import DiskStore

MOBILE = re.compile(r"(?<!\d)1[3-9]\d{9}(?!\d)")
STAMP = re.compile(r"\b(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})\b")
# The simulator knows only these two: leads owned by wangwu die at the add with 60111.
SIM_STAFF = ("zhangsan", "lisi")
# The errcodes' meanings and what to do, as data/errcodes.tsv (and its hints) write them.
MEANING = {910001: "mobile not found by the gateway", 60111: "userid does not exist",
           41050: "welcome_code invalid or expired"}
TODO = {910001: "fix or drop the lead", 60111: "fix the owner column and re-import the fixed rows",
        41050: "it is valid for 20 s after the add event, once"}


# --- helpers ------------------------------------------------------------------------------
def write_config(path, data, **sections):
    """Write a config: `data` (a parsed simulator config) with some sections changed."""
    data = json.loads(json.dumps(data))  # a deep copy
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return str(path)


def sim_data(url, sc, writeback=False):
    return yaml.safe_load(cfg.simulator_config(url, sc, writeback=writeback))


def read_rows(path):
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    return [(f"+86{p}", owner) for p, _name, owner in rows[1:]]


def dlq(conf, d, *args):
    proc = cli("dlq", "list", "--json", *args, "--config", conf, "--data-dir", d)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def key(r):
    return (r["campaign"], r["stage"], r["phone"], r["errcode"])


def dlq_key(r):
    """The same, from a row of `dlq export` (its own columns are prefixed dlq_)."""
    return (r["dlq_campaign"], r["dlq_stage"], r["dlq_phone"], r["dlq_errcode"])


def status(conf, d, *args):
    proc = cli("status", "--json", *args, "--config", conf, "--data-dir", d)
    return proc, json.loads(proc.stdout)


def robot(url):
    return httpx.get(f"{url}/_sim/robot", timeout=5, trust_env=False).json()


def shift_flag(d, name, seconds):
    """Move a time the store keeps for the alerts `seconds` into the past."""
    store = DiskStore(d)
    try:
        value = store.get_flag(name)
        assert value is not None, name
        store.set_flag(name, value - seconds)
    finally:
        store.close()


def csv_rows(text):
    return list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"))))


# --- the shared campaign data set ------------------------------------------------------------
@pytest.fixture(scope="module")
def campaigns(tmp_path_factory):
    """alpha (企业群发): 20 welcomed, 4 unknown numbers (910001), 10 owners the simulator does
    not know (60111). beta (welcome_code, codes expiring at once): 10 welcome dead letters
    (41050), 3 unknown numbers, 5 unknown owners. Returns what the tests need to know."""
    tmp = tmp_path_factory.mktemp("campaigns")
    # Every answer takes 5 ms, so a welcome_code is always older than its 1 ms when used.
    sc = SimConfig(staff=SIM_STAFF, welcome_code_ttl_s=0.001, latency_ms=5, seed=11)
    with start_in_thread(sc) as handle:
        data = sim_data(handle.url, sc)
        data["staff"] = list(STAFF)  # the config knows wangwu, WeCom does not
        conf = write_config(tmp / "c.yaml", data, run={"workers": 1},
                            campaigns={"beta": {"welcome": {"provider": "welcome_code"}}},
                            alerts={"robot_key": ""})  # the run itself tells no robot
        d = str(tmp / "d")
        leads = {}
        for camp, n_valid, n_unknown, seed in (("alpha", 30, 4, 1), ("beta", 15, 3, 2)):
            path = tmp / f"{camp}.csv"
            make_leads(path, n_valid=n_valid, n_invalid=0, n_unknown=n_unknown, n_dupes=0, seed=seed)
            cli("import", str(path), "--campaign", camp, "--config", conf, "--data-dir", d)
            leads[camp] = read_rows(path)
        t0 = time.time()
        run = cli("run", "--config", conf, "--data-dir", d, "--json")
        t1 = time.time()
        stats = handle.stats()
    assert run.returncode == 1, run.stdout + run.stderr
    expected = []
    for camp, rows in leads.items():
        for phone, owner in rows:
            if phone.endswith("44"):
                expected.append((camp, "add", phone, 910001))
            elif owner == "wangwu":
                expected.append((camp, "add", phone, 60111))
            elif camp == "beta":
                expected.append((camp, "welcome", phone, 41050))
    assert Counter(e[3] for e in expected) == {60111: 15, 41050: 10, 910001: 7}
    assert stats["welcomes"] == 20 and stats["duplicate_welcomes"] == 0
    return {"conf": conf, "data": data, "dir": d, "expected": expected, "leads": leads, "t0": t0, "t1": t1}


def own_copy(campaigns, tmp_path):
    d = str(tmp_path / "d")
    shutil.copytree(campaigns["dir"], d)
    return d


# --- 1. dlq list ------------------------------------------------------------------------------
def test_dlq_list_filters_by_stage_errcode_and_campaign(campaigns):
    conf, d, expected = campaigns["conf"], campaigns["dir"], campaigns["expected"]
    cases = [
        ([], lambda e: True),
        (["--stage", "add"], lambda e: e[1] == "add"),
        (["--stage", "welcome"], lambda e: e[1] == "welcome"),
        (["--errcode", "60111"], lambda e: e[3] == 60111),
        (["--errcode", "910001"], lambda e: e[3] == 910001),
        (["--campaign", "alpha"], lambda e: e[0] == "alpha"),
        (["--campaign", "beta"], lambda e: e[0] == "beta"),
        (["--campaign", "beta", "--stage", "add"], lambda e: e[0] == "beta" and e[1] == "add"),
        (["--campaign", "alpha", "--errcode", "60111"], lambda e: e[0] == "alpha" and e[3] == 60111),
        (["--stage", "add", "--errcode", "910001", "--campaign", "beta"],
         lambda e: e[:2] == ("beta", "add") and e[3] == 910001),
        (["--stage", "welcome", "--errcode", "41050", "--campaign", "beta"], lambda e: e[1] == "welcome"),
        (["--stage", "welcome", "--campaign", "alpha"], lambda e: False),
        (["--stage", "add", "--errcode", "41050"], lambda e: False),
    ]
    for args, wanted in cases:
        got = Counter(key(r) for r in dlq(conf, d, *args))
        want = Counter(e for e in expected if wanted(e))
        assert got == want, args
    # what each letter says
    t0, t1 = int(campaigns["t0"]), campaigns["t1"] + 1
    owners = {(camp, phone): owner for camp, rows in campaigns["leads"].items() for phone, owner in rows}
    for r in dlq(conf, d):
        assert r["owner"] == owners[(r["campaign"], r["phone"])]
        assert r["meaning"] == MEANING[r["errcode"]] and TODO[r["errcode"]] in r["todo"]
        assert r["attempts"] == 1 and r["error"] and t0 <= r["at"] <= t1


def test_dlq_list_text_says_who_why_what_to_do_attempts_and_when(campaigns):
    conf, d, expected = campaigns["conf"], campaigns["dir"], campaigns["expected"]
    proc = cli("dlq", "list", "--campaign", "beta", "--config", conf, "--data-dir", d)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    beta = [e for e in expected if e[0] == "beta"]
    owners = dict(campaigns["leads"]["beta"])
    earliest = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(campaigns["t0"])))
    latest = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(campaigns["t1"] + 1))
    for camp, stage, phone, code in beta:
        mine = [line for line in lines if phone in line]
        assert len(mine) == 1, phone  # one line per dead letter
        line = mine[0]
        assert f" {stage} " in line and str(code) in line and MEANING[code] in line, line
        assert f"owner={owners[phone]}" in line and "attempts=1" in line, line
        when = STAMP.search(line)
        assert when and earliest <= when.group(1) <= latest, line
    assert f"{len(beta)} dead letters" in proc.stdout
    for code, todo in TODO.items():  # what to do, once per reason
        assert sum(todo in line for line in lines) == 1, code
    assert not any(a[2] in proc.stdout for a in expected if a[0] == "alpha")


# --- 2. retry-dlq and dlq export ---------------------------------------------------------------
def test_dlq_export_keeps_only_the_stage_asked_for(campaigns, tmp_path):
    conf, d, expected = campaigns["conf"], campaigns["dir"], campaigns["expected"]
    out = tmp_path / "welcome.csv"
    proc = cli("dlq", "export", "-o", str(out), "--stage", "welcome", "--config", conf, "--data-dir", d)
    assert proc.returncode == 0 and "exported 10 dead letters" in proc.stderr
    rows = list(csv.DictReader(open(out, encoding="utf-8-sig")))
    assert sorted((r["dlq_campaign"], r["dlq_stage"], r["dlq_phone"], int(r["dlq_errcode"])) for r in rows) == \
        sorted(e for e in expected if e[1] == "welcome")
    assert all(r["dlq_meaning"] == MEANING[41050] and r["dlq_todo"] and r["dlq_at"] for r in rows)
    out = tmp_path / "add.jsonl"
    cli("dlq", "export", "-o", str(out), "-f", "jsonl", "--stage", "add", "--campaign", "alpha",
        "--config", conf, "--data-dir", d)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert Counter(dlq_key(r) for r in rows) == Counter(e for e in expected if e[:2] == ("alpha", "add"))


def test_retry_dlq_moves_exactly_what_it_is_told(campaigns, tmp_path):
    conf, expected = campaigns["conf"], campaigns["expected"]
    d = own_copy(campaigns, tmp_path)

    def retry(*args):
        proc = cli("retry-dlq", *args, "--config", conf, "--data-dir", d)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def queued():
        _, st = status(conf, d)
        return {(c, s): v["stages"][s]["ready"] for c, v in st["campaigns"].items() for s in ("add", "welcome")
                if v["stages"][s]["ready"]}

    # --dry-run counts and moves nothing
    assert json.loads(retry("--dry-run", "--json")) == {"moved": 0, "would_move": 32}
    assert "would move 32 dead letters" in retry("--dry-run")
    assert json.loads(retry("--dry-run", "--stage", "add", "--errcode", "60111", "--limit", "3", "--json"))["would_move"] == 3
    assert json.loads(retry("--dry-run", "--campaign", "beta", "--json"))["would_move"] == 18
    assert Counter(key(r) for r in dlq(conf, d)) == Counter(expected) and queued() == {}

    # --limit N moves exactly N, of the filtered ones
    assert json.loads(retry("--stage", "add", "--errcode", "60111", "--limit", "4", "--json")) == \
        {"moved": 4, "would_move": None}
    left = Counter(key(r) for r in dlq(conf, d))
    moved = Counter(expected) - left
    assert sum(moved.values()) == 4 and all(m[1] == "add" and m[3] == 60111 for m in moved)
    assert sum(queued().values()) == 4

    # --campaign and --stage: only beta's welcome letters
    assert json.loads(retry("--campaign", "beta", "--stage", "welcome", "--json"))["moved"] == 10
    assert dlq(conf, d, "--stage", "welcome") == []
    assert queued().get(("beta", "welcome")) == 10

    # --errcode with --campaign: alpha's unknown numbers, not beta's; the text says how many
    out = retry("--campaign", "alpha", "--errcode", "910001")
    assert "moved 4 dead letters back to ready" in out and "wecomctl run" in out
    assert len(dlq(conf, d, "--errcode", "910001", "--campaign", "beta")) == 3
    assert dlq(conf, d, "--errcode", "910001", "--campaign", "alpha") == []

    left = Counter(key(r) for r in dlq(conf, d))
    assert sum(left.values()) == 32 - 4 - 10 - 4
    assert sum(queued().values()) == 18
    assert json.loads(retry("--dry-run", "--json"))["would_move"] == 14
    check = cli("check", "--config", conf, "--data-dir", d)
    assert check.returncode == 0, check.stdout


# --- 3. a replayed welcome that was already sent --------------------------------------------
POISON_BUG = ("a welcome whose worker died after the call is dead-lettered as poison with its intent "
              "cleared (store._move on 'dead'); retry-dlq + run then sends the 企业群发 again")


def _poisoned_welcome(tmp_path, handle, sc, provider, n=5):
    """A run whose worker is killed right after a welcome call, with run.max_deliveries 1:
    the customer was greeted, and the item is dead-lettered as poison."""
    conf = write_config(tmp_path / "c.yaml", sim_data(handle.url, sc), welcome={"provider": provider},
                        run={"workers": 1, "concurrency": 1, "max_deliveries": 1, "lease_s": 30})
    d = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    make_leads(leads, n_valid=n, n_invalid=0, n_unknown=0, n_dupes=0)
    cli("import", str(leads), "--campaign", "k", "--config", conf, "--data-dir", d)
    first = cli("run", "--config", conf, "--data-dir", d, "--json", check=False,
                env={"WECOMCTL_CRASH_AT": "welcome.after_call"})
    assert os.path.exists(os.path.join(d, ".crashed-welcome.after_call")), first.stderr
    return conf, d, first


@pytest.mark.parametrize("provider", ["msg_template", "gateway", "welcome_code"])
def test_a_replayed_welcome_that_was_sent_is_not_sent_again(tmp_path, provider):
    sc = SimConfig(latency_ms=5)
    with start_in_thread(sc) as handle:
        conf, d, _first = _poisoned_welcome(tmp_path, handle, sc, provider)
        sent = handle.stats()
        assert sent["welcomes"] == 5 and sent["recipients"] == 5  # the killed worker's welcome went out
        letters = dlq(conf, d, "--stage", "welcome")
        assert len(letters) == 1 and letters[0]["kind"] == "poison"
        victim = external_userid(letters[0]["phone"])
        moved = cli("retry-dlq", "--stage", "welcome", "--json", "--config", conf, "--data-dir", d)
        assert json.loads(moved.stdout)["moved"] == 1
        again = cli("run", "--config", conf, "--data-dir", d, "--json")
        stats = handle.stats()
    assert again.returncode == 0, again.stderr
    assert stats["duplicate_welcomes"] == 0, f"{victim} was greeted twice"
    assert stats["welcomes"] == 5 and stats["recipients"] == 5
    rows = {r["external_userid"]: r for r in csv_rows(cli("export", "--config", conf, "--data-dir", d).stdout)}
    assert rows[victim]["status"] in ("welcomed", "already_welcomed")
    assert dlq(conf, d) == []
    assert cli("check", "--config", conf, "--data-dir", d).returncode == 0


def test_a_run_that_dead_letters_a_poison_item_exits_1(tmp_path):
    sc = SimConfig(latency_ms=5)
    with start_in_thread(sc) as handle:
        conf, d, first = _poisoned_welcome(tmp_path, handle, sc, "gateway", n=2)
    assert len(dlq(conf, d)) == 1
    assert json.loads(first.stdout)["this_run"]["dead"] == 1
    assert first.returncode == 1


# --- 4. export ------------------------------------------------------------------------------------
def test_export_filters_by_campaign_and_status_and_masks_phones(campaigns, tmp_path):
    conf, d = campaigns["conf"], campaigns["dir"]
    phones = {camp: {p for p, _ in rows} for camp, rows in campaigns["leads"].items()}

    def export(*args):
        proc = cli("export", *args, "--config", conf, "--data-dir", d)
        assert proc.returncode == 0, proc.stderr
        return csv_rows(proc.stdout)

    beta = export("--campaign", "beta")
    assert len(beta) == 18 and {r["campaign"] for r in beta} == {"beta"} and {r["phone"] for r in beta} == phones["beta"]
    welcomed = export("--status", "welcomed")
    assert len(welcomed) == 20 and {r["campaign"] for r in welcomed} == {"alpha"}
    assert all(r["welcome_status"] == "task_created" and r["external_userid"] for r in welcomed)
    dead = export("--status", "dead")
    assert Counter(r["campaign"] for r in dead) == {"alpha": 14, "beta": 18}
    assert len(export("--campaign", "alpha", "--status", "welcomed,dead")) == 34
    assert export("--campaign", "beta", "--status", "welcomed") == []
    assert {r["welcome_status"] for r in export("--campaign", "beta", "--status", "dead")} == {"dead", "not_sent"}

    out = tmp_path / "masked.jsonl"
    cli("export", "-f", "jsonl", "--mask-phones", "--campaign", "alpha", "-o", str(out),
        "--config", conf, "--data-dir", d)
    text = out.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 34 and all(re.fullmatch(r"\+86\d{3}\*{4}\d{4}", r["phone"]) for r in rows)
    assert Counter(r["phone"][-4:] for r in rows) == Counter(p[-4:] for p in phones["alpha"])
    assert not MOBILE.search(text)


def test_export_replaces_an_existing_file_whole(campaigns, tmp_path):
    conf, d = campaigns["conf"], campaigns["dir"]
    out = tmp_path / "results.csv"
    out.write_text("OLD CONTENT THAT MUST GO\n" * 20000, encoding="utf-8")  # longer than the export
    proc = cli("export", "-o", str(out), "--config", conf, "--data-dir", d)
    assert proc.returncode == 0 and "exported 52 leads" in proc.stderr
    fresh = cli("export", "--config", conf, "--data-dir", d).stdout
    text = out.read_text(encoding="utf-8-sig")
    assert "OLD" not in text and csv_rows(text) == csv_rows(fresh) and len(csv_rows(text)) == 52
    assert sorted(os.listdir(tmp_path)) == ["results.csv"]


def _without_dac_override():
    """preexec_fn: as root, give up CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH so that the
    permission bits of a read-only directory apply (nothing else changes)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone at the exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _cli_with(preexec, *args):
    return subprocess.run([sys.executable, "-m", "wecomctl", *args], capture_output=True, text=True, timeout=120,
                          preexec_fn=preexec)


def test_export_that_cannot_be_written_fails_cleanly_and_leaves_no_temp_file(campaigns, tmp_path):
    conf, d = campaigns["conf"], campaigns["dir"]
    # into a read-only directory
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = _cli_with(_without_dac_override, "export", "-o", str(ro / "r.csv"), "--config", conf, "--data-dir", d)
        listing = os.listdir(ro)
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert str(ro / "r.csv") in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert listing == []
    # onto a path that is a directory: written, then the rename fails
    target = tmp_path / "results.csv"
    target.mkdir()
    proc = cli("export", "-o", str(target), "--config", conf, "--data-dir", d, check=False)
    assert proc.returncode == 2 and "cannot write" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert target.is_dir() and os.listdir(target) == []
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "ro"]


def test_export_that_fails_half_way_keeps_the_old_file(tmp_path):
    """The file system refuses the export half-way (RLIMIT_FSIZE: "File too large"): the
    old file stays as it was, whole, and no temp file is left."""
    d = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    make_leads(leads, n_valid=3000, n_invalid=0, n_unknown=0, n_dupes=0)
    cli("import", str(leads), "--campaign", "big", "--data-dir", d)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "results.csv"
    old = "id,campaign\n1,yesterday\n"
    out.write_text(old, encoding="utf-8")
    limit = 256 * 1024  # the export is about 400 KB; the store only reads

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = _cli_with(small_files, "export", "-o", str(out), "--data-dir", d)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write" in proc.stderr and str(out) in proc.stderr
    assert out.read_text(encoding="utf-8") == old
    assert os.listdir(out_dir) == ["results.csv"]
    whole = cli("export", "-o", str(out), "--data-dir", d)  # and without the limit it is all there
    assert whole.returncode == 0 and len(csv_rows(out.read_text(encoding="utf-8-sig"))) == 3000


# --- 5. alerts to the group robot ---------------------------------------------------------------
QUIET = {"dlq_growth": 0, "error_rate": 0, "oldest_ready_min": 0, "pause_min": 0, "fatal": False}
DLQ_KEYS = ["dlq:alpha:add", "dlq:beta:add", "dlq:beta:welcome"]


def alert_config(path, campaigns, sim_url, sc, **alerts):
    return write_config(path, campaigns["data"], alerts={
        **QUIET, "robot_url": f"{sim_url}/cgi-bin/webhook/send", "robot_key": sc.robot_key, "robot_key_env": "",
        **alerts})


def notify(conf, d, *args):
    proc = cli("status", "--notify", "--json", *args, "--config", conf, "--data-dir", d)
    return sorted(json.loads(proc.stdout)["notified"])


def test_alerts_are_deduplicated_by_repeat_min(campaigns, tmp_path):
    d = own_copy(campaigns, tmp_path)
    sc = SimConfig()
    with start_in_thread(sc) as sim:
        conf = alert_config(tmp_path / "a.yaml", campaigns, sim.url, sc, dlq_growth=5, repeat_min=60, min_interval_s=0)
        assert notify(conf, d) == DLQ_KEYS
        assert notify(conf, d) == [] and notify(conf, d) == []  # the same alerts, evaluated again
        messages = robot(sim.url)
        assert len(messages) == 1 and messages[0]["msgtype"] == "markdown"
        assert all(f"**{k.split(':')[1]} {k.split(':')[2]}**" in messages[0]["content"] for k in DLQ_KEYS)
        shift_flag(d, "alert:dlq:beta:add", 59 * 60)  # sent 59 minutes ago: not yet
        assert notify(conf, d) == []
        shift_flag(d, "alert:dlq:alpha:add", 60 * 60 + 1)  # an hour ago: told again, alone
        assert notify(conf, d) == ["dlq:alpha:add"]
        assert notify(conf, d) == []
        messages = robot(sim.url)
    assert len(messages) == 2
    assert "**alpha add**" in messages[1]["content"] and "beta" not in messages[1]["content"]


def test_alert_messages_are_spaced_by_min_interval(campaigns, tmp_path):
    d = own_copy(campaigns, tmp_path)
    sc = SimConfig()
    with start_in_thread(sc) as sim:
        # no dedupe: every evaluation finds the alerts due; only min_interval_s holds them back
        conf = alert_config(tmp_path / "a.yaml", campaigns, sim.url, sc, dlq_growth=5, repeat_min=0, min_interval_s=600)
        assert notify(conf, d) == DLQ_KEYS
        assert notify(conf, d) == []
        shift_flag(d, "alert:_last_message", 599)
        assert notify(conf, d) == []
        assert len(robot(sim.url)) == 1
        shift_flag(d, "alert:_last_message", 2)  # now 601 s since the last message
        assert notify(conf, d) == DLQ_KEYS
        assert notify(conf, d) == []
        assert len(robot(sim.url)) == 2
        # different alerts arising within the interval wait, then go together in one message
        conf = alert_config(tmp_path / "b.yaml", campaigns, sim.url, sc, dlq_growth=5, repeat_min=60,
                            min_interval_s=600, error_rate=0.4, error_min_calls=10)
        assert notify(conf, d) == []
        shift_flag(d, "alert:_last_message", 601)
        assert notify(conf, d) == ["errors:alpha:add", "errors:beta:add", "errors:beta:welcome"]
        messages = robot(sim.url)
    assert len(messages) == 3
    assert messages[2]["content"].count("calls failed") == 3 and "new dead letters" not in messages[2]["content"]


def test_error_rate_alert_fires_at_its_threshold_and_not_below(campaigns, tmp_path):
    d = own_copy(campaigns, tmp_path)
    sc = SimConfig()
    failed, calls = 14, 34  # alpha's adds: 14 dead letters, 20 added
    rate = round(failed / calls, 4)
    with start_in_thread(sc) as sim:
        def judged(path, **alerts):
            conf = alert_config(tmp_path / path, campaigns, sim.url, sc, **alerts)
            proc, st = status(conf, d, "--check", "--campaign", "alpha")
            return conf, proc.returncode, [a["key"] for a in st["alerts"]], st

        conf, code, keys, st = judged("at.yaml", error_rate=rate, error_min_calls=calls)
        add = st["campaigns"]["alpha"]["stages"]["add"]
        assert (add["failed_5m"], add["done_5m"], add["error_rate_5m"]) == (failed, calls - failed, rate)
        assert (code, keys) == (1, ["errors:alpha:add"])
        assert judged("above.yaml", error_rate=0.3, error_min_calls=20)[1:3] == (1, ["errors:alpha:add"])
        assert judged("rate-below.yaml", error_rate=rate + 0.0001, error_min_calls=calls)[1:3] == (0, [])
        assert judged("calls-below.yaml", error_rate=rate, error_min_calls=calls + 1)[1:3] == (0, [])
        assert notify(conf, d, "--campaign", "alpha") == ["errors:alpha:add"]
        below = judged("quiet.yaml", error_rate=rate + 0.0001, error_min_calls=calls, repeat_min=0, min_interval_s=0)[0]
        assert notify(below, d, "--campaign", "alpha") == []
        messages = robot(sim.url)
    assert len(messages) == 1 and f"{rate:.0%} of {calls} calls failed" in messages[0]["content"]


def test_stale_queue_alert_fires_at_its_threshold_and_not_below(campaigns, tmp_path):
    sc = SimConfig()
    d = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    make_leads(leads, n_valid=3, n_invalid=0, n_unknown=0, n_dupes=0)
    with start_in_thread(sc) as sim:
        conf = alert_config(tmp_path / "a.yaml", campaigns, sim.url, sc, oldest_ready_min=30)
        cli("import", str(leads), "--campaign", "idle", "--config", conf, "--data-dir", d)
        proc, st = status(conf, d, "--check")
        assert proc.returncode == 0 and st["alerts"] == [] and st["oldest_ready_s"] < 60  # just queued
        # the items have waited 30.5 minutes: taken back from leases that ended then
        then = time.time() - 30.5 * 60
        store = DiskStore(d)
        try:
            items = [store.lease("add", 60, then) for _ in range(3)]
            for item in items:
                store.release(item, then)
        finally:
            store.close()
        proc, st = status(conf, d, "--check")
        assert 30.5 * 60 <= st["oldest_ready_s"] < 32 * 60
        assert proc.returncode == 1 and [a["key"] for a in st["alerts"]] == ["stale:idle:add"]
        later = alert_config(tmp_path / "b.yaml", campaigns, sim.url, sc, oldest_ready_min=31, repeat_min=0,
                             min_interval_s=0)
        proc, st = status(later, d, "--check")
        assert proc.returncode == 0 and st["alerts"] == []
        assert notify(later, d) == []
        assert notify(conf, d) == ["stale:idle:add"]
        messages = robot(sim.url)
    assert len(messages) == 1 and "**idle add**: 3 items waiting" in messages[0]["content"]


# --- 6. secrets -----------------------------------------------------------------------------------
class _TokenLog(SimState):
    """The simulator's state, remembering every access token it issues."""

    def __init__(self, sc):
        super().__init__(sc)
        self.issued = set()

    def gettoken(self, corpid, secret):
        reply = super().gettoken(corpid, secret)
        if reply.get("access_token"):
            self.issued.add(reply["access_token"])
        return reply


@contextlib.contextmanager
def _serve(sc, state):
    ready, box = threading.Event(), {}

    async def main():
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await run_until(sc, box["stop"], lambda url: (box.update(url=url), ready.set()), state=state)

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(30), "simulator did not start"
    try:
        yield box["url"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


class _Receiver(BaseHTTPRequestHandler):
    """A business system that refuses every third outcome and echoes the credentials it
    was sent in the refusal, as careless receivers do."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization", "")
        self.server.seen.append(auth)
        if body["lead_id"] % 3 == 0:
            code, answer = 400, {"error": f"refused: {auth} may not write lead {body['lead_id']}"}
        else:
            code, answer = 200, {"ok": True}
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_no_access_token_or_writeback_token_anywhere(tmp_path):
    sc = SimConfig(token_ttl_s=2, busy_rate=0.2, latency_ms=20, seed=13)
    state = _TokenLog(sc)
    wb_token = f"wb-{uuid.uuid4().hex}"
    env = {"WECOMCTL_WRITEBACK_TOKEN": wb_token}
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    receiver.seen = []
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    outputs = []
    try:
        with _serve(sc, state) as url:
            conf = write_config(tmp_path / "c.yaml", sim_data(url, sc), run={"workers": 2},
                                writeback={"url": f"http://127.0.0.1:{receiver.server_port}/outcomes",
                                           "token_env": "WECOMCTL_WRITEBACK_TOKEN"},
                                retry={"max_attempts": 10, "base_delay_s": 0.05, "max_delay_s": 0.5})
            d = str(tmp_path / "d")
            leads = tmp_path / "l.csv"
            make_leads(leads, n_valid=40, n_invalid=0, n_unknown=3, n_dupes=0)
            cli("import", str(leads), "--campaign", "s", "--config", conf, "--data-dir", d)
            log = tmp_path / "run.log"
            outputs.append(cli("run", "--config", conf, "--data-dir", d, "--log-level", "DEBUG", "--log-format",
                               "json", "--log-file", str(log), env=env))
            outputs.append(cli("retry-dlq", "--stage", "writeback", "--config", conf, "--data-dir", d))
            outputs.append(cli("run", "--config", conf, "--data-dir", d, "--log-level", "DEBUG", env=env))
            stats = httpx.get(f"{url}/_sim/stats", timeout=5, trust_env=False).json()
    finally:
        receiver.shutdown()
        receiver.server_close()
    dlq_csv, dlq_jsonl, exp_csv, exp_jsonl = (tmp_path / n for n in ("dlq.csv", "dlq.jsonl", "r.csv", "r.jsonl"))
    for args in (["dlq", "list"], ["dlq", "list", "--json"], ["status", "--json"], ["check"], ["export"],
                 ["export", "-f", "jsonl", "-o", str(exp_jsonl)], ["export", "-o", str(exp_csv)],
                 ["dlq", "export", "-o", str(dlq_csv)], ["dlq", "export", "-f", "jsonl", "-o", str(dlq_jsonl)]):
        outputs.append(cli(*args, "--config", conf, "--data-dir", d, env=env))
    # the secrets were really in play
    tokens = sorted(state.issued)
    assert tokens and stats["calls"]["add_msg_template"] >= 40 and stats["welcomes"] == 40
    assert receiver.seen and set(receiver.seen) == {f"Bearer {wb_token}"}
    refused = [json.loads(line) for line in dlq_jsonl.read_text(encoding="utf-8").splitlines()]
    refused = [r for r in refused if r["dlq_stage"] == "writeback"]
    assert refused and all("HTTP 400" in r["dlq_error"] and "refused" in r["dlq_error"] for r in refused)
    lines = log.read_text(encoding="utf-8").splitlines()
    assert lines and all(json.loads(line) for line in lines)
    assert any(json.loads(line)["level"] == "DEBUG" for line in lines)
    texts = {"log": log.read_text(encoding="utf-8")}
    for i, proc in enumerate(outputs):
        texts[f"stdout {i} {proc.args[3:5]}"] = proc.stdout
        texts[f"stderr {i} {proc.args[3:5]}"] = proc.stderr
    for f in (dlq_csv, dlq_jsonl, exp_csv, exp_jsonl):
        texts[f.name] = f.read_text(encoding="utf-8-sig")
    for root, _dirs, files in os.walk(d):
        for name in files:
            texts[name] = open(os.path.join(root, name), "rb").read().decode("utf-8", "replace")
    for secret in [wb_token, *tokens, sc.corp_secret, sc.gateway_key]:
        leaks = [where for where, text in texts.items() if secret in text]
        assert not leaks, (secret[:6], leaks)
