"""Stream lead files into the store: validate, assign owners, dedupe, enqueue, report.

Never calls a remote API. Rows go to the store in batches, each batch one transaction, and
dedupe is by (campaign, E.164 phone) in the store, so importing the same file again, or
again after an interruption, enqueues nothing twice.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wecomctl.errors import InputError, UsageError, WecomctlError
from wecomctl.faults import crash_point
from wecomctl.ingest.model import Blank, Lead, Reject
from wecomctl.ingest.readers import ReadOptions, open_lead_file
from wecomctl.pipeline.template import missing_fields, variables
from wecomctl.store.base import NewLead, revivable_stage

# Leads per store transaction. Bigger batches dirty each page of the dedupe index once
# for many leads: at 1M rows, 10,000 per batch took the store's share from 58 s to 40 s.
BATCH = 10_000
# ...or fewer when rows are wide (a 15 KB remark each): a batch is held, pickled and sent
# whole, so memory is bounded by this rather than by 10,000 rows of any width.
BATCH_CHARS = 8 << 20
PROGRESS_EVERY = 2000
# Files this big (in all) are read in a child process (see Reading); below it, starting
# one costs more than it saves.
CHILD_READER_BYTES = 1 << 20


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
    title_rows: int = 0  # rows of a report title above the header, skipped


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
                 on_progress=None, data_dir: str | None = None, reader_process: bool | None = None):
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
        # None: read in a child process when the files are big enough to gain from it
        self.reader_process = reader_process
        if owner and self.staff:
            self.owner = _staff_spelling(self.staff).get(owner.lower())
            if self.owner is None:
                raise InputError(f"--owner {owner} is not in `staff:` of the config ({', '.join(self.staff)})")
        self._seen: dict[str, tuple[str, int]] = {}  # dry run: phone -> (file, row)
        # Names this import to the store: within it only the first row for a phone may
        # revive that phone's dead letter (a file holding a phone twice must not flip the
        # lead between its two rows on every import).
        self._import_id = uuid.uuid4().hex

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

    def run(self, paths: list[str]) -> ImportReport:
        # Open every file first: a file refused as a whole stops the import before
        # anything is enqueued.
        files = [open_lead_file(p, self.options) for p in paths]
        for lf in files:
            self._check_file(lf)
        report = ImportReport(self.campaign, dry_run=self.dry_run)
        report.files = [FileReport(lf.path, lf.format, lf.encoding, lf.delimiter, title_rows=lf.title_rows)
                        for lf in files]
        # Written as they happen, not kept: memory stays flat however many rows are bad.
        self._dupes = _ReportFile(self._report_path("duplicates"),
                                  ["file", "row", "raw", "phone", "matches_file", "matches_row"])
        reading = Reading(files, self.owner, self.staff, self._report_path("rejects"), BATCH)
        in_child = self.reader_process
        if in_child is None:
            in_child = not self.dry_run and sum(_size(p) for p in paths) >= CHILD_READER_BYTES
        try:
            for event in (reading.in_child() if in_child else reading.events()):
                kind = event[0]
                if kind == "leads":
                    self._flush([NewLead(*t) for t in event[2]], report.files[event[1]])
                elif kind == "progress":
                    if self.on_progress is not None:
                        self.on_progress(event[1], event[2])
                else:  # "end": what only the reading half knows
                    _, per_file, reasons, report.rejects_file = event
                    for fr, (rejected, blank, nul_rows) in zip(report.files, per_file):
                        fr.rejected, fr.blank, fr.nul_rows = rejected, blank, nul_rows
                    report.reasons = reasons
        except BaseException as exc:
            self._dupes.close(quietly=True)  # what it found so far; the first error is the one to see
            # What came before the error is stored, as after an interruption: say so, and how to finish.
            stored = sum(fr.accepted + fr.revived for fr in report.files)
            if isinstance(exc, ReaderStopped):
                raise InputError("the process reading the lead files stopped unexpectedly (killed, or out of "
                                 f"memory?); the {stored:,} leads read before are queued: run the same import "
                                 "again to finish (what is queued is skipped as a duplicate)") from None
            if isinstance(exc, InputError) and stored and not self.dry_run:  # a file broken part-way
                raise InputError(f"{exc}; the {stored:,} leads read before it are queued: fix the file and run "
                                 "the same import again (what is queued is skipped as a duplicate)") from None
            raise
        report.duplicates_file = self._dupes.close()
        for fr in report.files:
            report.accepted += fr.accepted
            report.rejected += fr.rejected
            report.skipped += fr.skipped
            report.blank += fr.blank
            report.revived += fr.revived
        return report

    def _duplicate(self, nl: NewLead, matched_file, matched_row) -> None:
        self._dupes.write([nl.source, nl.row, nl.raw, nl.phone, matched_file, matched_row])

    def _flush(self, batch: list[NewLead], fr: FileReport) -> None:
        if self.dry_run:
            for nl in batch:
                earlier = self.store.find_phone(self.campaign, nl.phone) if self.store else None
                if nl.phone in self._seen:
                    fr.skipped += 1
                    self._duplicate(nl, *self._seen[nl.phone])
                elif earlier is not None:
                    first = self.store.lead(earlier) or {}
                    # Later rows for this phone are duplicates of this one, as in the import.
                    self._seen[nl.phone] = (first.get("source", ""), first.get("row", ""))
                    if revivable_stage(first, nl):
                        self._seen[nl.phone] = (nl.source, nl.row)
                        fr.revived += 1  # a fixed row over its dead letter: it would be queued again
                        continue
                    fr.skipped += 1
                    self._duplicate(nl, first.get("source", ""), first.get("row", ""))
                else:
                    self._seen[nl.phone] = (nl.source, nl.row)
                    fr.accepted += 1
            return
        res = self.store.put_leads(self.campaign, batch, self.clock(), self._import_id)
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


def _staff_spelling(staff: list[str]) -> dict[str, str]:
    """Each staff userid by its lower case: WeCom ignores case in userids (ZhangSan and
    zhangsan are one member), so an owner column's spelling is matched without it and
    the config's spelling is what is stored and sent."""
    return {s.lower(): s for s in staff}


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class Reading:
    """The reading half of an import: every row read and checked, owners assigned,
    rejects written, accepted leads handed on in batches of BATCH.

    It runs in the importing process, or for big imports in a child process: reading
    and checking a row costs about as much as storing it, so on two cores the child
    reads the next batch while the parent commits the last. Batches still reach the
    store one transaction each, in file order, so an interrupted import run again ends
    with the same queue either way.

    events() yields ("leads", file_index, [NewLead fields as tuples]),
    ("progress", path, rows read) and, last, ("end", [(rejected, blank, nul_rows) per
    file], rejected by reason, rejects file or None).
    """

    def __init__(self, files: list, owner: str | None, staff: list[str], rejects_path: Path | None,
                 batch: int = BATCH):
        self.files, self.owner, self.staff, self.rejects_path = files, owner, staff, rejects_path
        self._spelling = _staff_spelling(staff)
        self.batch = batch  # carried to a child process, which imports this module afresh

    def events(self) -> Iterator[tuple]:
        rejects = _ReportFile(self.rejects_path, ["file", "row", "raw", "reason"])
        reasons: dict[str, int] = {}
        per_file = []
        # Round-robin by the lead's position in this import, not by a running cycle, so a
        # re-run after an interruption assigns every lead the same owner as before.
        position = 0
        try:
            for index, lf in enumerate(self.files):
                rejected = blank = 0
                batch: list[tuple] = []
                chars = 0
                for n, row in enumerate(_translated(lf), 1):
                    if n % PROGRESS_EVERY == 0:
                        yield ("progress", lf.path, n)
                    if type(row) is Lead:
                        position += 1
                        owner, why = self._owner_for(row, position)
                        if why is None:
                            batch.append((row.phone, row.name, owner, row.fields, row.source, row.row, row.raw))
                            chars += row.size
                            if len(batch) >= self.batch or chars >= BATCH_CHARS:
                                yield ("leads", index, batch)
                                batch, chars = [], 0
                            continue
                        row = Reject(row.source, row.row, row.raw, why)
                    if type(row) is Blank:
                        blank += 1
                    else:
                        rejected += 1
                        key = _reason_class(row.reason)
                        reasons[key] = reasons.get(key, 0) + 1
                        rejects.write([row.source, row.row, row.raw, row.reason])
                if batch:
                    yield ("leads", index, batch)
                per_file.append((rejected, blank, lf.nul_rows))
        except BaseException:
            rejects.close(quietly=True)  # an interrupted import keeps what it found so far
            raise
        yield ("end", per_file, reasons, rejects.close())

    def _owner_for(self, lead: Lead, position: int) -> tuple[str | None, str | None]:
        """(owner, reject reason)."""
        owner = lead.owner or self.owner
        if owner is None and self.staff:
            owner = self.staff[(position - 1) % len(self.staff)]
        if owner is None:
            return None, "no owner: the file has no owner column; pass --owner USERID or set `staff:` in the config"
        if self.staff:
            known = self._spelling.get(owner.lower())
            if known is None:
                return None, (f"unknown owner: {owner} is not in `staff:` of the config "
                              "(left the company? fix the owner column)")
            owner = known
        return owner, None

    def in_child(self) -> Iterator[tuple]:
        """events(), produced by a child process and received over a pipe."""
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_reader_main, args=(self, send), name="wecomctl-import-reader", daemon=True)
        # The child starts as `python -c ...`, which would put the current directory first
        # on its path: a signal.py or pickle.py there would be imported instead of the
        # standard library's. PYTHONSAFEPATH (3.11+) leaves it out.
        saved = os.environ.get("PYTHONSAFEPATH")
        os.environ["PYTHONSAFEPATH"] = "1"
        try:
            proc.start()
        finally:
            if saved is None:
                del os.environ["PYTHONSAFEPATH"]
            else:
                os.environ["PYTHONSAFEPATH"] = saved
        send.close()  # the child holds the only writing end: its exit ends the pipe
        try:
            while True:
                try:
                    event = receive.recv()
                except (EOFError, OSError):  # OSError: it died part-way through sending a batch
                    raise ReaderStopped() from None
                if event[0] == "error":
                    raise event[1]
                yield event
                if event[0] == "end":
                    return
        finally:
            receive.close()  # a child still sending gets EPIPE and exits
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()


