"""XLSX workbooks, read with openpyxl in read-only (streaming) mode.

Excel stores a phone typed into a General cell as a number. A number cell becomes its
digits only when it is exactly an integer; anything else is passed on as is (and the
phone check rejects it): str() of a float could print 1.38001e+10 or drop digits.

A number cell with a scientific number format (0.00E+00) is read as Excel shows it,
1.38E+10, and so rejected: that is what a CSV holding 1.38001E+10 becomes when Excel
opens it and saves it as XLSX, and its digits beyond the shown ones are gone.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

from wecomctl.errors import InputError


# The digit placeholders and decimals before an exponent: 0.00E+00, ##0.0E+0, 0E-00.
_SCIENTIFIC_FORMAT = re.compile(r"[0#?](?:\.([0#?]*))?[eE][+-]")


def cell_text(value: object, number_format: str | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if number_format and isinstance(value, (int, float)) and "E" in number_format.upper():
        shown = _SCIENTIFIC_FORMAT.search(number_format)
        if shown and math.isfinite(value):
            return f"{value:.{len(shown.group(1) or '')}E}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, dt.datetime) and not (value.hour or value.minute or value.second):
        return value.date().isoformat()
    if isinstance(value, (dt.date, dt.time)):
        return value.isoformat()
    return str(value)


@contextmanager
def workbook(path: str):
    """The workbook, read-only. Opened from a file object: openpyxl refuses a path whose
    extension is not .xlsx, and formats are detected by content (CRMs name files .xls)."""
    import openpyxl  # imported here: only XLSX files pay for it

    with open(path, "rb") as fh:
        try:
            # data_only: the values Excel last computed, not the formulas.
            wb = openpyxl.load_workbook(fh, read_only=True, data_only=True)
        except Exception as exc:  # zipfile, KeyError, openpyxl's own types for broken parts
            raise InputError(f"{path}: cannot read it as an XLSX workbook ({type(exc).__name__}: {exc}); "
                             "open it in Excel or WPS and save it again as .xlsx or CSV UTF-8") from None
        try:
            yield wb
        finally:
            wb.close()


def worksheets(wb) -> list:
    return [ws for ws in wb.worksheets if hasattr(ws, "iter_rows")]  # not chart sheets


def sheet_rows(path: str, sheet: str | None) -> Iterator[list[str]]:
    with workbook(path) as wb:
        ws = wb[sheet] if sheet else worksheets(wb)[0]
        # Some writers record a wrong used range (A1:A1); forget it and read what is there.
        ws.reset_dimensions()
        for cells in ws.iter_rows():
            yield [cell_text(c.value, getattr(c, "number_format", None)) for c in cells]
