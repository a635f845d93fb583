"""Stream lead files into the store: validate, assign owners, dedupe, enqueue, report.

Never calls a remote API. Rows go to the store in batches, each batch one transaction, and
dedupe is by (campaign, E.164 phone) in the store, so importing the same file again, or
again after an interruption, enqueues nothing twice.
"""

from __future__ import annotations

import csv
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from wecomctl.errors import InputError
from wecomctl.ingest.model import Blank, Lead, Reject
from wecomctl.ingest.readers import ReadOptions, open_lead_file
from wecomctl.store.base import NewLead

BATCH = 1000


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


@dataclass
class ImportReport:
    campaign: str
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    blank: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    files: list[FileReport] = field(default_factory=list)
    rejects_file: str | None = None
    dry_run: bool = False

    def as_json(self) -> dict:
        return {"accepted": self.accepted, "rejected": self.rejected, "skipped": self.skipped,
                "blank": self.blank, "rejects_file": self.rejects_file, "campaign": self.campaign,
                "dry_run": self.dry_run, "reasons": self.reasons,
                "files": [vars(f) for f in self.files]}


def _reason_class(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


class Importer:
    def __init__(self, store, campaign: str, owner: str | None = None, staff: list[str] | None = None,
                 options: ReadOptions | None = None, rejects_dir: str | None = None,
                 dry_run: bool = False, clock=time.time):
        if not campaign or not campaign.strip():
            raise InputError("--campaign is required and must not be empty (for example --campaign spring-sale)")
        self.store = store
        self.campaign = campaign.strip()
        self.owner = owner
        self.staff = [s for s in (staff or []) if s]
        self.options = options or ReadOptions()
        self.rejects_dir = rejects_dir
        self.dry_run = dry_run
        self.clock = clock
        self._robin = itertools.cycle(self.staff) if self.staff else None
        self._seen: dict[str, tuple[str, int]] = {}  # dry run: phone -> (file, row)

    def _owner_for(self, lead: Lead) -> str | None:
        if lead.owner:
            return lead.owner
        if self.owner:
            return self.owner
        return next(self._robin) if self._robin else None

    def run(self, paths: list[str]) -> ImportReport:
        # Open every file first: a file refused as a whole stops the import before
        # anything is enqueued.
        files = [open_lead_file(p, self.options) for p in paths]
        report = ImportReport(self.campaign, dry_run=self.dry_run)
        rejects: list[Reject] = []
        for lf in files:
            fr = FileReport(lf.path, lf.format, lf.encoding, lf.delimiter)
            report.files.append(fr)
            batch: list[NewLead] = []
            for row in lf.rows():
                if isinstance(row, Blank):
                    fr.blank += 1
                elif isinstance(row, Reject):
                    rejects.append(row)
                    fr.rejected += 1
                else:
                    owner = self._owner_for(row)
                    if owner is None:
                        rejects.append(Reject(row.source, row.row, row.raw,
                                              "no owner: the file has no owner column; pass --owner USERID or set `staff:` in the config"))
                        fr.rejected += 1
                        continue
                    batch.append(NewLead(row.phone, row.name, owner, dict(row.fields), row.source, row.row))
                    if len(batch) >= BATCH:
                        self._flush(batch, fr, rejects)
                        batch = []
            self._flush(batch, fr, rejects)
            report.accepted += fr.accepted
            report.rejected += fr.rejected
            report.skipped += fr.skipped
            report.blank += fr.blank
        for r in rejects:
            key = _reason_class(r.reason)
            report.reasons[key] = report.reasons.get(key, 0) + 1
        report.rejects_file = self._write_rejects(rejects)
        return report

    def _flush(self, batch: list[NewLead], fr: FileReport, rejects: list[Reject]) -> None:
        if not batch:
            return
        if self.dry_run:
            for nl in batch:
                if nl.phone in self._seen:
                    fr.skipped += 1
                else:
                    self._seen[nl.phone] = (nl.source, nl.row)
                    fr.accepted += 1
            return
        res = self.store.put_leads(self.campaign, batch, self.clock())
        fr.accepted += res.accepted
        fr.skipped += len(res.duplicates)

    def _write_rejects(self, rejects: list[Reject]) -> str | None:
        if not rejects or not self.rejects_dir:
            return None
        Path(self.rejects_dir).mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.clock()))
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.campaign)
        path = Path(self.rejects_dir) / f"rejects-{safe}-{stamp}.csv"
        tmp = path.with_suffix(".csv.tmp")
        # utf-8-sig so Excel opens Chinese reasons correctly.
        with open(tmp, "w", newline="", encoding="utf-8-sig") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "row", "raw", "reason"])
            for r in rejects:
                w.writerow([r.source, r.row, r.raw, r.reason])
        os.replace(tmp, path)
        return str(path)
