"""Killing a process at each dangerous instant loses nothing and greets nobody twice.

The fault-injection hook (wecomctl/faults.py) SIGKILLs the first process to reach a named
point, once per data dir; no sleeps decide where the kill lands.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from test_e2e import cli, make_leads
from wecomctl import config as cfg
from wecomctl.simulator import SimConfig, start_in_thread
from wecomctl.store.disk import DiskStore


def setup(tmp_path, handle, sc, provider="msg_template", n=20, concurrency=1):
    conf_data = yaml.safe_load(cfg.simulator_config(handle.url, sc))
    conf_data["welcome"]["provider"] = provider
    conf_data["run"].update(workers=1, concurrency=concurrency, lease_s=30)  # 1: one call in flight, one lost outcome
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(conf_data, allow_unicode=True), encoding="utf-8")
    data = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    make_leads(leads, n_valid=n, n_invalid=0, n_unknown=0, n_dupes=0)
    cli("import", str(leads), "--campaign", "k", "--config", str(conf), "--data-dir", data)
    return str(conf), data


@pytest.mark.parametrize("point, provider", [
    ("add.after_intent", "msg_template"),
    ("add.after_call", "msg_template"),
    ("welcome.after_intent", "msg_template"),
    ("welcome.after_call", "msg_template"),
    ("welcome.after_call", "gateway"),
])
def test_worker_killed_at_a_crash_point(tmp_path, point, provider):
    sc = SimConfig(latency_ms=5)
    with start_in_thread(sc) as handle:
        conf, data = setup(tmp_path, handle, sc, provider)
        proc = cli("run", "--config", conf, "--data-dir", data, "--json", check=False,
                   env={"WECOMCTL_CRASH_AT": point})
        stats = handle.stats()
    assert os.path.exists(os.path.join(data, f".crashed-{point}"))  # the kill happened
    result = json.loads(proc.stdout)
    assert any("killed by signal 9" in e for e in result["worker_errors"])  # replaced, and said so
    assert proc.returncode == 0, proc.stderr
    check = json.loads(cli("check", "--json", "--config", conf, "--data-dir", data).stdout)
    assert check["ok"], check["problems"]
    st = check["stages"]
    assert st["add"]["done"] == 20 and st["welcome"]["done"] == 20 and st["welcome"]["dead"] == 0
    assert stats["welcomes"] == 20 and stats["duplicate_welcomes"] == 0 and stats["adds"] == 20
    if point == "welcome.after_call":
        store = DiskStore(data)
        statuses = [lead["welcome_status"] for lead in store.leads()]
        store.close()
        assert statuses.count("already_sent") == 1  # the one whose outcome the kill lost


def _processes_with_env(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_import_killed_mid_way_then_run_again_gives_the_same_queue(tmp_path):
    import time

    from wecomctl.ingest.importer import BATCH, CHILD_READER_BYTES

    leads = tmp_path / "l.csv"
    total = BATCH * 3 + BATCH // 2
    make_leads(leads, n_valid=total, n_invalid=0, n_unknown=0, n_dupes=0)
    assert leads.stat().st_size >= CHILD_READER_BYTES  # so the file is read in a child process
    args = ["import", str(leads), "--campaign", "k", "--data-dir"]
    marker = f"WECOMCTL_TEST_RUN={os.getpid()}-{time.monotonic_ns()}"
    killed = cli(*args, str(tmp_path / "a"), check=False,
                 env={"WECOMCTL_CRASH_AT": "import.after_batch", marker.split("=")[0]: marker.split("=")[1]})
    assert killed.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _processes_with_env(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with_env(marker) == []  # the reader child does not outlive a killed import
    partial = DiskStore(str(tmp_path / "a"))
    assert partial.counts()["k"]["imported"] == BATCH  # one batch committed, nothing half-written
    partial.close()
    cli(*args, str(tmp_path / "a"))
    cli(*args, str(tmp_path / "b"))  # an uninterrupted import
    a, b = DiskStore(str(tmp_path / "a")), DiskStore(str(tmp_path / "b"))
    key = lambda s: [(x["id"], x["phone"], x["owner"], x["add"]["state"]) for x in s.leads()]  # noqa: E731
    assert key(a) == key(b) and len(key(a)) == total
    assert a.check() == [] and a.counts()["k"]["stages"] == b.counts()["k"]["stages"]
    a.close(), b.close()


def test_retry_dlq_killed_mid_way_then_run_again_moves_the_rest(tmp_path):
    from wecomctl.store.base import Failure

    data = str(tmp_path / "d")
    leads = tmp_path / "l.csv"
    make_leads(leads, n_valid=5, n_invalid=0, n_unknown=0, n_dupes=0)
    cli("import", str(leads), "--campaign", "k", "--data-dir", data)
    store = DiskStore(data)
    for _ in range(5):
        store.bury(store.lease("add", 10, 0), Failure(60111, "x", "dead"), 0)
    store.close()
    killed = cli("retry-dlq", "--data-dir", data, check=False, env={"WECOMCTL_CRASH_AT": "retry_dlq.after_move"})
    assert killed.returncode == -signal.SIGKILL
    again = cli("retry-dlq", "--data-dir", data, "--json")
    assert json.loads(again.stdout)["moved"] == 4
    store = DiskStore(data)
    assert store.check() == [] and store.counts()["k"]["stages"]["add"]["ready"] == 5
    store.close()


def _wait_gone(pids, timeout=30):
    import time
    end = time.time() + timeout
    while time.time() < end:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}") and "zombie" not in open(f"/proc/{p}/status").read()]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"workers still running: {alive}")


def test_run_parent_killed_workers_stop_and_the_next_run_finishes(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
    from chaos import children

    sc = SimConfig(latency_ms=20)
    with start_in_thread(sc) as handle:
        conf, data = setup(tmp_path, handle, sc, n=60, concurrency=4)
        env = {**os.environ, "WECOMCTL_CRASH_AT": "run.parent"}
        run = subprocess.Popen([sys.executable, "-m", "wecomctl", "run", "--config", conf, "--data-dir", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        workers = []
        while run.poll() is None:
            workers = children(run.pid) or workers
        assert run.returncode == -signal.SIGKILL
        _wait_gone(workers)  # orphaned workers notice their run is gone and stop
        again = cli("run", "--config", conf, "--data-dir", data, "--json", check=False)
        stats = handle.stats()
    assert again.returncode == 0, again.stderr
    check = json.loads(cli("check", "--json", "--config", conf, "--data-dir", data).stdout)
    assert check["ok"], check["problems"]
    assert check["stages"]["welcome"]["done"] == 60 and stats["duplicate_welcomes"] == 0


@pytest.mark.parametrize("signals, code, words", [
    ([signal.SIGTERM], 143, "in-flight calls were finished and recorded"),
    ([signal.SIGINT], 130, "in-flight calls were finished and recorded"),
    ([signal.SIGINT, signal.SIGINT], 130, "stopped at once"),
])
def test_shutdown_by_signal(tmp_path, signals, code, words):
    import time

    sc = SimConfig(latency_ms=300)  # calls in flight take long enough for a second signal to land
    with start_in_thread(sc) as handle:
        conf, data = setup(tmp_path, handle, sc, n=80, concurrency=8)
        run = subprocess.Popen([sys.executable, "-m", "wecomctl", "run", "--config", conf, "--data-dir", data,
                                "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        store = DiskStore(data)
        while store.counts()["k"]["stages"]["add"]["done"] < 3:  # wait until it is working
            time.sleep(0.05)
        store.close()
        for sig in signals:  # apart: the kernel merges a signal sent while one is pending
            run.send_signal(sig)
            time.sleep(0.05)
        out, err = run.communicate(timeout=60)
        assert run.returncode == code and words in err, err
        summary = json.loads(out)
        assert summary["exit_code"] == code
        if len(signals) == 1:
            # a graceful stop leaves nothing leased: every call in hand was recorded
            st = json.loads(cli("status", "--json", "--config", conf, "--data-dir", data).stdout)["stages"]
            assert st["add"]["leased"] == 0 and st["welcome"]["leased"] == 0
        again = cli("run", "--config", conf, "--data-dir", data, check=False)
        stats = handle.stats()
    assert again.returncode == 0, again.stderr
    check = json.loads(cli("check", "--json", "--config", conf, "--data-dir", data).stdout)
    assert check["ok"] and check["stages"]["welcome"]["done"] == 80
    assert stats["duplicate_welcomes"] == 0
