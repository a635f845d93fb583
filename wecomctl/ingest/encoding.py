"""Which encoding a lead file is in, and decoding it as a stream.

Operators' files are UTF-8 (with or without BOM), GBK/GB18030 (Excel and WPS on Chinese
Windows, "CSV" save) or UTF-16 ("Unicode Text" save, tab separated, always with a BOM).

Order: BOM; else strict UTF-8; else GB18030. Strict UTF-8 first because it is evidence:
UTF-8 bytes nearly always also decode as GB18030 (as mojibake), while GBK text almost
never forms valid UTF-8. Almost: about 1 in 70 two-character GBK names does ("小强" is
d0a1 c7bf, which is UTF-8 for "Сǿ"), so a small GBK file can be valid UTF-8. When the
sample is valid in both, the readings are weighed (plausible.py). GB18030, never `gbk`:
it is a superset, and names use rare characters (李㒲) that only GB18030 encodes.
A sample that is not all valid UTF-8 is judged line by line: a line of UTF-8 Chinese
with one stray byte is UTF-8 (its row is rejected as undecodable), never GB18030 mojibake.
"""

from __future__ import annotations

import codecs
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from wecomctl.errors import InputError
from wecomctl.ingest.plausible import damaged_utf8_line, gbk_not_utf8, utf8_line_in_gbk_file

SAMPLE = 64 * 1024

# Legacy Chinese code pages are subsets of GB18030: decoding with GB18030 loses nothing
# and reads the characters GBK lacks.
_SUPERSEDED = {"gbk": "gb18030", "gb2312": "gb18030", "cp936": "gb18030", "euc_cn": "gb18030"}
# When a line is not valid in the chosen encoding, the other one is tried (mixed files:
# a UTF-8 export with GBK rows appended).
_OTHER = {"utf-8": "gb18030", "gb18030": "utf-8"}
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig", "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "utf-16-be"),
)


@dataclass
class Encoding:
    name: str  # what we report: "utf-8-sig", "utf-8", "gb18030", "utf-16-le", ...
    codec: str  # what we decode with
    bom: int = 0  # bytes to skip at the start
    override: bool = False  # given by the operator: no fallback


def from_override(path: str, name: str, head: bytes) -> Encoding:
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise InputError(f"{path}: unknown encoding {name!r}; use utf-8, gb18030 or utf-16") from None
    codec = _SUPERSEDED.get(codec, codec)
    bom = 0
    for mark, _, bom_codec in _BOMS:
        if head.startswith(mark) and codec.replace("-sig", "") == bom_codec.replace("-sig", ""):
            bom = len(mark)
    if codec == "utf-16" and head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        codec, bom = ("utf-16-le" if head[:2] == codecs.BOM_UTF16_LE else "utf-16-be"), 2
    if not _decodes(head[bom:], codec, final=False):
        raise InputError(f"{path}: the file does not decode as {name} (--encoding); "
                         "leave out --encoding to detect it, or try gb18030")
    return Encoding(codec, codec, bom, override=True)


def _decodes(data: bytes, codec: str, final: bool) -> bool:
    try:
        codecs.getincrementaldecoder(codec)("strict").decode(data, final)
    except UnicodeDecodeError:
        return False
    return True


def _utf16_without_bom(sample: bytes) -> str | None:
    # ASCII text in UTF-16 has a NUL in every other byte; no text file in UTF-8/GB18030 does.
    window = sample[:4096]
    if len(window) < 8:
        return None
    even = window[0::2].count(0) / len(window[0::2])
    odd = window[1::2].count(0) / len(window[1::2])
    if odd > 0.4 and even < 0.05:
        return "utf-16-le"
    if even > 0.4 and odd < 0.05:
        return "utf-16-be"
    return None


def _first_non_ascii(f: BinaryIO, sample: bytes) -> bytes | None:
    """A window starting at the first non-ASCII byte after the sample, or None.

    A sample of pure ASCII is no evidence for any encoding; look further (fast: only
    bytes.isascii over chunks) so the decision is made on the first Chinese text.
    """
    f.seek(len(sample))
    while True:
        chunk = f.read(SAMPLE)
        if not chunk:
            return None
        if not chunk.isascii():
            start = next(i for i, b in enumerate(chunk) if b >= 0x80)
            return chunk[start:] + f.read(start)


