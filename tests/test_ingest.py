"""Readers, encodings, header aliases and phone normalisation (wecomctl.ingest).

The cases in tests/cases/import/ are checked at the reader level: the importer owns
dedupe, so the helper dedupes within the file by phone (first wins) as the importer would.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from wecomctl.errors import EXIT_USAGE, InputError
from wecomctl.ingest import Blank, Lead, Reject, ReadOptions, open_lead_file
from wecomctl.ingest import phones
from wecomctl.ingest.phones import SCIENTIFIC, PhoneRejected, normalise_mobile

CASES = Path(__file__).parent / "cases" / "import"
EXPECTED = json.loads((CASES / "cases.json").read_text(encoding="utf-8"))


def read(path, **options):
    lf = open_lead_file(str(path), ReadOptions(**options))
    return lf, list(lf.rows())


def outcome(items):
    """(accepted [(phone, name)], rejects, duplicates, blanks) as the importer would count."""
    accepted, seen, rejects, skips, blanks = [], set(), 0, 0, 0
    for item in items:
        if isinstance(item, Blank):
            blanks += 1
        elif isinstance(item, Reject):
            rejects += 1
        elif item.phone in seen:
            skips += 1
        else:
            seen.add(item.phone)
            accepted.append([item.phone, item.name])
    return accepted, rejects, skips, blanks


def write(tmp_path, name, data: bytes | str, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode(encoding))
    return path


# --- the shared cases -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_case(name):
    expected = EXPECTED[name]
    if expected.get("error"):
        with pytest.raises(InputError) as info:
            read(CASES / name)
        assert info.value.exit_code == EXIT_USAGE
        assert "\n" not in str(info.value)
        return
    _, items = read(CASES / name)
    accepted, rejects, skips, _ = outcome(items)
    assert accepted == expected["accept"]
    assert rejects == expected["reject"]
    assert skips == expected["skip"]
    produced = {i.phone for i in items if isinstance(i, Lead)}
    assert not produced & set(expected.get("never", []))


def test_cases_copied_byte_for_byte():
    shared = Path(__file__).resolve().parents[2] / "shared" / "cases" / "import"
    if not shared.is_dir():
        pytest.skip("the shared cases are not beside this checkout")
    for src in shared.iterdir():
        assert (CASES / src.name).read_bytes() == src.read_bytes(), src.name


def test_case_details():
    lf, items = read(CASES / "header_variants.csv")
    assert lf.columns == {"phone": "联系电话", "name": "客户姓名", "owner": None, "remark": "备注", "tags": None}
    assert items[0].fields == {"联系电话": "13800138010", "客户姓名": "刘三", "备注": "VIP", "_extra_1": "extra",
                               "remark": "VIP"}
    assert (items[1].row, items[1].name, items[1].fields["备注"]) == (2, None, "")

    lf, items = read(CASES / "invalid_numbers.csv")
    reasons = [(r.row, r.raw, r.reason.split(":")[0]) for r in items if isinstance(r, Reject)]
    assert reasons == [(1, "12345", "too short"), (2, "2380013801", "not a mobile number"),
                       (3, "23800138012", "not a mobile number"), (4, "1380013801x", "contains letters")]

    _, items = read(CASES / "excel_scientific.csv")
    assert [r.reason for r in items if isinstance(r, Reject)] == [SCIENTIFIC, SCIENTIFIC]

    _, items = read(CASES / "trailing_empty_rows.csv")
    assert [type(i).__name__ for i in items] == ["Lead", "Blank", "Blank", "Blank"]

    lf, items = read(CASES / "leads.jsonl")
    assert lf.format == "jsonl" and [i.row for i in items] == [1, 2, 3]
    assert open_lead_file(str(CASES / "leads_array.json")).format == "json"
    assert open_lead_file(str(CASES / "utf16_unicode_text.txt")).encoding == "utf-16-le"
    assert open_lead_file(str(CASES / "gbk_excel.csv")).encoding == "gb18030"
    assert open_lead_file(str(CASES / "utf8_bom.csv")).encoding == "utf-8-sig"


def test_no_phone_column_message():
    with pytest.raises(InputError) as info:
        read(CASES / "no_phone_column.csv")
    message = str(info.value)
    assert "姓名, 备注" in message and "手机号" in message and "--phone-column" in message


# --- normalise_mobile -------------------------------------------------------------------
@pytest.mark.parametrize("raw", [
    "13800138000", "+8613800138000", "+86 138 0013 8000", "0086 138 0013 8000", "008613800138000",
    "86-138-0013-8000", "8613800138000", "(138)0013-8000", "138-0013-8000", "138.0013.8000",
    "(+86) 138 0013 8000", "+86 (0) 138 0013 8000", "１３８００１３８０００", "＋８６１３８００１３８０００",
    " 13800138000 ", "\u200b138\u00a00013\u30008000\u200e", "\ufeff13800138000", "1380013\x008000",
    "13800138000.0", "+8613800138000.00", "'13800138000", '="13800138000"', "13,800,138,000",
])
def test_mobile_accepted(raw):
    assert normalise_mobile(raw) == "+8613800138000"


def test_mobile_other_regions():
    assert normalise_mobile("+852 9123 4567") == "+85291234567"
    assert normalise_mobile("+1 415 555 2671") == "+14155552671"  # US: fixed line or mobile
    assert normalise_mobile("9123 4567", default_region="HK") == "+85291234567"


@pytest.mark.parametrize("raw, reason", [
    ("1.38001E+10", "scientific notation"),
    ("8.61380E+12", "scientific notation"),
    ("1.38001e10", "scientific notation"),
    ("1,38001E+10", "scientific notation"),
    ("138OO138OOO", "contains letters"),
    ("1380013801x", "contains letters"),
    ("+8613800138000 ext 5", "contains letters"),
    ("#N/A", "Excel error value"),
    ("########", "Excel placeholder"),
    ("12345", "too short"),
    ("1380013800", "too short"),
    ("1380013800.0", "too short"),  # the ".0" is never taken as a digit
    ("138001380001", "too long"),
    ("13800138000 13900139000", "too long"),
    ("13800138000/13900139000", "several numbers in one cell"),
    ("13800138000\n13900139000", "several numbers in one cell"),
    ("13800138000.5", "decimal number"),
    ("2380013801", "not a mobile number"),  # a Chongqing landline
    ("01088888888", "not a mobile number"),
    ("23800138012", "not a mobile number"),
    ("14400138000", "not a mobile number"),
    ("+44 20 7946 0958", "not a mobile number"),
    ("+999 1234567", "unknown country code"),
    ("+86+13800138000", "misplaced +"),
    ("138*0013*8000", "unexpected characters"),
    ("", "empty phone"),
    ("\u200b \u00a0", "empty phone"),
])
def test_mobile_rejected(raw, reason):
    with pytest.raises(PhoneRejected) as info:
        normalise_mobile(raw)
    assert info.value.reason.startswith(reason), info.value.reason
    assert isinstance(info.value, ValueError)


def test_damaged_numbers_never_become_plausible_numbers():
    # The digits Excel kept would pass as valid mobiles: the check must come first.
    for raw in ("1.38001E+10", "8.61380E+12", "1.38E+10"):
        with pytest.raises(PhoneRejected):
            normalise_mobile(raw)
    assert normalise_mobile("13800100000") == "+8613800100000"  # typed in full: fine


def _slow(raw: str) -> str | None:
    try:
        return phones._full(raw, "CN")
    except PhoneRejected:
        return None


def test_fast_path_agrees_with_phonenumbers_on_a_large_sample():
    # The memo per 7-digit block must give what phonenumbers gives for every number: all
    # 1xx prefixes, random tails, and the ways people write +86 and group digits.
    rng = random.Random(3)
    phones._BLOCK_IS_MOBILE[:] = bytes(len(phones._BLOCK_IS_MOBILE))
    forms = ["{n}", "+86{n}", "+86 {a} {b} {c}", "0086{n}", "86-{a}-{b}-{c}", "86{n}", "{a} {b} {c}",
             "{a}-{b}-{c}", " {n} ", "+86-{n}"]
    checked = 0
    for _ in range(20_000):
        n = f"1{rng.randrange(10**10):010d}"
        if rng.random() < 0.3:  # many numbers per block, so the memo is exercised on hits
            n = n[:7] + f"{rng.randrange(10**4):04d}"
        raw = rng.choice(forms).format(n=n, a=n[:3], b=n[3:7], c=n[7:])
        fast = phones.normalise_mobile(raw) if phones._fast_cn(raw) else None
        if fast is None:
            with pytest.raises(PhoneRejected):
                phones.normalise_mobile(raw)
        assert fast == _slow(raw), raw
        checked += 1
    memo = phones._BLOCK_IS_MOBILE
    assert checked == 20_000 and memo.count(phones._MOBILE) > 0 and memo.count(phones._NOT_MOBILE) > 0  # both seen


def test_fast_path_leaves_other_shapes_to_the_full_check():
    for raw in ("1.38001E+10", "138OO138000", "010-65521234", "+1 415 555 2671", "13800138000.0",
                "(+86) 138 0013 8000", "138 0013 8000\u200b", "1３８００１３８０００", "1٣٨٠٠١٣٨٠٠٠"):
        assert phones._fast_cn(raw) is None, raw


def test_digits_of_other_scripts_never_reach_the_e164_form():
    # Full-width digits are what a Chinese IME types; NFKC makes them ASCII. Other
    # scripts' digits are not a phone number anyone in a lead list wrote.
    assert phones.normalise_mobile("1３８００１３８０００") == "+8613800138000"
    with pytest.raises(PhoneRejected):
        phones.normalise_mobile("1٣٨٠٠١٣٨٠٠٠")


# --- headers ----------------------------------------------------------------------------
@pytest.mark.parametrize("header", [
    "手机号", "手机", "手机号码", "电话", "联系电话", "联系方式", "mobile", "Phone", "PHONE_NUMBER",
    "phone number", "Tel", "cellphone", " 手机号 ", "手 机 号", "ｍｏｂｉｌｅ", "\ufeff手机号",
    "手机号\u200b", "\u00a0phone\u00a0", "手机号（必填）", "*手机号", "Phone-Number",
])
def test_phone_header_aliases(tmp_path, header):
    lf, items = read(write(tmp_path, "a.csv", f"{header},x\n13800138000,y\n"))
    assert items[0].phone == "+8613800138000"


def test_name_and_owner_aliases(tmp_path):
    path = write(tmp_path, "a.csv", "Mobile,Customer Name,跟进人,Notes\n13800138000, 张三 ,zhangsan,hi\n")
    lf, items = read(path)
    assert lf.columns == {"phone": "Mobile", "name": "Customer Name", "owner": "跟进人", "remark": "Notes", "tags": None}
    assert (items[0].name, items[0].owner) == ("张三", "zhangsan")
    assert items[0].fields["Notes"] == "hi"


def test_ambiguous_columns_refused_naming_both(tmp_path):
    with pytest.raises(InputError, match="手机.*电话.*--phone-column"):
        read(write(tmp_path, "a.csv", "手机,电话,姓名\n13800138000,13900139000,张三\n"))
    with pytest.raises(InputError, match="姓名.*name"):
        read(write(tmp_path, "b.csv", "phone,姓名,name\n13800138000,张三,Zhang\n"))


def test_column_overrides_take_precedence(tmp_path):
    path = write(tmp_path, "a.csv", "手机,电话,备注,姓名\n13800138000,13900139000,Li,张三\n")
    _, items = read(path, phone_column="电话", name_column="备注")
    assert (items[0].phone, items[0].name) == ("+8613900139000", "Li")
    _, items = read(path, phone_column=" 电 话 ")  # matched like aliases
    assert items[0].phone == "+8613900139000"
    with pytest.raises(InputError, match="--phone-column 'cell' is not a column"):
        read(path, phone_column="cell")


def test_json_keys_use_aliases_per_record(tmp_path):
    path = write(tmp_path, "a.jsonl", '{"手机号": "13800138000", "客户姓名": "张三"}\n\n'
                                      '{"Mobile": 13900139000, "name": "李四", "tags": ["a"], "vip": true}\n'
                                      '{"name": "王五"}\nnot json\n[1]\n{}\n')
    _, items = read(path)
    assert [(i.phone, i.name) for i in items[:2]] == [("+8613800138000", "张三"), ("+8613900139000", "李四")]
    assert items[1].fields == {"Mobile": "13900139000", "name": "李四", "tags": '["a"]', "vip": "true"}
    assert items[2].reason.startswith("no usable phone field") and items[3].reason.startswith("not valid JSON")
    assert items[4].reason.startswith("not a JSON object") and isinstance(items[5], Blank)
    assert [i.row for i in items] == [1, 2, 3, 4, 5, 6]


def test_headerless_list_of_numbers(tmp_path):
    lf, items = read(write(tmp_path, "a.txt", "13800138000\n13900139000\n\n"))
    assert lf.headerless and [i.phone for i in items if isinstance(i, Lead)] == ["+8613800138000", "+8613900139000"]
    assert items[0].row == 1


# --- encodings --------------------------------------------------------------------------
def test_gbk_bytes_that_are_valid_utf8_are_read_as_gbk(tmp_path):
    # "小强" in GBK is d0a1 c7bf, which is also valid UTF-8 ("Сǿ"). Strict UTF-8 alone
    # would take it; the evidence (mixed scripts in one word vs. common hanzi) says GBK.
    data = "phone,name\n13800138000,小强\n".encode("gbk")
    data.decode("utf-8")  # really valid UTF-8
    lf, items = read(write(tmp_path, "a.csv", data))
    assert lf.encoding == "gb18030" and items[0].name == "小强"


# Common surnames, and given-name characters from GB2312 level 1 (the 3,755 commonest).
SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
LEVEL1 = [bytes([a, b]).decode("gb2312") for a in range(0xB0, 0xD8) for b in range(0xA1, 0xFF)
          if not (a == 0xD7 and b > 0xF9)]


def test_small_gbk_files_whose_bytes_are_valid_utf8_are_read_as_gbk():
    # One row under an ASCII header: the least evidence a file can give. Every such
    # name whose GBK bytes also form UTF-8 ("魏梅" reads "κ÷", "枚枚" "öö") is GBK.
    import io

    from wecomctl.ingest.encoding import detect

    checked = 0
    for names in (SURNAMES, LEVEL1):
        for first in names:
            for second in LEVEL1[::7]:
                raw = (first + second).encode("gb18030")
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                checked += 1
                data = b"phone,name\r\n13800138000," + raw + b"\r\n"
                assert detect("a.csv", io.BytesIO(data)).name == "gb18030", first + second
    assert checked > 3000


def test_damaged_utf8_lines_are_rejected_not_read_as_gbk(tmp_path):
    # A UTF-8 file with one Latin-1 byte in a remark: reading that line as GB18030
    # would store the name 张三 as 寮犱笁. In the sample or beyond it, in either order.
    bad = "13800138000,张三,caf".encode() + b"\xe9s\r\n"
    good = "13900139000,李四,ok\r\n".encode()
    pad = "".join(f"1370013{i:04d},王五,{'x' * 80}\r\n" for i in range(800)).encode()
    for body in (bad + good, good + bad, good + pad + bad):
        lf, items = read(write(tmp_path, "a.csv", "手机号,姓名,备注\r\n".encode() + body))
        assert lf.encoding == "utf-8"
        names = {i.name for i in items if isinstance(i, Lead)}
        assert "李四" in names and not any("寮" in n for n in names)
        [reject] = [i for i in items if not isinstance(i, Lead)]
        assert reject.reason.startswith("undecodable text") and reject.raw == "13800138000"
    # GBK rows appended to a UTF-8 file are still read as GBK, line by line.
    lf, items = read(write(tmp_path, "b.csv", "手机号,姓名\r\n".encode() + good + "13700137000,赵六\r\n".encode("gbk")))
    assert [i.name for i in items] == ["李四", "赵六"]


def test_utf8_that_is_also_valid_gb18030_stays_utf8(tmp_path):
    for name in ("张三", "José Müller", "Сергей", "李㒲", "Αλέξανδρος", "Dvořák", "Łukasz", "Zoë", "İstanbul",
                 "Ñandú", "ΑΘΗΝΑ", "иван", "naïve café", "山田太郎", "김민수", "α型客户", "Ω公司", "Nguyễn Văn Ơn"):
        data = f"phone,name\n13800138000,{name}\n".encode()
        lf, items = read(write(tmp_path, "a.csv", data))
        assert (lf.encoding, items[0].name) == ("utf-8", name)


def test_gbk_after_a_long_ascii_prefix(tmp_path):
    # The first 64 KiB are ASCII (no evidence); the decision is made on the first Chinese.
    rows = "".join(f"1380013{i:04d},{'x' * 100}\n" for i in range(700))
    data = ("phone,name\n" + rows + "13900139000,王五\n").encode("gbk")
    lf, items = read(write(tmp_path, "a.csv", data))
    assert len(data) > 64 * 1024 and lf.encoding == "gb18030"
    assert items[-1].name == "王五"


def test_mixed_file_falls_back_per_line(tmp_path):
    # A UTF-8 export with rows from a GBK export appended, in either order.
    utf8, gbk = "13800138000,张三\n".encode(), "13900139000,李四\n".encode("gb18030")
    for data in (b"phone,name\n" + utf8 + gbk, b"phone,name\n" + gbk + utf8):
        _, items = read(write(tmp_path, "a.csv", data))
        assert sorted(i.name for i in items) == ["张三", "李四"]
    # Beyond the sample: the decision was UTF-8, a later line is GBK.
    big = b"phone,name,note\n" + b"13800138000,\xe5\xbc\xa0\xe4\xb8\x89," + b"x" * 70000 + b"\n" + gbk
    lf, items = read(write(tmp_path, "b.csv", big))
    assert lf.encoding == "utf-8" and items[-1].name == "李四"


def test_undecodable_row_rejected_not_garbled(tmp_path):
    data = "phone,name\n13800138000,张三\n13900139000,".encode() + b"\xff\xfe\x80\n"
    _, items = read(write(tmp_path, "a.csv", data))
    assert isinstance(items[0], Lead) and items[1].reason.startswith("undecodable text")


def test_utf16_be_and_bomless_utf16(tmp_path):
    text = "手机号\t姓名\r\n13800138000\t张三\r\n"
    for data, enc in ((b"\xfe\xff" + text.encode("utf-16-be"), "utf-16-be"),
                      (text.encode("utf-16-le"), "utf-16-le")):
        lf, items = read(write(tmp_path, "a.txt", data))
        assert (lf.encoding, lf.delimiter, items[0].name) == (enc, "\t", "张三")


def test_encoding_override(tmp_path):
    path = write(tmp_path, "a.csv", "手机号,姓名\n13800138000,李㒲\n", encoding="gb18030")
    lf, items = read(path, encoding="gbk")  # gbk is read as its superset
    assert lf.encoding == "gb18030" and items[0].name == "李㒲"
    with pytest.raises(InputError, match="unknown encoding"):
        read(path, encoding="klingon")


def test_mojibake_header_hint(tmp_path):
    # A UTF-8 file opened as GBK in Excel and saved as UTF-8 again.
    garbled = "手机号".encode().decode("gb18030", errors="replace")
    with pytest.raises(InputError, match="wrong encoding"):
        read(write(tmp_path, "a.csv", f"{garbled},x\n13800138000,y\n"))


# --- delimiters and CSV shape -----------------------------------------------------------
@pytest.mark.parametrize("delimiter", [",", "\t", ";", "|", "，"])
def test_delimiter_sniffed(tmp_path, delimiter):
    text = delimiter.join(["手机号", "姓名", "备注"]) + "\n" + delimiter.join(["13800138000", "张三", "a"]) + "\n"
    lf, items = read(write(tmp_path, "a.csv", text))
    assert lf.delimiter == delimiter and (items[0].name, items[0].fields["备注"]) == ("张三", "a")


def test_delimiter_not_fooled_by_commas_in_cells(tmp_path):
    text = "phone\tname\tnote\n13800138000\tSmith, John\t你好，欢迎\n13900139000\tLi, Lei\tx,y\n"
    lf, items = read(write(tmp_path, "a.txt", text))
    assert lf.delimiter == "\t" and items[0].name == "Smith, John"


def test_excel_sep_line(tmp_path):
    lf, items = read(write(tmp_path, "a.csv", "\ufeffsep=;\r\nphone;name\r\n13800138000;Zhang, San\r\n"))
    assert lf.delimiter == ";" and items[0].row == 1 and items[0].name == "Zhang, San"


def test_delimiter_override(tmp_path):
    path = write(tmp_path, "a.csv", "phone|name,x\n13800138000|a,b\n")
    lf, items = read(path, delimiter="|")
    assert lf.delimiter == "|" and items[0].fields == {"phone": "13800138000", "name,x": "a,b"}
    tsv = write(tmp_path, "b.csv", "phone\tname,x\n13800138000\ta,b\n")
    assert read(tsv, delimiter="tab")[0].delimiter == "\t"


def test_rows_shape(tmp_path):
    text = ("\n,,\n手机号,姓名\r\n13800138000,张三,x,y\r\n\r\n ,\u3000\r\n13900139000\r\n"
            '"13700137000","Multi\nline"\r\n13600136000,Ma\x00ry\r\n')
    _, items = read(write(tmp_path, "a.csv", text))
    kinds = [(type(i).__name__, i.row) for i in items]
    assert kinds == [("Lead", 1), ("Blank", 2), ("Blank", 3), ("Lead", 4), ("Lead", 5), ("Lead", 6)]
    assert items[0].fields == {"手机号": "13800138000", "姓名": "张三", "_extra_1": "x", "_extra_2": "y"}
    assert items[3].name is None and items[4].name == "Multi\nline" and items[5].name == "Mary"


def test_old_mac_line_endings(tmp_path):
    _, items = read(write(tmp_path, "a.csv", "phone,name\r13800138000,a\r13900139000,b\r"))
    assert [i.name for i in items] == ["a", "b"]


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 100, ".xls"),
    (b"\n\n  \n", "no header row"),
    (b"PK\x03\x04not really a zip", "XLSX"),
    (b'[{"phone": "13800138000"}, oops]', "not valid JSON"),
])
def test_refused_files(tmp_path, data, message):
    with pytest.raises(InputError, match=message) as info:
        lf = open_lead_file(str(write(tmp_path, "a.csv", data)))
        list(lf.rows())
    assert "\n" not in str(info.value)


def test_missing_file():
    with pytest.raises(InputError, match="cannot read"):
        open_lead_file("/nonexistent/leads.csv")


# --- JSON -------------------------------------------------------------------------------
def test_json_numbers_kept_as_written(tmp_path):
    text = ('[{"phone": 13800138000}, {"phone": 1.38001E+10}, {"phone": 13900139000.0},'
            ' {"phone": "137 0013 7000", "name": null}, []]')
    _, items = read(write(tmp_path, "a.json", text))
    assert items[0].phone == "+8613800138000" and items[1].reason == SCIENTIFIC
    assert items[2].phone == "+8613900139000" and items[3].name is None
    assert items[4].reason.startswith("not a JSON object")


def test_json_array_streams_across_chunks(tmp_path):
    records = [{"手机号": f"1380013{i:04d}", "姓名": "名" * (i % 50), "备注": "x" * 300} for i in range(700)]
    text = "\ufeff [\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"
    path = write(tmp_path, "a.json", text)
    assert path.stat().st_size > 3 * 64 * 1024
    _, items = read(path)
    assert [i.phone for i in items] == [f"+861380013{i:04d}" for i in range(700)]


# --- XLSX -------------------------------------------------------------------------------
def test_xlsx_numeric_phone_cells(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["手机号", "姓名", "金额"])
    ws.append([13800138000, "张三", 1.5])  # a number cell, as Excel stores a typed phone
    ws.append([13900139000.0, None, None])  # a float column
    ws.append(["137 0013 7000", "王五"])  # text cell
    ws.append([None, None, None])
    ws.append([1.38001e10 + 0.5, "bad"])  # not integral: not a phone
    path = tmp_path / "leads.xlsx"
    wb.save(path)
    renamed = path.rename(tmp_path / "leads.csv")  # detected by content, not extension
    lf, items = read(renamed)
    assert (lf.format, lf.encoding, lf.delimiter) == ("xlsx", None, None)
    assert [(i.phone, i.name) for i in items[:3]] == [
        ("+8613800138000", "张三"), ("+8613900139000", None), ("+8613700137000", "王五")]
    assert items[0].raw == "13800138000" and items[0].fields["金额"] == "1.5"
    assert isinstance(items[3], Blank) and isinstance(items[4], Reject)


def test_xlsx_number_cells_shown_in_scientific_notation_are_rejected(tmp_path):
    # A CSV holding 1.38001E+10, opened in Excel and saved as XLSX, becomes the number
    # 13800100000 with the format 0.00E+00: a plausible number whose digits are gone.
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["手机号", "姓名", "金额"])
    for value, fmt in ((13800100000, "0.00E+00"), (8613800000000, "0.0000E+00"), (13800138000, "##0.0E+0"),
                       (13900139000, "General"), (13700137000, "0")):
        ws.append([value, "x", 123456])
        ws.cell(ws.max_row, 1).number_format = fmt
    ws.cell(ws.max_row, 3).number_format = "0.0E+00"  # another column: read as Excel shows it
    wb.save(tmp_path / "sci.xlsx")
    lf, items = read(tmp_path / "sci.xlsx")
    assert [type(i) for i in items] == [Reject, Reject, Reject, Lead, Lead]
    assert [i.raw for i in items[:3]] == ["1.38E+10", "8.6138E+12", "1.4E+10"]
    assert all(i.reason == phones.SCIENTIFIC for i in items[:3])
    assert [i.phone for i in items[3:]] == ["+8613900139000", "+8613700137000"]
    assert items[3].fields["金额"] == "123456" and items[4].fields["金额"] == "1.2E+05"


def test_leads_wrapped_in_an_api_answer_get_a_hint(tmp_path):
    path = write(tmp_path, "api.json", '{"code": 0, "data": [{"phone": "13800138000"}]}')
    with pytest.raises(InputError, match="inside the 'data' field of one JSON object"):
        read(path)
    pretty = write(tmp_path, "api2.json", '{\n  "code": 0,\n  "data": [\n    {"phone": "13800138000"}\n  ]\n}\n')
    with pytest.raises(InputError, match=r"one JSON object over several lines.*save that array alone"):
        read(pretty)


def test_title_rows_above_the_header_are_skipped(tmp_path):
    # Reports exported from CRMs and Excel often carry a title (merged across the row)
    # and an export time above the table.
    path = write(tmp_path, "t.csv", "2024年客户名单,,\n导出时间: 2024-05-01,,\n\n联系电话,客户姓名,备注\n"
                                    "13800138000,张三,vip\n13900139000,李四,\n")
    lf, items = read(path)
    assert lf.title_rows == 2 and lf.columns["phone"] == "联系电话"
    assert [(i.row, i.phone, i.name) for i in items] == [(1, "+8613800138000", "张三"), (2, "+8613900139000", "李四")]
    lf, items = read(path, phone_column="联系电话")
    assert lf.title_rows == 2 and len(items) == 2
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["2024年客户名单"])
    ws.merge_cells("A1:C1")
    ws.append(["联系电话", "客户姓名", "备注"])
    ws.append([13800138000, "张三", "vip"])
    wb.save(tmp_path / "t.xlsx")
    lf, items = read(tmp_path / "t.xlsx")
    assert lf.title_rows == 1 and [(i.phone, i.name) for i in items] == [("+8613800138000", "张三")]


def test_rows_holding_a_mobile_are_never_taken_for_a_title(tmp_path):
    # A headerless list whose later row happens to say "phone" loses no lead.
    lf, items = read(write(tmp_path, "h.csv", "13800138000\nphone\n13900139000\n"))
    assert lf.headerless and lf.title_rows == 0
    assert [i.phone for i in items if isinstance(i, Lead)] == ["+8613800138000", "+8613900139000"]
    # A title row is not a header, and with no table under it the file is refused as before.
    with pytest.raises(InputError, match="no phone column; found: 2024年客户名单"):
        read(write(tmp_path, "n.csv", "2024年客户名单,,\n名字,城市\n张三,北京\n"))


def test_xlsx_sheets(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    wb = openpyxl.Workbook()
    wb.active.title = "说明"
    wb.active.append(["请在下一页填写"])
    leads = wb.create_sheet("客户")
    leads.append(["mobile", "name"])
    leads.append(["13800138000", "a"])
    wb.save(tmp_path / "one.xlsx")
    lf, items = read(tmp_path / "one.xlsx")
    assert lf.sheet == "客户" and items[0].phone == "+8613800138000"

    more = wb.create_sheet("客户2")
    more.append(["手机号"])
    wb.save(tmp_path / "two.xlsx")
    with pytest.raises(InputError, match="'客户', '客户2'"):
        read(tmp_path / "two.xlsx")


@pytest.mark.parametrize("data, lines", [
    (b"a\r\nb\rc\nd", [b"a\n", b"b\n", b"c\n", b"d"]),
    (b"a\r", [b"a\n"]),
    (b"\r\n\r\n", [b"\n", b"\n"]),
    (b"a" * 65535 + b"\r" + b"\nb", [b"a" * 65535 + b"\n", b"b"]),  # \r\n split across blocks
    (b"a" * 65535 + b"\r" + b"b", [b"a" * 65535 + b"\n", b"b"]),  # a lone \r at a block end
])
def test_byte_lines_handles_every_line_end_across_blocks(data, lines):
    import io

    from wecomctl.ingest.encoding import byte_lines
    assert list(byte_lines(io.BytesIO(data))) == lines


def test_a_runaway_line_is_refused(tmp_path):
    from wecomctl.ingest.encoding import MAX_LINE
    path = write(tmp_path, "huge.csv", b"phone\n" + b'"' + b"1" * (MAX_LINE + 10))
    with pytest.raises(InputError, match=r"huge\.csv: line 2 is longer than 16 MiB"):
        lf, rows = read(path)


def test_runaway_quote_is_reported_with_its_lines_and_a_multiline_cell_is_not(tmp_path):
    path = write(tmp_path, "q.csv", '手机号,姓名,备注\n13800138000,张三,"vip\n13900139000,李四,x\n'
                                    '13700137000,王五,ok"\n13500135000,钱七,"多行\n地址"\n')
    _, items = read(path)
    rejects = [i for i in items if isinstance(i, Reject)]
    leads = [i for i in items if isinstance(i, Lead)]
    assert [lead.phone for lead in leads] == ["+8613500135000"]  # the multi-line address is fine
    (r,) = rejects
    assert r.reason.startswith("runaway quote") and "lines 2 to 4" in r.reason and "swallowing 2 rows" in r.reason


def test_nul_bytes_are_removed_and_counted(tmp_path):
    path = write(tmp_path, "n.csv", b"phone,name\n1380013\x008000,A\n13900139000,B\n")
    lf, items = read(path)
    assert [i.phone for i in items if isinstance(i, Lead)] == ["+8613800138000", "+8613900139000"]
    assert lf.nul_rows == 1


@pytest.mark.parametrize("dash", ["\u2010", "\u2011", "\u2012", "\u2013", "\u2014", "\u2212", "\ufe63"])
def test_typographic_dashes_separate_digit_groups(dash):
    assert normalise_mobile(f"138{dash}0013{dash}8000") == "+8613800138000"


def test_runaway_quote_swallowing_formatted_numbers_is_caught(tmp_path):
    path = write(tmp_path, "q2.csv", '手机号,姓名,备注\n13800138000,张三,"vip\n138-0013-9000,李四,x\n'
                                     '+86 137 0013 7000,王五,y\n135 0013 5000,赵六,ok"\n')
    _, items = read(path)
    rejects = [i for i in items if isinstance(i, Reject)]
    assert len(rejects) == 1 and rejects[0].reason.startswith("runaway quote")


def test_remark_and_tags_columns_are_template_variables_under_plain_names(tmp_path):
    path = write(tmp_path, "r.csv", "手机号,客户备注,客户标签\n13800138000,老客户,VIP\n")
    lf, items = read(path)
    (lead,) = items
    assert lf.columns["remark"] == "客户备注" and lf.columns["tags"] == "客户标签"
    assert lead.fields["remark"] == "老客户" and lead.fields["tags"] == "VIP" and lead.fields["客户备注"] == "老客户"
    with pytest.raises(InputError, match="two remark columns"):
        read(write(tmp_path, "r2.csv", "手机号,备注,remark\n13800138000,a,b\n"))
