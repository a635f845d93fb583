"""Stream lead files into the store: validate, assign owners, dedupe, enqueue, report.

Never calls a remote API. Rows go to the store in batches, each batch one transaction, and
dedupe is by (campaign, E.164 phone) in the store, so importing the same file again, or
again after an interruption, enqueues nothing twice.
"""

from __future__ import annotations

import csv
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from wecomctl.errors import InputError
from wecomctl.faults import crash_point
from wecomctl.ingest.model import Blank, Lead, Reject
from wecomctl.ingest.readers import ReadOptions, open_lead_file
from wecomctl.pipeline.template import missing_fields, variables
from wecomctl.store.base import NewLead

# Leads per store transaction. Bigger batches dirty each page of the dedupe index once
# for many leads: at 1M rows, 10,000 per batch took the store's share from 58 s to 40 s.
BATCH = 10_000
PROGRESS_EVERY = 2000


@dataclass
class FileReport:
    path: str
    format: str
    encoding: str | None
    delimiter: str | None
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    blank: int = 0
    revived: int = 0
    nul_rows: int = 0  # rows NUL bytes were removed from


@dataclass
class ImportReport:
    campaign: str
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    blank: int = 0
    revived: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    files: list[FileReport] = field(default_factory=list)
    rejects_file: str | None = None
    duplicates_file: str | None = None
    dry_run: bool = False

    def as_json(self) -> dict:
        return {"accepted": self.accepted, "rejected": self.rejected, "skipped": self.skipped,
                "blank": self.blank, "revived": self.revived, "rejects_file": self.rejects_file,
                "duplicates_file": self.duplicates_file, "campaign": self.campaign,
                "dry_run": self.dry_run, "reasons": self.reasons,
                "files": [vars(f) for f in self.files]}


