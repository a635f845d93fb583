"""Big imports read their files in a child process: the same results as reading in the
importing process, and a clear error when the child dies or a file breaks mid-way."""

import json
import multiprocessing
import os
import random

import pytest

from wecomctl.errors import InputError, UsageError
from wecomctl.ingest import importer as importer_mod
from wecomctl.ingest.importer import Importer
from wecomctl.store.disk import DiskStore


def messy_csv(path, rows, seed=3):
    """Valid, invalid, duplicate (written differently), blank and owner-less rows."""
    rng = random.Random(seed)
    seen = []
    with open(path, "w", encoding="gb18030", newline="") as fh:
        fh.write("手机号码,客户姓名,跟进人,城市\r\n")
        for i in range(rows):
            roll = rng.random()
            owner = rng.choice(["zhangsan", "lisi", "ghost", ""])
            if roll < 0.03:
                phone = rng.choice(["12345", "1.38001E+10", "138OO138000", ""])
            elif roll < 0.06:
                fh.write(",,,\r\n")
                continue
            elif roll < 0.12 and seen:
                n = rng.choice(seen)
                phone = f"+86 {n[:3]}-{n[3:7]}-{n[7:]}"
            else:
                phone = f"13{rng.randrange(10**9):09d}"
                seen.append(phone)
            fh.write(f"{phone},客户{i},{owner},北京\r\n")
    return str(path)


def outcome(report, store):
    files = [(f.accepted, f.rejected, f.skipped, f.blank, f.revived, f.nul_rows) for f in report.files]
    leads = [(x["id"], x["phone"], x["name"], x["owner"], x["source"], x["row"]) for x in store.leads()]
    with open(report.rejects_file, encoding="utf-8") as fh:
        rejects = fh.read()
    with open(report.duplicates_file, encoding="utf-8") as fh:
        dupes = fh.read()
    return files, dict(report.reasons), leads, rejects, dupes


def run(tmp_path, name, paths, reader_process, staff=("zhangsan", "lisi")):
    store = DiskStore(str(tmp_path / name))
    try:
        report = Importer(store, "c", staff=list(staff), rejects_dir=str(tmp_path / name / "reports"),
                          reader_process=reader_process).run(paths)
        return outcome(report, store)
    finally:
        store.close()


def test_the_child_reader_gives_the_same_queue_and_reports_as_reading_in_process(tmp_path, monkeypatch):
    monkeypatch.setattr(importer_mod, "BATCH", 700)  # several batches, one cut mid-file
    a = messy_csv(tmp_path / "a.csv", 3000)
    b = messy_csv(tmp_path / "b.csv", 1500, seed=4)  # and duplicates across files
    here = run(tmp_path, "here", [a, b], reader_process=False)
    child = run(tmp_path, "child", [a, b], reader_process=True)
    assert child == here
    files, reasons, leads, _, dupes = here
    assert len(leads) > 2500 and sum(f[1] for f in files) > 100 and sum(f[3] for f in files) > 50
    assert "unknown owner" in reasons and dupes.count("\n") > 100


def test_big_imports_choose_the_child_reader_and_dry_runs_do_not(tmp_path, monkeypatch):
    chosen = []
    real = importer_mod.Reading.in_child

    def spy(self):
        chosen.append(True)
        return real(self)

    monkeypatch.setattr(importer_mod.Reading, "in_child", spy)
    monkeypatch.setattr(importer_mod, "CHILD_READER_BYTES", 10_000)
    small = messy_csv(tmp_path / "small.csv", 50)
    big = messy_csv(tmp_path / "big.csv", 1000)
    assert os.path.getsize(small) < 10_000 <= os.path.getsize(big)
    store = DiskStore(str(tmp_path / "d"))
    try:
        Importer(store, "c", staff=["zhangsan", "lisi"]).run([small])
        assert chosen == []
        Importer(store, "c", staff=["zhangsan", "lisi"], dry_run=True).run([big])
        assert chosen == []
        Importer(store, "c", staff=["zhangsan", "lisi"]).run([big])
        assert chosen == [True]
    finally:
        store.close()


def test_a_reader_child_that_dies_is_a_clear_error_and_what_was_stored_stays(tmp_path, monkeypatch):
    monkeypatch.setattr(importer_mod, "BATCH", 200)
    path = messy_csv(tmp_path / "a.csv", 20_000)

    def kill_the_reader(_path, rows):
        if rows >= 6000:
            for child in multiprocessing.active_children():
                child.kill()

    store = DiskStore(str(tmp_path / "d"))
    try:
        imp = Importer(store, "c", staff=["zhangsan", "lisi"], reader_process=True, on_progress=kill_the_reader)
        with pytest.raises(InputError, match="stopped unexpectedly.*run the same import again"):
            imp.run([path])
        stored = len(list(store.leads()))
        assert 0 < stored < 20_000
        assert multiprocessing.active_children() == []  # reaped, not left behind
        report = Importer(store, "c", staff=["zhangsan", "lisi"], reader_process=True).run([path])
        fresh = DiskStore(str(tmp_path / "fresh"))
        try:
            again = Importer(fresh, "c", staff=["zhangsan", "lisi"], reader_process=False).run([path])
            key = lambda s: [(x["id"], x["phone"], x["owner"]) for x in s.leads()]  # noqa: E731
            assert key(store) == key(fresh)
            assert report.accepted + report.skipped == again.accepted + again.skipped
        finally:
            fresh.close()
    finally:
        store.close()


