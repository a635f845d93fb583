"""Made-up campaign files for the demo and for trying wecomctl (no real person's data).

`python -m wecomctl.samples DIR` writes them; `samples/` in the repository holds the same
output. The share of bad rows is realistic: numbers Excel damaged, landlines, typos,
duplicates written differently, owners who left the company, and numbers the simulator's
gateway does not know (ending in 44).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
GIVEN = "伟芳娜秀英敏静丽强磊军洋勇艳杰娟涛明超秀兰霞平刚桂英华建华玉兰萍红娥玲芬燕彬晨宇轩浩然子涵欣怡梓萱一诺思远"
STAFF = ["zhangsan", "lisi", "wangwu", "zhaoliu", "sunqi", "zhouba"]
PREFIXES = ["130", "131", "132", "135", "136", "137", "138", "139", "150", "151", "152", "157", "158",
            "159", "176", "177", "178", "180", "181", "182", "183", "185", "186", "187", "188", "189", "199"]
CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "武汉", "南京", "西安", "重庆"]


def _mobile(rng: random.Random) -> str:
    while True:
        n = rng.choice(PREFIXES) + f"{rng.randrange(10**8):08d}"
        if not n.endswith("44"):
            return n


def _name(rng: random.Random) -> str:
    return rng.choice(SURNAMES) + "".join(rng.choice(GIVEN) for _ in range(rng.choice((1, 2))))


def _styled(n: str, rng: random.Random) -> str:
    """The same number the way people type it."""
    return rng.choice([n, f"+86 {n[:3]} {n[3:7]} {n[7:]}", f"{n[:3]}-{n[3:7]}-{n[7:]}", f"86{n}", f"0086{n}", f" {n} "])


def main_rows(count: int = 1200, seed: int = 20261203) -> list[list[str]]:
    rng = random.Random(seed)
    rows: list[list[str]] = []
    seen: list[str] = []
    for i in range(count):
        owner = rng.choice(STAFF)
        roll = rng.random()
        if roll < 0.01:
            phone = rng.choice(PREFIXES) + f"{rng.randrange(10**6):06d}44"  # unknown to the gateway
        elif roll < 0.015:
            phone = f"1.{rng.randrange(10**5):05d}E+10"  # Excel's scientific notation
        elif roll < 0.025:
            phone = rng.choice(["010-6552", "0755-8632", "021-5089"]) + f"{rng.randrange(10**4):04d}"  # landline
        elif roll < 0.03:
            phone = _mobile(rng)[:10]  # a digit lost
        elif roll < 0.035:
            phone = _mobile(rng)
            phone = phone[:5] + "O" + phone[6:]  # a letter O typed for a zero
        elif roll < 0.075 and seen:
            phone = _styled(rng.choice(seen), rng)  # the same lead again, written differently
        else:
            phone = _mobile(rng)
            seen.append(phone)
            phone = _styled(phone, rng) if rng.random() < 0.2 else phone
        if rng.random() < 0.004:
            owner = "former_staff"  # left the company: WeCom answers 60111
        name = _name(rng) if rng.random() > 0.03 else ""
        rows.append([phone, name, owner, rng.choice(CITIES)])
    return rows


def write(directory: str) -> list[Path]:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    main = d / "leads_demo.csv"
    body = "\r\n".join(",".join(r) for r in [["手机号", "姓名", "负责人", "城市"]] + main_rows()) + "\r\n"
    main.write_bytes(body.encode("utf-8-sig"))  # what Excel's "CSV UTF-8" writes
    rng = random.Random(7)
    gbk = d / "leads_excel_gbk.csv"  # Excel on a Chinese Windows: GBK, CRLF
    lines = ["手机号码,客户姓名,跟进人"] + [f"{_mobile(rng)},{_name(rng)},{rng.choice(STAFF)}" for _ in range(60)]
    gbk.write_bytes(("\r\n".join(lines) + "\r\n").encode("gb18030"))
    jl = d / "leads_form.jsonl"  # a form tool's export
    rng = random.Random(11)
    with open(jl, "w", encoding="utf-8") as fh:
        for _ in range(40):
            fh.write(json.dumps({"mobile": _styled(_mobile(rng), rng), "name": _name(rng),
                                 "owner": rng.choice(STAFF)}, ensure_ascii=False) + "\n")
    return [main, gbk, jl]


if __name__ == "__main__":
    for p in write(sys.argv[1] if len(sys.argv) > 1 else "samples"):
        print(p)
