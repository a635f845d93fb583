"""JSON Lines and JSON arrays of records, streamed.

Numbers are kept as the text the file holds (parse_int/parse_float=str): a phone stored
as 1.38001E+10 must reach the phone check as "1.38001E+10", to be rejected, not as the
float 13800100000.0, which would pass as a plausible wrong number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from wecomctl.errors import InputError

_DECODER = json.JSONDecoder(parse_float=str, parse_int=str, parse_constant=str)
_MAX_RECORD = 16 * 1024 * 1024
_WS = " \t\r\n\ufeff"


class BadRecord:
    """A JSONL line that is not JSON; becomes a Reject, the rest of the file is read."""

    def __init__(self, text: str, error: str):
        self.text, self.error = text, error


def to_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)  # str, and numbers already kept as their text


def jsonl_records(lines: Iterable[str]) -> Iterator[object]:
    """One record per non-empty line; empty lines are not records."""
    for line in lines:
        line = line.strip(_WS + "\x00")
        if not line:
            continue
        try:
            yield _DECODER.decode(line)
        except ValueError as exc:
            yield BadRecord(line, exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc))


def array_records(path: str, chunks: Iterable[str]) -> Iterator[object]:
    """The elements of a top-level JSON array, decoding only one element at a time."""
    chunks = iter(chunks)
    buf, pos, eof = "", 0, False
    count = 0

    def fill() -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = next(chunks, None)
        if chunk is None:
            eof = True
            return False
        buf, pos = buf[pos:] + chunk, 0
        return True

    def next_char() -> str:
        # The next non-blank character (not consumed), "" at the end of the file.
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WS:
                pos += 1
            if pos < len(buf) or not fill():
                return buf[pos] if pos < len(buf) else ""

    def fail(what: str) -> InputError:
        return InputError(f"{path}: not valid JSON after record {count}: {what}; "
                          "fix the file or export it as JSON Lines")

    if next_char() != "[":
        raise fail("expected [")
    pos += 1
    if next_char() == "]":
        return
    while True:
        while True:
            try:
                value, end = _DECODER.raw_decode(buf, pos)
            except json.JSONDecodeError as exc:
                # Incomplete in this buffer: read on, but not without limit (broken JSON
                # must not pull the whole file into memory).
                if len(buf) - pos < _MAX_RECORD and fill():
                    continue
                raise fail(exc.msg) from None
            if end == len(buf) and fill():
                continue  # a number may go on in the next chunk
            break
        pos = end
        count += 1
        yield value
        sep = next_char()
        pos += 1
        if sep == "]":
            return
        if sep != ",":
            raise fail(f"expected , or ] but found {sep!r}" if sep else "the file ends inside the array")
        next_char()
