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
        with open(report["rejects_file"], encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == expected["reject"]
        assert all(r["row"] and r["raw"] and len(r["reason"]) > 10 for r in rows)
    again = json.loads(wecomctl("import", str(CASES / name), "--campaign", "case", "--owner", "zhangsan",
                                "-d", data, "--json").stdout)
    assert again["accepted"] == 0 and again["skipped"] == len(expected["accept"]) + expected["skip"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared cases are not beside this checkout")
def test_repository_copy_of_the_cases_is_current():
    for path in SHARED.iterdir():
        assert (CASES / path.name).read_bytes() == path.read_bytes(), f"tests/cases/import/{path.name} is stale"
