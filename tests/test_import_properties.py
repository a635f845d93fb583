"""Property: whatever bytes or structure a lead file holds, import either refuses the whole
file with the project's own clear error, or accounts for every data row exactly once:
accepted + rejected + skipped + blank = data rows, and nothing else is ever raised."""

import csv
import io
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wecomctl.errors import WecomctlError
from wecomctl.ingest.importer import Importer

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

phone_like = st.one_of(
    st.from_regex(r"1[3-9]\d{9}", fullmatch=True),
    st.from_regex(r"(\+86|0086|86-)? ?1[3-9]\d ?\d{4}[- ]?\d{4}", fullmatch=True),
    st.from_regex(r"1\.\d{5}E\+10", fullmatch=True),
    st.text(max_size=15),
)
cell = st.one_of(st.text(max_size=12), phone_like, st.just(""), st.just('"'), st.just("\x00"))


def run(tmp_path, data: bytes, name: str):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        return Importer(None, "p", owner="o", dry_run=True).run([str(path)])
    except WecomctlError as exc:
        assert str(exc) and "\n" not in str(exc).strip()  # one clear line
        return None


def accounted(report) -> int:
    return report.accepted + report.rejected + report.skipped + report.blank


@SETTINGS
@given(data=st.binary(max_size=2048), name=st.sampled_from(["a.csv", "a.txt", "a.json", "a.jsonl", "a.xlsx"]))
def test_random_bytes_never_crash(tmp_path_factory, data, name):
    run(tmp_path_factory.mktemp("b"), data, name)


@SETTINGS
@given(rows=st.lists(st.lists(cell, min_size=0, max_size=5), max_size=30),
       delimiter=st.sampled_from([",", "\t", ";", "|"]), encoding=st.sampled_from(["utf-8", "utf-8-sig", "gb18030"]))
def test_every_csv_row_is_accounted_for(tmp_path_factory, rows, delimiter, encoding):
    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    w.writerow(["手机号", "姓名", "备注"])
    clean = [[c.replace("\x00", "").replace("\r", "").replace("\n", " ") for c in r] for r in rows]
    w.writerows(clean)
    try:
        data = buf.getvalue().encode(encoding)
    except UnicodeEncodeError:
        return  # text gb18030 cannot hold is not a file anyone has
    report = run(tmp_path_factory.mktemp("c"), data, "leads.csv")
    if report is not None:
        # each written record is one data row; a record whose cells are all empty is blank
        assert accounted(report) == len(clean)


@SETTINGS
@given(records=st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["phone", "mobile", "name", "owner", "x"]), st.one_of(cell, st.integers(), st.none()),
                    max_size=4),
    st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)), max_size=25),
    as_lines=st.booleans())
def test_every_json_record_is_accounted_for(tmp_path_factory, records, as_lines):
    if as_lines:
        data = "\n".join(json.dumps(r, ensure_ascii=False) for r in records).encode("utf-8")
        name = "leads.jsonl"
    else:
        data = json.dumps(records, ensure_ascii=False).encode("utf-8")
        name = "leads.json"
    report = run(tmp_path_factory.mktemp("j"), data, name)
    if report is not None:
        assert accounted(report) == len(records)
