"""Every file in tests/cases/import through the real `wecomctl import` into the store.

Asserts the exact expectation of cases.json: the numbers enqueued in order of first
appearance with their names, the number of rejects (each with row, raw and reason), the
number of duplicates, that no `never` number was produced, and for `error` files exit 2
with one line and nothing enqueued. Also: importing the same file twice enqueues nothing.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wecomctl.store.disk import DiskStore

CASES = Path(__file__).parent / "cases" / "import"
EXPECTED = json.loads((CASES / "cases.json").read_text(encoding="utf-8"))
SHARED = Path(__file__).resolve().parents[2] / "shared" / "cases" / "import"


def wecomctl(*args):
    return subprocess.run([sys.executable, "-m", "wecomctl", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_case_through_import(name, tmp_path):
    expected = EXPECTED[name]
    data = str(tmp_path / "data")
    proc = wecomctl("import", str(CASES / name), "--campaign", "case", "--owner", "zhangsan", "-d", data, "--json")
    if expected.get("error"):
        assert proc.returncode == 2, proc.stdout
        assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
        assert not os.path.exists(os.path.join(data, "store")) or not DiskStore(data).counts().get("case", {}).get("imported")
        return
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    store = DiskStore(data)
    leads = list(store.leads("case"))
    store.close()
    assert [[lead["phone"], lead["name"]] for lead in leads] == expected["accept"]
    assert report["accepted"] == len(expected["accept"])
    assert report["rejected"] == expected["reject"]
    assert report["skipped"] == expected["skip"]
    assert proc.returncode == (1 if expected["reject"] else 0)
    for number in expected.get("never", []):
        assert number not in {lead["phone"] for lead in leads}
    if expected["reject"]:
        assert_rejects(report, CASES / name, expected["reject"])
    else:
        assert report["rejects_file"] is None
    again = json.loads(wecomctl("import", str(CASES / name), "--campaign", "case", "--owner", "zhangsan",
                                "-d", data, "--json").stdout)
    assert again["accepted"] == 0 and again["skipped"] == len(expected["accept"]) + expected["skip"]


def assert_rejects(report, path, count):
    """Each reject names its data row, the phone cell as written in the file, and why."""
    with open(report["rejects_file"], encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    text = path.read_bytes().decode(report["files"][0]["encoding"] or "utf-8", "replace")
    assert len(rows) == count
    assert len({r["row"] for r in rows}) == count and all(int(r["row"]) >= 1 for r in rows)
    for r in rows:
        assert r["raw"] and r["raw"] in text, r  # as written, not as normalised
        assert len(r["reason"]) > 15 and r["reason"] not in ("invalid", "invalid phone"), r


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_case_dry_run_reports_the_same_and_writes_nothing_to_the_data_dir(name, tmp_path):
    expected = EXPECTED[name]
    data = tmp_path / "data"
    proc = wecomctl("import", str(CASES / name), "--campaign", "case", "--owner", "zhangsan", "-d", str(data),
                    "--json", "--dry-run")
    assert not data.exists()
    if expected.get("error"):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        return
    report = json.loads(proc.stdout)
    assert (report["accepted"], report["rejected"], report["skipped"]) == (
        len(expected["accept"]), expected["reject"], expected["skip"])
    if expected["reject"]:
        assert_rejects(report, CASES / name, expected["reject"])  # the operator still sees which rows
        os.unlink(report["rejects_file"])


@pytest.mark.parametrize("name", sorted(n for n in EXPECTED if not EXPECTED[n].get("error")))
def test_case_through_the_child_reader(name, tmp_path):
    # Big imports read in a child process; the cases must come out the same there.
    from wecomctl.ingest.importer import Importer

    store = DiskStore(str(tmp_path / "data"))
    try:
        report = Importer(store, "case", owner="zhangsan", reader_process=True).run([str(CASES / name)])
        assert [[lead["phone"], lead["name"]] for lead in store.leads("case")] == EXPECTED[name]["accept"]
        assert (report.rejected, report.skipped) == (EXPECTED[name]["reject"], EXPECTED[name]["skip"])
    finally:
        store.close()


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared cases are not beside this checkout")
def test_repository_copy_of_the_cases_is_current():
    for path in SHARED.iterdir():
        assert (CASES / path.name).read_bytes() == path.read_bytes(), f"tests/cases/import/{path.name} is stale"
