"""Per-lead results as CSV or JSONL, written atomically (temp file + rename)."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

COLUMNS = ["id", "campaign", "phone", "name", "owner", "external_userid", "add_status",
           "welcome_status", "errcode", "error", "attempts", "source", "row"]


def _stage_status(lead: dict, stage: str) -> str:
    st = lead.get(stage)
    if not st:
        return "pending"
    if st["state"] == "done":
        return lead.get(f"{stage}_status") or "done"
    if st["state"] == "skipped":
        return "already_sent"
    return st["state"]


def result_row(lead: dict[str, Any]) -> dict[str, Any]:
    add, welcome = lead.get("add") or {}, lead.get("welcome") or {}
    # The error shown is the latest stage's that has one.
    failing = welcome if welcome.get("error") else add
    add_status = _stage_status(lead, "add")
    if add_status == "done":
        add_status = "added"
    return {
        "id": lead["id"], "campaign": lead["campaign"], "phone": lead["phone"], "name": lead.get("name") or "",
        "owner": lead.get("owner") or "", "external_userid": lead.get("external_userid") or "",
        "add_status": add_status, "welcome_status": _stage_status(lead, "welcome"),
        "errcode": "" if failing.get("errcode") is None else failing["errcode"],
        "error": failing.get("error") or "",
        "attempts": (add.get("attempts") or 0) + (welcome.get("attempts") or 0),
        "source": lead.get("source") or "", "row": lead.get("row") or "",
    }


def write(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO) -> int:
    n = 0
    if fmt == "csv":
        w = csv.DictWriter(out, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r)
            n += 1
    else:
        for r in rows:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def export(rows: Iterable[dict[str, Any]], fmt: str, path: str | None) -> int:
    if path is None or path == "-":
        return write(rows, fmt, sys.stdout)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    enc = "utf-8-sig" if fmt == "csv" else "utf-8"  # Excel needs the BOM for Chinese
    with open(tmp, "w", newline="", encoding=enc) as fh:
        n = write(rows, fmt, fh)
    os.replace(tmp, target)
    return n


def dead_letters(leads: Iterable[dict[str, Any]], stage: str | None = None,
                 errcode: int | None = None) -> Iterable[dict[str, Any]]:
    """One row per (lead, stage) in the DLQ, with the errcode's meaning and what to do."""
    from wecomctl.wecom import errcodes

    for lead in leads:
        for st in ("add", "welcome"):
            s = lead.get(st)
            if not s or s["state"] != "dead" or (stage and st != stage):
                continue
            if errcode is not None and s.get("errcode") != errcode:
                continue
            info = errcodes.lookup(s["errcode"]) if s.get("errcode") is not None else None
            yield {
                "id": lead["id"], "campaign": lead["campaign"], "stage": st, "phone": lead["phone"],
                "name": lead.get("name"), "owner": lead.get("owner"), "errcode": s.get("errcode"),
                "kind": s.get("kind"), "error": s.get("error"), "attempts": s.get("attempts", 0),
                "meaning": info.meaning if info else None, "todo": info.note if info else None,
                "at": s.get("at"),
            }