def _reason_class(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


class Importer:
    def __init__(self, store, campaign: str, owner: str | None = None, staff: list[str] | None = None,
                 options: ReadOptions | None = None, rejects_dir: str | None = None,
                 dry_run: bool = False, template: str | None = None, clock=time.time,
                 on_progress=None, data_dir: str | None = None):
        if not campaign or not campaign.strip():
            raise InputError("--campaign is required and must not be empty (for example --campaign spring-sale)")
        self.store = store
        # for crash markers (tests); the store may be a Redis URL
        self.data_dir = data_dir or (os.path.dirname(store.path) if store is not None else None)
        self.campaign = campaign.strip()
        self.owner = owner
        self.staff = [s for s in (staff or []) if s]
        self.options = options or ReadOptions()
        self.rejects_dir = rejects_dir
        self.dry_run = dry_run
        self.template = template
        self.clock = clock
        self.on_progress = on_progress  # (file, rows read so far), every PROGRESS_EVERY rows
        if owner and self.staff and owner not in self.staff:
            raise InputError(f"--owner {owner} is not in `staff:` of the config ({', '.join(self.staff)})")
        # Round-robin by the lead's position in this import, not by a running cycle, so a
        # re-run after an interruption assigns every lead the same owner as before.
        self._position = 0
        self._seen: dict[str, tuple[str, int]] = {}  # dry run: phone -> (file, row)

    def _check_file(self, lf) -> None:
        """Refuse a table file whose every row would be rejected for the same reason."""
        if lf.format not in ("csv", "xlsx"):
            return  # JSON records each have their own keys
        if lf.columns.get("owner") is None and not self.owner and not self.staff:
            raise InputError(f"{lf.path}: no owner column, no --owner and no `staff:` in the config; "
                             "every lead needs the staff userid that adds it: pass --owner USERID")
        if self.template:
            # the lead's own fields, every column, and remark/tags under their plain names
            roles = {role for role in ("remark", "tags") if lf.columns.get(role)}
            missing = missing_fields(self.template, set(lf.headers) | set(variables({})) | roles)
            if missing:
                raise InputError(f"{lf.path}: the welcome text uses {{{missing[0]}}} but the file has no such column "
                                 f"(columns: {', '.join(lf.headers)}); add the column or change welcome.text")

    def _owner_for(self, lead: Lead) -> tuple[str | None, str | None]:
        """(owner, reject reason)."""
        self._position += 1
        owner = lead.owner or self.owner
        if owner is None and self.staff:
            owner = self.staff[(self._position - 1) % len(self.staff)]
        if owner is None:
            return None, "no owner: the file has no owner column; pass --owner USERID or set `staff:` in the config"
        if self.staff and owner not in self.staff:
            return None, f"unknown owner: {owner} is not in `staff:` of the config (left the company? fix the owner column)"
        return owner, None

    def run(self, paths: list[str]) -> ImportReport:
        # Open every file first: a file refused as a whole stops the import before
        # anything is enqueued.
        files = [open_lead_file(p, self.options) for p in paths]
        for lf in files:
            self._check_file(lf)
        report = ImportReport(self.campaign, dry_run=self.dry_run)
        # Written as they happen, not kept: memory stays flat however many rows are bad.
        self._rejects = _ReportFile(self._report_path("rejects"), ["file", "row", "raw", "reason"])
        self._dupes = _ReportFile(self._report_path("duplicates"),
                                  ["file", "row", "raw", "phone", "matches_file", "matches_row"])
        try:
            self._import(files, report)
        finally:
            report.rejects_file = self._rejects.close()
            report.duplicates_file = self._dupes.close()
        return report

    def _reject(self, r: Reject, fr: FileReport, report: ImportReport) -> None:
        fr.rejected += 1
        key = _reason_class(r.reason)
        report.reasons[key] = report.reasons.get(key, 0) + 1
        self._rejects.write([r.source, r.row, r.raw, r.reason])

    def _duplicate(self, nl: NewLead, matched_file, matched_row) -> None:
        self._dupes.write([nl.source, nl.row, nl.raw, nl.phone, matched_file, matched_row])

    def _import(self, files, report: ImportReport) -> None:
        writer = _BatchWriter(self._flush, threaded=not self.dry_run)
        try:
            for lf in files:
                fr = FileReport(lf.path, lf.format, lf.encoding, lf.delimiter)
                report.files.append(fr)
                batch: list[NewLead] = []
                for n, row in enumerate(lf.rows(), 1):
                    if self.on_progress is not None and n % PROGRESS_EVERY == 0:
                        self.on_progress(lf.path, n)
                    if isinstance(row, Blank):
                        fr.blank += 1
                    elif isinstance(row, Reject):
                        self._reject(row, fr, report)
                    else:
                        owner, why = self._owner_for(row)
                        if why:
                            self._reject(Reject(row.source, row.row, row.raw, why), fr, report)
                            continue
                        batch.append(NewLead(row.phone, row.name, owner, dict(row.fields), row.source, row.row, row.raw))
                        if len(batch) >= BATCH:
                            writer.submit(batch, fr)
                            batch = []
                writer.submit(batch, fr)
                fr.nul_rows = getattr(lf, "nul_rows", 0)
        finally:
            writer.close()  # every batch handed over is written (or the first error raised)
        for fr in report.files:
            report.accepted += fr.accepted
            report.rejected += fr.rejected
            report.skipped += fr.skipped
            report.blank += fr.blank
            report.revived += fr.revived

    def _flush(self, batch: list[NewLead], fr: FileReport) -> None:
        if not batch:
            return
        if self.dry_run:
            for nl in batch:
                earlier = self.store.find_phone(self.campaign, nl.phone) if self.store else None
                if nl.phone in self._seen:
                    fr.skipped += 1
                    self._duplicate(nl, *self._seen[nl.phone])
                elif earlier is not None:
                    first = self.store.lead(earlier) or {}
                    fr.skipped += 1
                    self._duplicate(nl, first.get("source", ""), first.get("row", ""))
                else:
                    self._seen[nl.phone] = (nl.source, nl.row)
                    fr.accepted += 1
            return
        res = self.store.put_leads(self.campaign, batch, self.clock())
        crash_point("import.after_batch", self.data_dir)
        fr.accepted += res.accepted
        fr.revived += res.revived
        fr.skipped += len(res.duplicates)
        for nl, first_id in res.duplicates:
            first = self.store.lead(first_id) or {}
            self._duplicate(nl, first.get("source", ""), first.get("row", ""))

    def _report_path(self, kind: str) -> Path | None:
        if not self.rejects_dir:
            return None
        now = self.clock()
        # Milliseconds and the pid: two imports in one second never share a report file.
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now * 1000) % 1000:03d}-{os.getpid()}"
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.campaign)
        return Path(self.rejects_dir) / f"{kind}-{safe}-{stamp}.csv"


class _BatchWriter:
    """Writes batches in order on one thread while the caller reads and checks the next
    rows. SQLite does its part of a write (index inserts, the commit) without holding the
    GIL, so reading and writing overlap. Each batch is still one transaction, in file
    order, so an interrupted import re-run ends with the same queue."""

    def __init__(self, write, threaded: bool = True):
        self._write, self._threaded = write, threaded
        self._error: BaseException | None = None
        if threaded:
            self._queue: queue.Queue = queue.Queue(maxsize=2)
            self._thread = threading.Thread(target=self._run, name="import-writer", daemon=True)
            self._thread.start()

    def submit(self, batch, fr) -> None:
        if not self._threaded:
            self._write(batch, fr)
            return
        self._raise()
        self._queue.put((batch, fr))

    def close(self) -> None:
        if self._threaded:
            self._queue.put(None)
            self._thread.join()
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    self._write(*job)
                except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
                    self._error = exc


class _ReportFile:
    """A report CSV written row by row to a temporary name and renamed when complete;
    no file at all when there was nothing to report."""

    def __init__(self, path: Path | None, header: list[str]):
        self.path, self.header = path, header
        self._fh = self._writer = None

    def write(self, row: list) -> None:
        if self.path is None:
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # utf-8-sig so Excel opens Chinese reasons correctly.
            self._fh = open(self.path.with_suffix(".csv.tmp"), "w", newline="", encoding="utf-8-sig")
            self._writer = csv.writer(self._fh)
            self._writer.writerow(self.header)
        self._writer.writerow(row)

    def close(self) -> str | None:
        if self._fh is None:
            return None
        self._fh.close()
        self._fh = None
        os.replace(self.path.with_suffix(".csv.tmp"), self.path)
        return str(self.path)
