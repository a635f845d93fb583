"""The importer: owners, dedupe across files and runs, reports, dry run, re-runs."""

import csv

import pytest

from wecomctl.errors import InputError
from wecomctl.ingest.importer import Importer


def write(path, rows, header=("手机号", "姓名")):
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def owners(store):
    return [(lead["phone"], lead["owner"]) for lead in store.leads()]


NUMS = [f"1380013{i:04d}" for i in range(10)]


def test_round_robin_owners_are_the_same_after_an_interrupted_import(tmp_path, store):
    f = write(tmp_path / "a.csv", [(n, "x") for n in NUMS])
    part = write(tmp_path / "part.csv", [(n, "x") for n in NUMS[:4]])  # what was read before a kill
    Importer(store, "c", staff=["a", "b", "c"]).run([part])
    Importer(store, "c", staff=["a", "b", "c"]).run([f])  # the operator runs it again
    from wecomctl.store.disk import DiskStore
    fresh = DiskStore(str(tmp_path / "fresh"))
    Importer(fresh, "c", staff=["a", "b", "c"]).run([f])
    assert owners(store) == owners(fresh)
    assert [o for _, o in owners(fresh)][:4] == ["a", "b", "c", "a"]
    fresh.close()


def test_owners_match_staff_userids_whatever_their_case(tmp_path, store):
    # WeCom ignores case in userids; the config's spelling is what is stored.
    f = write(tmp_path / "o.csv", [(NUMS[0], "x", "LISI"), (NUMS[1], "y", "ZhangSan")], ("手机号", "姓名", "负责人"))
    rep = Importer(store, "c", staff=["zhangsan", "lisi"]).run([f])
    assert rep.accepted == 2 and owners(store) == [("+86" + NUMS[0], "lisi"), ("+86" + NUMS[1], "zhangsan")]
    g = write(tmp_path / "p.csv", [(NUMS[2], "z")])
    Importer(store, "c", owner="LiSi", staff=["zhangsan", "lisi"]).run([g])
    assert owners(store)[-1] == ("+86" + NUMS[2], "lisi")


def test_unknown_owner_is_a_reject_and_bad_owner_flag_an_error(tmp_path, store):
    f = write(tmp_path / "o.csv", [(NUMS[0], "x", "zhangsan"), (NUMS[1], "y", "ghost")], ("手机号", "姓名", "负责人"))
    rep = Importer(store, "c", staff=["zhangsan"], rejects_dir=str(tmp_path / "r")).run([f])
    assert rep.accepted == 1 and rep.rejected == 1 and rep.reasons == {"unknown owner": 1}
    with pytest.raises(InputError, match="--owner ghost"):
        Importer(store, "c", owner="ghost", staff=["zhangsan"])


def test_no_owner_anywhere_refuses_the_file_and_rejects_json_records(tmp_path, store):
    f = write(tmp_path / "n.csv", [(NUMS[0], "x")])
    with pytest.raises(InputError, match="--owner"):
        Importer(store, "c").run([f])
    j = tmp_path / "n.jsonl"
    j.write_text('{"phone": "%s", "owner": "a"}\n{"phone": "%s"}\n' % (NUMS[0], NUMS[1]), encoding="utf-8")
    rep = Importer(store, "c").run([str(j)])
    assert rep.accepted == 1 and rep.rejected == 1 and "no owner" in rep.reasons


def test_template_variable_missing_from_the_file_refuses_it(tmp_path, store):
    f = write(tmp_path / "t.csv", [(NUMS[0], "x")])
    with pytest.raises(InputError, match="城市"):
        Importer(store, "c", owner="o", template="{name}，{城市}见").run([f])
    ok = write(tmp_path / "t2.csv", [(NUMS[0], "x", "北京")], ("手机号", "姓名", "城市"))
    assert Importer(store, "c", owner="o", template="{name}，{城市}见").run([ok]).accepted == 1


def test_fixed_rows_replace_their_dead_letters(tmp_path, store, clock):
    from wecomctl.store.base import Failure

    f = write(tmp_path / "a.csv", [(NUMS[0], "x", "ghost"), (NUMS[1], "y", "a")], ("手机号", "姓名", "负责人"))
    Importer(store, "c").run([f])
    item = store.lease("add", 10, clock())
    store.bury(item, Failure(60111, "userid not found", "dead"), clock())
    same = Importer(store, "c").run([f])  # the unchanged file again: nothing comes back
    assert same.revived == 0 and same.skipped == 2
    fixed = write(tmp_path / "fixed.csv", [(NUMS[0], "x", "b"), (NUMS[1], "y", "a")], ("手机号", "姓名", "负责人"))
    dry = Importer(store, "c", dry_run=True).run([fixed])  # the dry run says what the import will do
    assert (dry.revived, dry.skipped, dry.accepted) == (1, 1, 0)
    rep = Importer(store, "c").run([fixed])
    assert rep.revived == 1 and rep.skipped == 1 and rep.accepted == 0
    lead = store.lead(item.id)
    assert lead["owner"] == "b" and lead["add"]["state"] == "ready" and lead["add"]["attempts"] == 0
    counts = store.counts()["c"]["stages"]["add"]
    assert counts["dead"] == 0 and counts["ready"] == 2