def detect(path: str, f: BinaryIO) -> Encoding:
    """Decide the encoding from the file's content. `f` is at offset 0."""
    sample = f.read(SAMPLE)
    complete = len(sample) < SAMPLE
    for mark, name, codec in _BOMS:
        if sample.startswith(mark):
            return Encoding(name, codec, len(mark))
    guessed = _utf16_without_bom(sample)
    if guessed:
        return Encoding(guessed, guessed)
    if sample.isascii() and not complete:
        window = _first_non_ascii(f, sample)
        if window is None:
            return Encoding("utf-8", "utf-8")
        sample, complete = window, len(window) < SAMPLE
    if _decodes(sample, "utf-8", complete):
        if _decodes(sample, "gb18030", complete) and gbk_not_utf8(sample, complete):
            return Encoding("gb18030", "gb18030")
        return Encoding("utf-8", "utf-8")
    # Not all UTF-8: GBK, GBK and UTF-8 lines mixed, UTF-8 with a stray byte in a line,
    # a few bad rows (rejected one by one), or not a text file at all. Line by line.
    lines = sample.split(b"\n")
    if not complete:
        lines.pop()
    verdicts = [(_decodes(ln, "utf-8", True) or damaged_utf8_line(ln), _decodes(ln, "gb18030", True))
                for ln in lines if not ln.isascii()]
    if not verdicts and _decodes(sample, "gb18030", complete):
        return Encoding("gb18030", "gb18030")  # one long line (a JSON array), GBK
    utf8 = sum(u for u, _ in verdicts)
    gbk = sum(g and not u for u, g in verdicts)
    bad = sum(not (u or g) for u, g in verdicts)
    if bad > max(1, len(lines) // 20):
        raise InputError(f"{path}: the file is neither UTF-8 nor GB18030 text; re-save it as CSV UTF-8 "
                         "or pass --encoding")
    return Encoding("utf-8", "utf-8") if utf8 >= gbk else Encoding("gb18030", "gb18030")


def decode_sample(head: bytes, enc: Encoding, complete: bool) -> str:
    """The text of the first bytes, for sniffing the format, delimiter and header."""
    dec = codecs.getincrementaldecoder(enc.codec)("replace")
    return dec.decode(head[enc.bom:], complete)


_LINE_END = re.compile(rb"\r\n|\n|\r")


MAX_LINE = 16 * 1024 * 1024  # no lead row is this long: a runaway quote or not a lead file


def byte_lines(f: BinaryIO, path: str = "") -> Iterator[bytes]:
    r"""Lines ending in b"\n", for files ending lines in \r\n, \n or \r (old Mac Excel).

    Safe for UTF-8 and GB18030: neither uses the bytes \r or \n inside a character.
    Each block is scanned once (a very long line costs linear time, not quadratic).
    """
    parts: list[bytes] = []  # pieces of the line not yet ended
    size = 0
    ended = 0  # lines yielded so far
    cr_held = False  # the last block ended in \r: a line end, maybe the first half of \r\n
    while True:
        block = f.read(SAMPLE)
        if not block:
            break
        if cr_held:
            cr_held = False
            yield b"".join(parts) + b"\n"
            ended += 1
            parts, size = [], 0
            if block.startswith(b"\n"):
                block = block[1:]
        pos = 0
        for match in _LINE_END.finditer(block):
            if match.group() == b"\r" and match.end() == len(block):
                cr_held = True
                break
            parts.append(block[pos:match.start()])
            yield b"".join(parts) + b"\n"
            ended += 1
            parts, size = [], 0
            pos = match.end()
        rest = block[pos:len(block) - (1 if cr_held else 0)]
        parts.append(rest)
        size += len(rest)
        if size > MAX_LINE:
            raise InputError(f"{path}: line {ended + 1} is longer than {MAX_LINE // 2**20} MiB: "
                             "not a lead file, or a cell holding a whole document; nothing after it was read")
    if cr_held or any(parts):
        yield b"".join(parts) + b"\n" if cr_held else b"".join(parts)


class LineDecoder:
    """Decodes a file into text lines (with "\n" endings) for the CSV and JSONL readers."""

    def __init__(self, enc: Encoding, path: str = ""):
        self.enc, self.path = enc, path
        self.fallback_lines = 0  # lines decoded with the other encoding (a mixed file)

    def lines(self, f: BinaryIO) -> Iterator[str]:
        f.seek(self.enc.bom)
        codec = self.enc.codec
        try:
            ascii_compatible = "a\n".encode(codec) == b"a\n"
        except (LookupError, UnicodeError):
            ascii_compatible = False
        if not ascii_compatible:  # UTF-16 and friends: the codec finds the line ends
            yield from io.TextIOWrapper(f, encoding=codec, errors="replace", newline=None)
            return
        other = None if self.enc.override else _OTHER.get(codec)
        for line in byte_lines(f, self.path):
            if other == "utf-8" and not line.isascii() and utf8_line_in_gbk_file(line):
                self.fallback_lines += 1  # a UTF-8 row appended to a GBK file
                yield line.decode("utf-8")
                continue
            try:
                yield line.decode(codec)
                continue
            except UnicodeDecodeError:
                pass
            if other == "gb18030" and damaged_utf8_line(line):
                yield line.decode(codec, errors="replace")  # rejected as undecodable, never garbled
                continue
            if other:
                try:
                    text = line.decode(other)
                except UnicodeDecodeError:
                    pass
                else:
                    self.fallback_lines += 1
                    yield text
                    continue
            # Undecodable in both: U+FFFD marks the row, which the reader then rejects
            # rather than sending a welcome message with a garbled name.
            yield line.decode(codec, errors="replace")


def text_chunks(f: BinaryIO, enc: Encoding) -> Iterator[str]:
    """The file as text chunks, for the JSON array reader (one line may be the whole file)."""
    f.seek(enc.bom)
    dec = codecs.getincrementaldecoder(enc.codec)("replace")
    while block := f.read(SAMPLE):
        yield dec.decode(block)
    yield dec.decode(b"", True)