class ReaderStopped(InputError):
    """The child process reading the files died (killed, out of memory)."""


def _translated(lf) -> Iterator:
    """lf.rows(), with what can go wrong reading a file said as the file's problem."""
    try:
        yield from lf.rows()
    except OSError as exc:
        raise InputError(f"{lf.path}: cannot read the file any more: {exc.strerror or exc} "
                         "(deleted, moved or unmounted during the import?)") from None
    except RecursionError:
        raise InputError(f"{lf.path}: a record is nested too deeply to be a lead") from None


def _reader_main(reading: Reading, send) -> None:
    # Ctrl-C is the parent's to handle: it stops reading by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for event in reading.events():
            send.send(event)
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent stopped (an error, Ctrl-C, killed): nothing more to hand over
    except WecomctlError as exc:
        _send_quietly(send, ("error", exc))
    except BaseException as exc:  # noqa: BLE001 - a bug: the parent shows it
        trace = "".join(traceback.format_exception(exc))
        _send_quietly(send, ("error", WecomctlError(f"reading the lead files failed unexpectedly:\n{trace}")))
    finally:
        send.close()


def _send_quietly(send, event) -> None:
    try:
        send.send(event)
    except OSError:
        pass


class _ReportFile:
    """A report CSV written row by row to a temporary name and renamed when complete;
    no file at all when there was nothing to report."""

    def __init__(self, path: Path | None, header: list[str]):
        self.path, self.header = path, header
        self._fh = self._writer = None

    def write(self, row: list) -> None:
        if self.path is None:
            return
        try:
            if self._fh is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # utf-8-sig so Excel opens Chinese reasons correctly.
                self._fh = open(self.path.with_suffix(".csv.tmp"), "w", newline="", encoding="utf-8-sig")
                self._writer = csv.writer(self._fh)
                self._writer.writerow(self.header)
            self._writer.writerow(row)
        except OSError as exc:
            raise UsageError(self._cannot(exc)) from None

    def close(self, quietly: bool = False) -> str | None:
        """Finish the report: its name, or None when there was nothing to report. With
        quietly (another error is on its way), a failure to finish it is not raised."""
        if self._fh is None:
            return None
        fh, self._fh = self._fh, None
        try:
            fh.close()
            os.replace(self.path.with_suffix(".csv.tmp"), self.path)
        except OSError as exc:
            if quietly:
                return None
            raise UsageError(self._cannot(exc)) from None
        return str(self.path)

    def _cannot(self, exc: OSError) -> str:
        return (f"cannot write the report {self.path}: {exc.strerror or exc} (a full disk? free some space "
                "and run the same import again)")