@pytest.mark.parametrize("reader_process", [False, True])
def test_a_file_broken_mid_way_is_the_same_clear_error_on_both_paths(tmp_path, reader_process):
    good = messy_csv(tmp_path / "a.csv", 500)
    broken = tmp_path / "b.json"
    records = [{"phone": f"1390000{i:04d}", "name": "x", "owner": "lisi"} for i in range(300)]
    broken.write_text(json.dumps(records)[:-40] + "}{oops", encoding="utf-8")
    store = DiskStore(str(tmp_path / "d"))
    try:
        with pytest.raises(InputError, match=r"b\.json: not valid JSON after record \d+") as raised:
            Importer(store, "c", staff=["zhangsan", "lisi"], reader_process=reader_process).run([good, str(broken)])
        # What was read before the break is queued, and the message says so.
        stored = len(list(store.leads()))
        assert stored > 300
        assert f"the {stored:,} leads read before it are queued" in str(raised.value)
        assert "run the same import again" in str(raised.value)
    finally:
        store.close()


def test_a_reader_that_dies_part_way_through_a_batch_is_the_same_clear_error(tmp_path, monkeypatch):
    # Killed while sending, the child leaves half a message: recv raises OSError, not EOF.
    from multiprocessing.connection import Connection

    path = messy_csv(tmp_path / "a.csv", 2000)

    def cut_off(self):
        raise OSError("got end of file during message")

    monkeypatch.setattr(Connection, "recv", cut_off)
    store = DiskStore(str(tmp_path / "d"))
    try:
        with pytest.raises(InputError, match=r"stopped unexpectedly.*the 0 leads read before are queued") as raised:
            Importer(store, "c", staff=["zhangsan", "lisi"], reader_process=True).run([path])
        assert "fix the file" not in str(raised.value)  # nothing is wrong with the file
    finally:
        store.close()
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("reader_process", [False, True])
def test_a_file_gone_or_nested_too_deeply_is_a_clear_error_on_both_paths(tmp_path, reader_process):
    first = messy_csv(tmp_path / "a.csv", 3000)
    gone = messy_csv(tmp_path / "gone.csv", 10)
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"phone": "13800138000"}\n' + '{"p": ' + "[" * 100_000 + "]" * 100_000 + "}\n", encoding="utf-8")

    def delete_when_reading_the_first(_path, rows):
        if os.path.exists(gone):
            os.unlink(gone)

    store = DiskStore(str(tmp_path / "d"))
    try:
        imp = Importer(store, "c", staff=["zhangsan"], reader_process=reader_process,
                       on_progress=delete_when_reading_the_first)
        with pytest.raises(InputError, match=r"gone\.csv: cannot read the file any more: No such file"):
            imp.run([first, gone])
        with pytest.raises(InputError, match=r"deep\.jsonl: a record is nested too deeply"):
            Importer(store, "c", staff=["zhangsan"], reader_process=reader_process).run([str(deep)])
    finally:
        store.close()


def test_the_reader_child_ignores_modules_in_the_current_directory(tmp_path):
    # The child starts as `python -c`; a signal.py where the operator works must not
    # shadow the standard library's.
    import subprocess
    import sys

    from wecomctl.ingest.importer import CHILD_READER_BYTES

    work = tmp_path / "work"
    work.mkdir()
    (work / "signal.py").write_text("raise SystemExit('the wrong signal module')\n")
    (work / "pickle.py").write_text("raise SystemExit('the wrong pickle module')\n")
    path = messy_csv(work / "big.csv", 40_000)
    assert os.path.getsize(path) >= CHILD_READER_BYTES
    # The installed command (python -m would itself put the directory first on the path).
    script = os.path.join(os.path.dirname(sys.executable), "wecomctl")
    proc = subprocess.run([script, "import", "big.csv", "--campaign", "c", "--owner", "u",
                           "-d", str(tmp_path / "d"), "--json"], cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(proc.stdout)["accepted"] > 30_000


def test_a_report_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocked = tmp_path / "reports"
    blocked.write_text("a file where the reports folder should be")
    path = messy_csv(tmp_path / "a.csv", 500)
    store = DiskStore(str(tmp_path / "d"))
    try:
        with pytest.raises(UsageError, match=r"cannot write the report .*reports"):
            Importer(store, "c", staff=["zhangsan"], rejects_dir=str(blocked)).run([path])
    finally:
        store.close()
