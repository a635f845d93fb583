"""Open a lead file, sniff what it is, and stream its rows as Lead / Reject / Blank.

open_lead_file() reads only the first bytes (and the header) and refuses a file as a
whole with InputError: wrong format, undecodable, no phone column, ambiguous columns.
LeadFile.rows() re-opens the file and streams it, so many files can be opened (checked)
before the first is imported, and a file of a million rows is never held in memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from wecomctl.errors import InputError
from wecomctl.ingest import csvfile, jsonfile, xlsxfile
from wecomctl.ingest.encoding import SAMPLE, Encoding, LineDecoder, decode_sample, detect, from_override, text_chunks
from wecomctl.ingest.headers import DLQ_PREFIX, ColumnError, MissingPhone, resolve_columns, role_of, unique_headers
from wecomctl.ingest.model import Blank, Lead, Reject
from wecomctl.ingest.phones import PhoneRejected, normalise_mobile
from wecomctl.ingest.text import clean_cell, header_key

_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # .xls, WPS .et, and password-protected .xlsx
_HEADER_SEARCH = 100  # blank rows tolerated above the header
_TITLE_ROWS = 5  # rows of a title above the header ("2024年客户名单", "导出时间: ...")


@dataclass
class ReadOptions:
    encoding: str | None = None  # override
    delimiter: str | None = None  # override
    phone_column: str | None = None
    name_column: str | None = None
    owner_column: str | None = None
    default_region: str = "CN"


class LeadFile:
    """An opened and sniffed lead file. Raises InputError when refused as a whole."""

    def __init__(self, path: str, options: ReadOptions):
        self.path = path
        self.options = options
        self.format = "csv"  # "csv" | "jsonl" | "json" | "xlsx"
        self.encoding: str | None = None
        self.delimiter: str | None = None
        self.columns: dict[str, str | None] = {}
        self.headers: list[str] = []  # cleaned header of every column
        self.sheet: str | None = None  # XLSX: the sheet read
        self.headerless = False  # a plain list of numbers: no header row
        self.nul_rows = 0  # rows NUL bytes were removed from (counted while reading)
        self.title_rows = 0  # non-blank rows above the header (a report title), skipped
        self._header_at = -1  # index of the header among the table's rows
        self._dlq_columns: list[str] = []  # a to-fix file from `dlq export`: its dlq_ columns
        self._enc: Encoding | None = None
        self._sniff()

    # --- sniffing ------------------------------------------------------------------------
    def _sniff(self) -> None:
        try:
            with open(self.path, "rb") as f:
                head = f.read(SAMPLE)
                if not head:
                    raise InputError(f"{self.path}: the file is empty; export the leads again")
                if head.startswith(b"PK\x03\x04"):
                    self.format = "xlsx"
                elif head.startswith(_OLE):
                    raise InputError(f"{self.path}: an old .xls/.et workbook or a password-protected file; "
                                     "open it and save it as .xlsx (no password) or CSV UTF-8")
                elif self.options.encoding:
                    self._enc = from_override(self.path, self.options.encoding, head)
                else:
                    f.seek(0)
                    self._enc = detect(self.path, f)
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read the file: {exc.strerror or exc}") from None
        if self.format == "xlsx":
            return self._sniff_xlsx()
        self.encoding = self._enc.name
        complete = len(head) < SAMPLE
        text = decode_sample(head, self._enc, complete)
        start = text.lstrip(" \t\r\n\ufeff\x00")[:1]
        # From the content, not the extension: CRMs export JSON as .txt and CSV as .xls.
        if start == "[":
            self.format = "json"
            return self._sniff_json()
        if start == "{" or (self.path.lower().endswith((".jsonl", ".ndjson")) and _json_line(text)):
            # A .jsonl file whose first record is not an object is still JSON Lines (each
            # such record is rejected), not a one-column CSV.
            self.format = "jsonl"
            return self._sniff_json()
        self._sniff_csv(text, complete)

    def _sniff_csv(self, text: str, complete: bool) -> None:
        first_line = text.lstrip("\ufeff").split("\n", 1)[0].rstrip("\r")
        if self.options.delimiter:
            self.delimiter = csvfile.delimiter_override(self.path, self.options.delimiter)
        else:
            self.delimiter = csvfile.sep_line(first_line) or csvfile.sniff_delimiter(
                csvfile.sample_lines(text, complete))
        self._set_header(self._header_row(self._table_rows()))

    def _sniff_xlsx(self) -> None:
        heads = []
        with xlsxfile.workbook(self.path) as wb:
            for ws in xlsxfile.worksheets(wb):
                ws.reset_dimensions()
                cells = (list(map(xlsxfile.cell_text, r)) for r in ws.iter_rows(values_only=True))
                header = self._header_row(cells)
                heads.append((ws.title, header, (self._header_at, self.title_rows)))
        # Read the sheet with a phone column; an instructions sheet next to it is fine, but
        # two sheets of leads would leave one unimported without anyone noticing.
        with_phone = [x for x in heads if x[1] is not None and self._has_phone(x[1])]
        if len(with_phone) > 1:
            names = ", ".join(repr(x[0]) for x in with_phone)
            raise InputError(f"{self.path}: sheets {names} each have a phone column; save each sheet "
                             "as its own file and import them together")
        non_empty = [x for x in heads if x[1] is not None]
        self.sheet, header, (self._header_at, self.title_rows) = (
            with_phone or non_empty or [(heads[0][0] if heads else None, None, (-1, 0))])[0]
        self._set_header(header, f" (sheet {self.sheet!r})" if len(heads) > 1 else "")

    def _has_phone(self, header: list[str]) -> bool:
        # Only "is there a phone column": ambiguities are reported for the chosen sheet.
        wanted = header_key(self.options.phone_column) if self.options.phone_column else None
        return any(header_key(h) == wanted if wanted else role_of(h) == "phone"
                   for h in unique_headers(header))

    def _sniff_json(self) -> None:
        records = self._records()
        try:
            first = next(records, None)
        finally:
            records.close()
        if first is None:
            raise InputError(f"{self.path}: no records in the file; export the leads again")
        if isinstance(first, jsonfile.BadRecord):
            hint = ""
            if self.format == "jsonl" and first.error and first.text.strip() == "{":
                hint = ("; it looks like one JSON object over several lines: if the leads are a list inside it "
                        "(\"data\": [...]), save that array alone")
            raise InputError(f"{self.path}: record 1 is not valid JSON ({first.error}); JSON Lines "
                             "needs one {...} record per line" + hint)
        if not isinstance(first, dict):
            raise InputError(f"{self.path}: record 1 is not a JSON object; each record must be "
                             '{"手机号": "...", "姓名": "..."}')
        wrapped = [k for k, v in first.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        if wrapped and not any(role_of(k) == "phone" for k in first):
            # An API's answer saved as is: {"code": 0, "data": [{...}, ...]}.
            raise InputError(f"{self.path}: the leads are inside the {wrapped[0]!r} field of one JSON object; "
                             "save that array alone (a JSON array of records, or one record per line)")
        self._set_header(list(first.keys()), headerless_ok=False)

    def _header_row(self, rows: Iterator[list[str]]) -> list[str] | None:
        """The header: the first non-blank row (Excel keeps blank rows above a table), or,
        when that has no phone column, the first of the next few rows that has one: a
        report's title rows above the table ("2024年客户名单"). Title rows holding a
        mobile number are never skipped: that is data, not a title."""
        self._header_at, self.title_rows = -1, 0
        candidates: list[tuple[int, list[str]]] = []  # non-blank rows, the last one maybe the header
        found = False
        try:
            for i, cells in enumerate(rows):
                if i >= _HEADER_SEARCH:
                    break
                if csvfile.is_blank(cells):
                    continue
                candidates.append((i, cells))
                found = self._has_phone(cells)
                if found or len(candidates) > _TITLE_ROWS:
                    break
        finally:
            getattr(rows, "close", lambda: None)()
        if not candidates:
            return None
        titles = candidates[:-1]
        region = self.options.default_region
        if not found or any(_is_mobile(c, region) for _, t in titles for c in t):
            titles = []  # no table under a title: the first row, as always
        self._header_at, cells = candidates[len(titles)]
        self.title_rows = len(titles)
        return cells

    def _set_header(self, cells: list[str] | None, where: str = "", headerless_ok: bool = True) -> None:
        if cells is None:
            raise InputError(f"{self.path}{where}: no header row (the file has no data); export the leads again")
        o = self.options
        headers = unique_headers(cells)
        try:
            self.columns = resolve_columns(headers, o.phone_column, o.name_column, o.owner_column)
        except MissingPhone as exc:
            phone_cells = [i for i, c in enumerate(cells) if _is_mobile(c, o.default_region)]
            if not (headerless_ok and not o.phone_column and len(phone_cells) == 1):
                raise InputError(f"{self.path}{where}: {exc}{self._override_hint()}") from None
            # No header, just data: the first row holds a valid mobile. Take that column.
            self.headerless = True
            headers = [f"_col_{i}" for i in range(1, len(cells) + 1)]
            self.columns = {"phone": headers[phone_cells[0]], "name": None, "owner": None}
        except ColumnError as exc:
            raise InputError(f"{self.path}{where}: {exc}") from None
        self.headers = headers
        self._dlq_columns = [h for h in headers if h.startswith(DLQ_PREFIX)]

    def _override_hint(self) -> str:
        o = self.options
        if o.delimiter or o.encoding:
            return (f" The file was read with {'delimiter ' + repr(self.delimiter) if o.delimiter else ''}"
                    f"{' and ' if o.delimiter and o.encoding else ''}"
                    f"{'encoding ' + str(self.encoding) if o.encoding else ''} as asked: "
                    "check --delimiter/--encoding, or leave them out to detect them.")
        return ""

    # --- reading -------------------------------------------------------------------------
    def _table_rows(self) -> Iterator[list[str]]:
        if self.format == "xlsx":
            yield from xlsxfile.sheet_rows(self.path, self.sheet)
            return
        with open(self.path, "rb") as f:
            yield from csvfile.rows(self.path, LineDecoder(self._enc, self.path).lines(f), self.delimiter)

    def _records(self) -> Iterator[object]:
        with open(self.path, "rb") as f:
            if self.format == "jsonl":
                yield from jsonfile.jsonl_records(LineDecoder(self._enc, self.path).lines(f))
            else:
                yield from jsonfile.array_records(self.path, text_chunks(f, self._enc))

    def rows(self) -> Iterator[Lead | Reject | Blank]:
        """Every data row in file order; row numbers count from 1 after the header."""
        if self.format in ("json", "jsonl"):
            yield from self._json_rows()
        else:
            yield from self._table_leads()

    def _table_leads(self) -> Iterator[Lead | Reject | Blank]:
        rows = self._table_rows()
        headers, width = self.headers, len(self.headers)
        try:
            header_seen = self.headerless
            n = 0
            for index, cells in enumerate(rows):
                if not header_seen:
                    header_seen = index >= self._header_at  # blank and title rows above the header
                    continue
                n += 1
                if getattr(cells, "last_line", 0) > getattr(cells, "first_line", 0):
                    runaway = _runaway(cells)  # a record over several lines: a runaway quote?
                    if runaway:
                        yield Reject(self.path, n, runaway[0], runaway[1])
                        continue
                if getattr(cells, "had_nul", False):
                    self.nul_rows += 1
                record = dict(zip(headers, cells))
                if len(cells) != width:
                    for header in headers[len(cells):]:
                        record[header] = ""  # a short row: Excel drops trailing empty cells
                    for i, extra in enumerate(cells[width:], 1):
                        record[f"_extra_{i}"] = extra  # more cells than headers: kept, not lost
                yield self._build(n, record, self.columns)
        finally:
            rows.close()

    def _json_rows(self) -> Iterator[Lead | Reject | Blank]:
        # Records may differ in keys ({"phone":...} then {"mobile":...}): resolve per key set.
        o = self.options
        cache: dict[tuple[str, ...], dict | ColumnError] = {}
        records = self._records()
        try:
            for n, rec in enumerate(records, 1):
                if isinstance(rec, jsonfile.BadRecord):
                    yield Reject(self.path, n, rec.text[:200], f"not valid JSON: {rec.error}")
                    continue
                if not isinstance(rec, dict):
                    yield Reject(self.path, n, jsonfile.to_text(rec)[:200],
                                 "not a JSON object: each record must be {...}")
                    continue
                headers = tuple(unique_headers([str(k) for k in rec]))
                record = {h: jsonfile.to_text(v) for h, v in zip(headers, rec.values())}
                if headers not in cache:
                    if len(cache) > 1000:
                        cache.clear()
                    try:
                        cache[headers] = resolve_columns(list(headers), o.phone_column, o.name_column,
                                                         o.owner_column)
                    except ColumnError as exc:
                        cache[headers] = exc
                columns = cache[headers]
                if isinstance(columns, ColumnError):
                    if not any(clean_cell(v) for v in record.values()):
                        yield Blank(self.path, n)
                    else:
                        raw = json.dumps(rec, ensure_ascii=False)[:200]
                        yield Reject(self.path, n, raw, f"no usable phone field in this record: {columns}")
                    continue
                yield self._build(n, record, columns)
        finally:
            records.close()

    def _build(self, n: int, record: dict[str, str], columns: dict) -> Lead | Reject | Blank:
        joined = "".join(record.values())
        if joined.isprintable():
            # The common row: no control, invisible or non-ASCII space character anywhere
            # (str.isprintable is False for all of them), so cleaning a cell is a strip.
            if not joined.strip():
                return Blank(self.path, n)
            fields = {k: v.strip() for k, v in record.items()}
            undecodable = "\ufffd" in joined
            raw = record.get(columns["phone"], "")
        else:
            fields = {k: clean_cell(v) for k, v in record.items()}
            if not any(fields.values()):
                return Blank(self.path, n)
            undecodable = any("\ufffd" in v for v in fields.values())
            raw = record.get(columns["phone"], "").replace("\x00", "")
        for key in self._dlq_columns:
            fields.pop(key, None)
        if undecodable:
            return Reject(self.path, n, raw, f"undecodable text: this row has bytes that are not {self.encoding}; "
                                             "re-save the file as CSV UTF-8 or pass --encoding")
        try:
            phone = normalise_mobile(raw, self.options.default_region)
        except PhoneRejected as exc:
            return Reject(self.path, n, raw, exc.reason)
        name = (fields.get(columns["name"]) or None) if columns["name"] else None
        owner = (fields.get(columns["owner"]) or None) if columns["owner"] else None
        for role in ("remark", "tags"):  # {remark} and {tags} in the welcome, whatever the header
            if columns.get(role):
                fields.setdefault(role, fields.get(columns[role], ""))
        return Lead(phone, name, owner, fields, self.path, n, raw, len(joined))


# A later line holding a mobile, however it is written (spaces, dashes, brackets, +86).
_SWALLOWED = re.compile(r"\n[^\n]*(?<!\d)1[3-9](?:[ \-()]*\d){9}(?!\d)")


def _runaway(cells) -> tuple[str, str] | None:
    """A record over several lines that swallowed whole lead rows: an unmatched quote
    opened a cell that runs on over later lines holding their own mobile numbers.
    (raw, reason) or None."""
    first, last = cells.first_line, cells.last_line
    for cell in cells:
        if "\n" in cell and _SWALLOWED.search(cell):
            raw = cell.split("\n", 1)[0][:60]
            return raw, (f"runaway quote: an unmatched double quote at line {first} makes one cell of lines "
                         f"{first} to {last} of the file, swallowing {last - first} rows; fix the quote and import again")
    return None


def _is_mobile(cell: str, region: str) -> bool:
    try:
        normalise_mobile(cell, region)
    except PhoneRejected:
        return False
    return True


def _json_line(text: str) -> bool:
    first = next((ln for ln in text.lstrip("\ufeff").splitlines() if ln.strip()), "")
    try:
        json.loads(first)
    except ValueError:
        return False
    return True


def open_lead_file(path: str, options: ReadOptions | None = None) -> LeadFile:
    return LeadFile(path, options or ReadOptions())
