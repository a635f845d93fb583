"""WeCom errcodes as data: errcode -> class, meaning and what to do.

The table is `data/errcodes.tsv` (WeCom's codes) plus `data/gateway_errcodes.tsv` (the
add-by-phone gateway's own codes). Classes:
  ok, retry (transient, backoff), throttle (rate/concurrency: wait, no attempt used),
  token (refresh the token once, repeat once), fatal (stop the run), dead (dead-letter),
  done (already happened: record as done), window (retry only inside the welcome window).
Unknown errcodes are dead-lettered with their errmsg.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

# What to do, where the table's note is empty.
HINTS = {
    60111: "the owner's userid does not exist in WeCom (typo, or the member left): fix the owner column and re-import the fixed rows; they replace their dead letters",
    40003: "the owner's userid is invalid (left, deleted, or outside the app's visible range): fix the owner column and re-import the fixed rows",
    41054: "the owner has not activated WeCom: pick another owner and re-import the fixed rows",
}

CLASSES = ("ok", "retry", "throttle", "token", "fatal", "dead", "done", "window")


@dataclass(frozen=True)
class ErrcodeInfo:
    errcode: int
    kind: str
    meaning: str
    note: str


@lru_cache(maxsize=1)
def table() -> dict[int, ErrcodeInfo]:
    out: dict[int, ErrcodeInfo] = {}
    for name in ("errcodes.tsv", "gateway_errcodes.tsv"):
        text = resources.files("wecomctl.data").joinpath(name).read_text(encoding="utf-8")
        for row in csv.DictReader(text.splitlines(), delimiter="\t"):
            kind = row["class"].strip()
            if kind not in CLASSES:
                raise ValueError(f"{name}: unknown class {kind!r} for errcode {row['errcode']}")
            code = int(row["errcode"])
            note = (row.get("note") or "").strip() or HINTS.get(code, "")
            out[code] = ErrcodeInfo(code, kind, row["meaning"].strip(), note)
    return out


def lookup(errcode: int) -> ErrcodeInfo:
    """The class of an errcode; an unknown one is `dead` (kept with its errmsg)."""
    info = table().get(errcode)
    if info is None:
        return ErrcodeInfo(errcode, "dead", "unknown errcode", "not in wecomctl's table; the errmsg hint is kept for WeCom support")
    return info
