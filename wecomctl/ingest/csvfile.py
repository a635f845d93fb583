"""Delimited text: CSV, TSV, TXT. Delimiter sniffing and row parsing.

csv.Sniffer guesses from character frequencies and is easily fooled by Chinese text
and by names with commas; instead each candidate delimiter is tried on the first lines
and judged by the header it produces.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator

from wecomctl.errors import InputError
from wecomctl.ingest.headers import role_of
from wecomctl.ingest.text import clean_cell

# The full-width comma: Chinese IMEs type it, and hand-made "CSV" files use it.
DELIMITERS = (",", "\t", ";", "|", "，")
_NAMED = {"tab": "\t", "\\t": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}
# Excel's "sep=;" first line says which delimiter the rest of the file uses.
_SEP_LINE = re.compile(r"\s*sep=(.)\s*", re.IGNORECASE)
_SNIFF_ROWS = 50


def delimiter_override(path: str, value: str) -> str:
    value = _NAMED.get(value.lower(), value)
    if len(value) != 1:
        raise InputError(f"{path}: --delimiter must be one character (or 'tab'), not {value!r}")
    return value


def sep_line(line: str) -> str | None:
    match = _SEP_LINE.fullmatch(line.lstrip("\ufeff"))
    return match.group(1) if match else None


def is_blank(cells: list[str]) -> bool:
    return not any(clean_cell(c) for c in cells)


def _parse(lines: list[str], delimiter: str) -> list[list[str]]:
    rows = []
    try:
        for row in csv.reader(lines, delimiter=delimiter):
            if not is_blank(row):
                rows.append(row)
            if len(rows) > _SNIFF_ROWS:
                break
    except csv.Error:
        pass  # a sample cut inside a quoted field; judge on what parsed
    return rows


def sniff_delimiter(lines: list[str]) -> str:
    """The delimiter that gives the best header: one naming a phone column first, then
    more than one column, then the most data rows with as many cells as the header."""

    def score(delimiter: str) -> tuple:
        rows = _parse(lines, delimiter)
        if not rows:
            return (False, False, 0.0, 0)
        header, data = rows[0], rows[1:]
        has_phone = any(role_of(cell) == "phone" for cell in header)
        consistent = sum(len(r) == len(header) for r in data) / len(data) if data else 1.0
        return (has_phone, len(header) > 1, consistent, len(header))

    best = max(DELIMITERS, key=score)  # max keeps the first of equals: comma wins ties
    return best if score(best)[1] or score(best)[0] else ","


def sample_lines(text: str, complete: bool) -> list[str]:
    lines = text.replace("\x00", "").splitlines(keepends=True)
    if lines and not complete:
        lines.pop()  # cut in the middle
    if lines and sep_line(lines[0]):
        lines.pop(0)
    return lines


class Cells(list):
    """One parsed record, with the physical lines it came from (1-based) and whether NUL
    bytes were removed from it."""

    first_line = 0
    last_line = 0
    had_nul = False


def rows(path: str, lines: Iterable[str], delimiter: str) -> Iterator[Cells]:
    """Parsed rows of the whole file, the "sep=" line dropped, NUL bytes removed."""
    nul_lines: list[int] = []  # physical lines NULs were removed from, not yet passed

    def clean(source: Iterable[str]) -> Iterator[str]:
        for n, line in enumerate(source, 1):
            if "\x00" in line:
                nul_lines.append(n)
                line = line.replace("\x00", "")
            yield line

    lines = clean(lines)
    first = next(lines, None)
    if first is None:
        return
    first = first.lstrip("\ufeff")
    skipped = 1 if sep_line(first) else 0
    reader = csv.reader(lines if skipped else _chain(first, lines), delimiter=delimiter)
    try:
        last = skipped
        for record in reader:
            cells = Cells(record)
            end = skipped + reader.line_num
            cells.first_line, cells.last_line = last + 1, end
            if nul_lines:  # rare: only a damaged export pays for this
                cells.had_nul = any(n <= end for n in nul_lines)
                nul_lines[:] = [n for n in nul_lines if n > end]
            last = end
            yield cells
    except csv.Error as exc:
        raise InputError(f"{path}: line {reader.line_num}: {exc}; look for an unmatched double quote "
                         "in that line or the ones before it") from None


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
