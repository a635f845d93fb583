"""Cleaning of header names and cell values.

Files from Excel, WPS and CRMs carry characters nobody sees: a BOM glued to the first
header, zero-width spaces and bidi marks pasted from chat apps, NBSP from web pages, NUL
padding, full-width letters from a Chinese IME. None of them may change what a cell means.
"""

from __future__ import annotations

import re
import unicodedata


def is_invisible(ch: str) -> bool:
    # Cf: format characters (ZWSP, ZWJ, BOM, bidi marks); Cc: control characters (NUL, tab...).
    return unicodedata.category(ch) in ("Cf", "Cc")


def _blank(ch: str) -> bool:
    return ch.isspace() or is_invisible(ch)  # isspace covers NBSP and the ideographic space


def clean_cell(value: str) -> str:
    """A cell value without NULs and without blank or invisible characters at either end.

    Invisible characters inside the value are kept: a ZWJ inside an emoji name is meaning.
    """
    if "\x00" in value:
        value = value.replace("\x00", "")
    value = value.strip()  # str.strip() removes exactly what isspace() calls space
    # Printable ends (the common case) cannot be invisible characters: done.
    if not value or (value[0].isprintable() and value[-1].isprintable()):
        return value
    start, end = 0, len(value)
    while start < end and _blank(value[start]):
        start += 1
    while end > start and _blank(value[end - 1]):
        end -= 1
    return value[start:end]


def clean_header(header: str) -> str:
    """A header as shown to operators and used as the key in Lead.fields.

    NFKC folds full-width letters and spaces; invisible characters go everywhere (headers
    hold no emoji); runs of spaces become one space.
    """
    text = unicodedata.normalize("NFKC", header)
    text = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or not is_invisible(ch))
    return " ".join(text.split())


# Notes people add to a template's header; they do not change which column it is.
_NOTE = re.compile(r"[(\[【<]\s*(必填|选填|可选|必须|required|optional)\s*[)\]】>]$")
_JOINERS = re.compile(r"[\s_\-.:：/]+")


def header_key(header: str) -> str:
    """The form headers are compared in: "Phone Number *", "phone_number" and
    "ＰＨＯＮＥ　ＮＵＭＢＥＲ" all give "phonenumber"."""
    text = clean_header(header).casefold().strip("*# ")
    text = _NOTE.sub("", text).strip("*# ")
    return _JOINERS.sub("", text)
