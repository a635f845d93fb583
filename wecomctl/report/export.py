"""Per-lead results as CSV or JSONL, written atomically (temp file + rename)."""

from __future__ import annotations

import csv
import json
import sys
from typing import Any, Iterable, TextIO

from wecomctl.errors import UsageError
from wecomctl.report.files import atomic_text
from wecomctl.store.base import STAGES

COLUMNS = ["id", "campaign", "phone", "name", "owner", "external_userid", "status", "add_status",
           "welcome_status", "errcode", "error", "attempts", "source", "row", "writeback_status"]
DLQ_COLUMNS = ["id", "campaign", "stage", "phone", "name", "owner", "errcode", "kind", "error", "meaning", "todo",
               "attempts", "at", "source", "row"]
# The lead's overall status (export --status filters on it).
STATUSES = ("welcomed", "already_welcomed", "dead", "in_progress")


def overall(lead: dict) -> str:
    add, welcome = lead.get("add") or {}, lead.get("welcome") or {}
    if welcome.get("state") == "done":
        return "welcomed"
    if welcome.get("state") == "skipped":
        return "already_welcomed"
    if "dead" in (add.get("state"), welcome.get("state")):
        return "dead"
    return "in_progress"


def mask(phone: str) -> str:
    """+8613800138000 -> +86138****8000: enough to recognise, not enough to call."""
    return phone[:-8] + "****" + phone[-4:] if len(phone) >= 11 else "****"


def _stage_status(lead: dict, stage: str) -> str:
    st = lead.get(stage)
    if not st:
        add = lead.get("add") or {}
        # A welcome never starts for a lead whose add is dead.
        return "not_sent" if stage == "welcome" and add.get("state") == "dead" else "pending"
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
        "status": overall(lead), "add_status": add_status, "welcome_status": _stage_status(lead, "welcome"),
        "errcode": failing.get("errcode"), "error": failing.get("error") or "",
        # calls made for this lead, both stages, successful ones included
        "attempts": (add.get("calls") or 0) + (welcome.get("calls") or 0),
        "source": lead.get("source") or "", "row": lead.get("row") or "",
        "writeback_status": (lead.get("writeback") or {}).get("state") or "",
    }


def write(rows: Iterable[dict[str, Any]], fmt: str, out: TextIO, columns: list[str] = COLUMNS) -> int:
    n = 0
    if fmt == "csv":
        w = csv.DictWriter(out, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)  # None is written as an empty cell
            n += 1
    else:
        for r in rows:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def export(rows: Iterable[dict[str, Any]], fmt: str, path: str | None, columns: list[str] = COLUMNS) -> int:
    if path is None or path == "-":
        return write(rows, fmt, sys.stdout, columns)
    enc = "utf-8-sig" if fmt == "csv" else "utf-8"  # Excel needs the BOM for Chinese
    try:
        with atomic_text(path, enc) as fh:
            n = write(rows, fmt, fh, columns)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc} (does the folder exist and is it writable?)") from None
    return n


class _Kind:
    def __init__(self, meaning: str, note: str):
        self.meaning, self.note = meaning, note


# Dead letters that have no errcode: what they mean and what to do.
KINDS = {
    "invalid": _Kind("the welcome cannot be built for this lead (no call was made)",
                     "fixed the welcome text in the config: retry-dlq --kind invalid, then run; "
                     "fixed the lead's columns: re-import the fixed rows (dlq export gives a to-fix file), then run"),
    "poison": _Kind("a worker died every time it took this item",
                    "look for a crash in the logs, then retry-dlq and run"),
    "network": _Kind("WeCom or the gateway could not be reached",
                     "check the network and base_url, then retry-dlq and run"),
    "dead": _Kind("WeCom refused the customer", "see the error"),
    "http": _Kind("the business system refused the write-back (an HTTP 4xx)",
                  "fix the receiver or writeback.url, then `wecomctl retry-dlq --stage writeback`"),
    "config": _Kind("a stage is not configured any more", "see the error, fix the config, then retry-dlq"),
    "ambiguous": _Kind("the call may or may not have happened",
                       "check in WeCom whether the customer got it; `wecomctl retry-dlq --kind ambiguous` sends again"),
}


# What --kind accepts: the errcode classes an item can die with, and the kinds above.
DEAD_KINDS = ("ambiguous", "config", "dead", "http", "invalid", "network", "poison", "retry", "throttle",
              "token", "window")


def describe(code: str) -> str:
    """The meaning of a DLQ code as counted by the store: an errcode, or a kind."""
    from wecomctl.wecom import errcodes

    try:
        info = errcodes.lookup(int(code))
    except ValueError:
        info = KINDS.get(code)
    return info.meaning if info else "unknown"


def dead_letters(leads: Iterable[dict[str, Any]], stage: str | None = None,
                 errcode: int | None = None) -> Iterable[dict[str, Any]]:
    """One row per (lead, stage) in the DLQ, with the errcode's meaning and what to do."""
    from wecomctl.wecom import errcodes

    for lead in leads:
        for st in STAGES:
            s = lead.get(st)
            if not s or s["state"] != "dead" or (stage and st != stage):
                continue
            if errcode is not None and s.get("errcode") != errcode:
                continue
            info = errcodes.lookup(s["errcode"]) if s.get("errcode") is not None else KINDS.get(s.get("kind"))
            yield {
                "id": lead["id"], "campaign": lead["campaign"], "stage": st, "phone": lead["phone"],
                "name": lead.get("name"), "owner": lead.get("owner"), "errcode": s.get("errcode"),
                "kind": s.get("kind"), "error": s.get("error"),
                "attempts": s.get("calls", s.get("attempts", 0)),  # calls made, as in export
                "meaning": info.meaning if info else None, "todo": info.note if info else None,
                "at": s.get("at"), "source": lead.get("source"), "row": lead.get("row"),
                "fields": lead.get("fields") or {},
            }


def _own_columns(fields: dict[str, Any]) -> dict[str, Any]:
    """A lead's columns as the file had them: without the plain `remark` / `tags` the
    import adds beside a 备注 / 标签 column (for {remark} in the welcome), which the import
    of the to-fix file would see as a second remark column."""
    from wecomctl.ingest.headers import role_of

    out = dict(fields)
    for role in ("remark", "tags"):
        if role in out and any(k != role and role_of(k) == role for k in out):
            del out[role]
    return out


def to_fix(letters: Iterable[dict[str, Any]], mask_phones: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """The dead letters as a file a person fixes and imports again: each lead's own columns
    as it was imported (so the fixed file has every column the welcome text uses), then
    what died and why in dlq_ columns, which the import leaves out. An unchanged row
    imported again is the same row and stays dead; a fixed one is queued again."""
    import time

    from wecomctl.ingest.headers import DLQ_PREFIX
    from wecomctl.logs import mask_phone

    own: dict[str, None] = {}  # the leads' columns, in the order first seen
    rows = []
    for r in letters:
        fields = _own_columns(r.pop("fields"))
        if mask_phones:
            r["phone"] = mask(r["phone"])
            r["error"] = mask_phone(r["error"] or "")  # a receiver may echo the number
            fields = {k: mask_phone(v) if isinstance(v, str) else v for k, v in fields.items()}
        if r.get("at"):
            r["at"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        own.update(dict.fromkeys(fields))
        rows.append({**fields, **{DLQ_PREFIX + k: r.get(k) for k in DLQ_COLUMNS}})
    return [*own, *(DLQ_PREFIX + k for k in DLQ_COLUMNS)], rows
