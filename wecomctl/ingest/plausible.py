"""Which reading of bytes that are valid both as UTF-8 and as GB18030 makes sense.

GBK text that happens to be valid UTF-8 reads, as UTF-8, as letters of several scripts
glued into one word ("Сǿ", "¬С") or as combining marks and symbols; real UTF-8 text
reads as CJK, punctuation, and words in one script each ("José", "Сергей"). GB18030 is
chosen only when the UTF-8 reading looks like that and the GB18030 reading is common
Chinese (GB2312 characters), so a UTF-8 file is never read as GB18030 on a weak hint.
"""

from __future__ import annotations

import codecs
import re
import unicodedata

_WORDS = re.compile(r"[^\W\d_]+|\S")


def _cjk(ch: str) -> bool:
    o = ord(ch)
    return (0x3000 <= o <= 0x30FF or 0x3400 <= o <= 0x9FFF or 0xAC00 <= o <= 0xD7AF
            or 0xFF00 <= o <= 0xFFEF or 0x20000 <= o <= 0x3FFFF)


def _script(ch: str) -> str:
    return "LATIN" if ch.isascii() else unicodedata.name(ch, "?").split(" ")[0]


def odd_share(text: str) -> float:
    """Share of the non-ASCII characters that make no sense in a lead list."""
    total = odd = 0
    for word in _WORDS.findall(text):
        scripts = {_script(c) for c in word if c.isalpha() and not _cjk(c)}
        for ch in word:
            if ch.isascii():
                continue
            total += 1
            symbol = unicodedata.category(ch) in ("So", "Sc", "Pd", "Pi", "Pf", "Po", "Ps", "Pe")
            if _cjk(ch) or (symbol and ord(ch) >= 0x2000) or ch in "·×÷°©®":
                continue
            if ch.isalpha() and len(scripts) == 1:
                continue
            odd += 1
    return odd / total if total else 0.0


def common_chinese_share(text: str) -> float:
    chars = [c for c in text if not c.isascii()]
    good = 0
    for ch in chars:
        try:
            ch.encode("gb2312")
        except UnicodeError:
            continue
        good += _cjk(ch)
    return good / len(chars) if chars else 0.0


def gbk_not_utf8(sample: bytes, complete: bool) -> bool:
    """True when bytes valid in both encodings are GBK text rather than UTF-8 text."""
    utf8 = codecs.getincrementaldecoder("utf-8")("replace").decode(sample, complete)
    gbk = codecs.getincrementaldecoder("gb18030")("replace").decode(sample, complete)
    return odd_share(utf8) > 0.25 and common_chinese_share(gbk) >= 0.75


def utf8_line_in_gbk_file(line: bytes) -> bool:
    """In a file read as GB18030, is this line really UTF-8 (a mixed file)?

    Every UTF-8 line also decodes as GB18030, as mojibake ("张三" → "寮犱笁"). A line is
    taken as UTF-8 only when it is valid UTF-8, reads sensibly so, and reads as more
    common Chinese than its GB18030 reading: GBK lines that happen to be valid UTF-8 read
    as Cyrillic or Greek ("Сл"), with no Chinese at all, and stay GB18030.
    """
    try:
        utf8 = line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    gbk = line.decode("gb18030", errors="replace")
    return odd_share(utf8) == 0 and common_chinese_share(utf8) > common_chinese_share(gbk)
