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


def _core_letter(ch: str) -> bool:
    """A letter of the alphabets people's names are written in: Latin-1 and Latin
    Extended-A (José, Łukasz, Dvořák), Greek, Russian Cyrillic. GBK bytes read as UTF-8
    mostly land beside them: Latin Extended-B, IPA, Armenian, Cyrillic extensions."""
    o = ord(ch)
    return 0xC0 <= o <= 0x17F or 0x386 <= o <= 0x3CE or 0x400 <= o <= 0x45F


def _word_like(letters: list[str]) -> bool:
    """Letters (no CJK) of one word that read as a word of some language."""
    if len({_script(c) for c in letters}) != 1:
        return False  # scripts glued into one word: "Сǿ"
    if any(c.isascii() for c in letters):
        return True  # a Latin word with accents: "José", "Müller"
    if _script(letters[0]) == "LATIN":
        return False  # Latin words have plain letters too; "ţò", "ĽĦ" are GBK bytes
    # Greek or Cyrillic: a word of three or more letters of the core alphabets, cased
    # as words are ("Сергей", "ΑΘΗΝΑ", "иван"), not "оҨ", "вж" or a lone "κ".
    text = "".join(letters)
    return (len(letters) >= 3 and all(_core_letter(c) for c in letters)
            and (text.islower() or text.isupper() or text.istitle()))


def odd_share(text: str) -> float:
    """Share of the non-ASCII characters that make no sense in a lead list."""
    total = odd = 0
    for word in _WORDS.findall(text):
        letters = [c for c in word if c.isalpha() and not _cjk(c)]
        word_like = bool(letters) and _word_like(letters)
        for ch in word:
            if ch.isascii():
                continue
            total += 1
            symbol = unicodedata.category(ch) in ("So", "Sc", "Pd", "Pi", "Pf", "Po", "Ps", "Pe")
            if _cjk(ch) or (symbol and ord(ch) >= 0x2000) or ch in "·×÷°©®":
                continue
            if ch.isalpha() and word_like:
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


def damaged_utf8_line(line: bytes) -> bool:
    """In a file read as UTF-8, is this line (invalid UTF-8) UTF-8 text with a stray
    byte ("张三,caf\xe9") rather than a GBK row appended to the file?

    Read as GB18030, such a line turns its real Chinese into mojibake ("寮犱笁"), a
    plausible but wrong name. A GBK line read as UTF-8 is almost all U+FFFD (its bytes
    rarely form a valid 3-byte sequence); a damaged UTF-8 line has more CJK than that.
    """
    text = line.decode("utf-8", errors="replace")
    return sum(map(_cjk, text)) > text.count("\ufffd")