def test_a_file_holding_a_dead_phone_twice_revives_nothing_when_imported_again(tmp_path, store, clock):
    # The two rows differ (another name): judging each against the lead made the lead
    # flip between them and go back to the queue on every import.
    from wecomctl.store.base import Failure

    f = write(tmp_path / "d.csv", [(NUMS[0], "张三"), (NUMS[1], "李四"), ("+86 " + NUMS[0], "张三丰")])
    Importer(store, "c", owner="o").run([f])
    store.bury(store.lease("add", 10, clock()), Failure(60111, "userid not found", "dead"), clock())
    for _ in range(3):
        dry = Importer(store, "c", owner="o", dry_run=True).run([f])
        rep = Importer(store, "c", owner="o").run([f])
        assert (rep.revived, rep.skipped) == (0, 3) and (dry.revived, dry.skipped) == (0, 3)
    lead = store.lead(store.find_phone("c", "+86" + NUMS[0]))
    assert lead["name"] == "张三" and lead["add"]["state"] == "dead"
    # A fix in a file of its own still brings it back, once.
    fix = write(tmp_path / "fix.csv", [(NUMS[0], "张三"), (NUMS[0], "张三")], ("手机号", "姓名"))
    assert Importer(store, "c", owner="p").run([fix]).revived == 1
    assert store.lead(lead["id"])["owner"] == "p"


def test_a_row_with_only_empty_columns_added_is_the_same_row(tmp_path, store, clock):
    # A to-fix file holding dead letters of several sources has the columns of all.
    from wecomctl.store.base import Failure

    f = write(tmp_path / "a.csv", [(NUMS[0], "x", "ghost")], ("手机号", "姓名", "负责人"))
    Importer(store, "c").run([f])
    store.bury(store.lease("add", 10, clock()), Failure(60111, "userid not found", "dead"), clock())
    wider = write(tmp_path / "w.csv", [(NUMS[0], "x", "ghost", "")], ("手机号", "姓名", "负责人", "城市"))
    assert Importer(store, "c").run([wider]).revived == 0
    filled = write(tmp_path / "f.csv", [(NUMS[0], "x", "ghost", "北京")], ("手机号", "姓名", "负责人", "城市"))
    assert Importer(store, "c").run([filled]).revived == 1  # a column that now says something: a fix


def test_dry_run_counts_what_the_campaign_already_holds(tmp_path, store):
    f = write(tmp_path / "a.csv", [(NUMS[0], "x"), (NUMS[1], "y")])
    Importer(store, "c", owner="o").run([write(tmp_path / "first.csv", [(NUMS[0], "x")])])
    dry = Importer(store, "c", owner="o", dry_run=True).run([f])
    assert (dry.accepted, dry.skipped) == (1, 1)
    assert store.counts()["c"]["imported"] == 1


def test_duplicates_report_names_the_row_they_matched(tmp_path, store):
    a = write(tmp_path / "a.csv", [(NUMS[0], "x"), (NUMS[1], "y")])
    b = write(tmp_path / "b.csv", [("+86 " + NUMS[1], "dup"), (NUMS[2], "z")])
    rep = Importer(store, "c", owner="o", rejects_dir=str(tmp_path / "r")).run([a, b])
    assert rep.accepted == 3 and rep.skipped == 1
    with open(rep.duplicates_file, encoding="utf-8-sig") as fh:
        (dup,) = list(csv.DictReader(fh))
    assert dup["file"] == b and dup["row"] == "1" and dup["matches_file"] == a and dup["matches_row"] == "2"
    assert dup["phone"] == "+86" + NUMS[1]


def test_dry_run_reports_the_same_and_enqueues_nothing(tmp_path, store):
    a = write(tmp_path / "a.csv", [(NUMS[0], "x"), (NUMS[0], "again"), ("12345", "bad")])
    dry = Importer(None, "c", owner="o", dry_run=True).run([a])
    assert (dry.accepted, dry.skipped, dry.rejected) == (1, 1, 1)
    assert store.counts() == {}
    real = Importer(store, "c", owner="o").run([a])
    assert (real.accepted, real.skipped, real.rejected) == (1, 1, 1)


def test_a_refused_file_stops_before_anything_is_enqueued(tmp_path, store):
    good = write(tmp_path / "g.csv", [(NUMS[0], "x")])
    bad = tmp_path / "b.csv"
    bad.write_text("姓名,备注\n张三,x\n", encoding="utf-8")
    with pytest.raises(InputError):
        Importer(store, "c", owner="o").run([good, str(bad)])
    assert store.counts() == {}


def test_campaign_name_is_required(store):
    with pytest.raises(InputError, match="--campaign"):
        Importer(store, "  ")


def test_template_may_use_remark_and_tags_by_their_plain_names(tmp_path, store):
    f = write(tmp_path / "r.csv", [(NUMS[0], "x", "老客户")], ("手机号", "姓名", "客户备注"))
    assert Importer(store, "c", owner="o", template="{name}，{remark}").run([f]).accepted == 1
