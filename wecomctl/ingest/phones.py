"""Phone cell → E.164 mobile number, or a reason the operator can act on.

Rule: normalise what people type (spaces, dashes, dots, brackets, +86 / 0086 / 86-,
full-width digits, invisible characters), but never repair what a program damaged.
Excel turns 13800138000 into 1.38001E+10 and the lost digits cannot be recovered; a
plausible wrong number is worse than a reject, because the customer added would be a
stranger. So damaged cells are rejected with the cause and the fix.

Only mobiles are accepted: WeCom adds customers by phone for mobile numbers only.
"""

from __future__ import annotations

import re
import unicodedata

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType, ValidationResult

from wecomctl.ingest.text import is_invisible

SCIENTIFIC = "scientific notation (Excel converted the number; re-export the column as text)"

_MOBILE_TYPES = (PhoneNumberType.MOBILE, PhoneNumberType.FIXED_LINE_OR_MOBILE)
_TYPE_NAMES = {
    PhoneNumberType.FIXED_LINE: "a landline",
    PhoneNumberType.TOLL_FREE: "a toll-free number",
    PhoneNumberType.PREMIUM_RATE: "a premium-rate number",
    PhoneNumberType.SHARED_COST: "a shared-cost number",
    PhoneNumberType.VOIP: "a VoIP number",
    PhoneNumberType.PAGER: "a pager number",
    PhoneNumberType.UAN: "a company number",
    PhoneNumberType.VOICEMAIL: "a voicemail number",
}

# 1.38001E+10, 8.61380e12, 1,38001E+10 (a European-locale Excel writes a decimal comma).
_SCIENTIFIC = re.compile(r"[+-]?\d+(?:[.,]\d*)?[eE][+-]?\d+")
# 13800138000.0: a float column written out. The ".0" carries no digit of the number.
_FLOAT_ZERO = re.compile(r"(\+?\d+)\.0+")
# 13800138000.5: a number that went through arithmetic; no longer a phone number.
_DECIMAL = re.compile(r"\+?\d{7,}\.\d*[1-9]\d*")
_EXCEL_ERROR = re.compile(r"#(N/A|VALUE!|REF!|NAME\?|NUM!|DIV/0!|NULL!|SPILL!|CALC!)")
# 13,800,138,000: Excel's thousands format. Every digit is still there.
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.0+)?")
# Separators between several numbers in one cell ("138.../139...", one per line).
_LIST_SEPARATORS = re.compile(r"[/,;|、，；\n\r]+")
# What people put between digit groups; anything else is a character we cannot explain.
_ALLOWED = re.compile(r"[0-9+\-.() ]*")
_DASHES = str.maketrans({ch: "-" for ch in "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63"})


class PhoneRejected(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _clean(raw: str) -> str:
    # NFKC: full-width digits and ＋ from a Chinese IME become ASCII; NBSP becomes a space.
    text = unicodedata.normalize("NFKC", raw)
    out = []
    for ch in text:
        if ch in "\n\r":
            out.append("\n")  # kept: a line break separates two numbers in one cell
        elif ch.isspace():
            out.append(" ")
        elif not is_invisible(ch):  # zero-width, bidi marks, BOM, NUL, other controls
            out.append(ch)
    text = "".join(out).strip()
    # Deliberate "keep as text" markers from Excel and CRM exports, not damage:
    # '13800138000 (typed apostrophe) and ="13800138000" (formula-text CSV).
    match = re.fullmatch(r'="(.*)"', text)
    if match:
        text = match.group(1).strip()
    if text.startswith("'"):
        text = text[1:].strip()
    return text


def _precheck(text: str) -> str:
    """Reject damaged or unexplained cells; return the text to parse."""
    if not text:
        raise PhoneRejected("empty phone: the phone cell is empty but the row has other data")
    if _SCIENTIFIC.fullmatch(text.replace(" ", "")):
        raise PhoneRejected(SCIENTIFIC)
    if _EXCEL_ERROR.fullmatch(text.upper()):
        raise PhoneRejected(f"Excel error value: {text} (the cell holds a failed formula; fix it at the source)")
    if set(text) == {"#"}:
        raise PhoneRejected("Excel placeholder: ##### is what Excel shows in a too-narrow column; "
                            "widen it and re-export")
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")  # digit grouping from a number format; no digit lost
    parts = [p for p in _LIST_SEPARATORS.split(text) if re.search(r"\d{5}", p)]
    if len(parts) > 1:
        raise PhoneRejected(f"several numbers in one cell: {' | '.join(p.strip() for p in parts)} "
                            "(put one number per row)")
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    if letters:
        hint = ("a name or note in the phone cell?" if any(not ch.isascii() for ch in letters)
                else "letters where digits belong, such as O for 0")
        raise PhoneRejected(f"contains letters: {text} ({hint}; fix the cell at the source)")
    zero = _FLOAT_ZERO.fullmatch(text)
    if zero:
        text = zero.group(1)
    elif _DECIMAL.fullmatch(text):
        raise PhoneRejected(f"decimal number: {text} (the column was converted to numbers; "
                            "re-export it as text)")
    # Word processors and IMEs turn "-" into look-alikes (‐ ‑ ‒ – — ― −, full-width －
    # is already "-" after NFKC): they separate digit groups, they never stand for digits.
    text = text.translate(_DASHES)
    if not _ALLOWED.fullmatch(text):
        odd = "".join(sorted({ch for ch in text if not _ALLOWED.fullmatch(ch)}))
        raise PhoneRejected(f"unexpected characters: {odd!r} in {text}")
    if "+" in text.lstrip("( ")[1:]:  # "+86 ..." and "(+86) ..." are fine
        raise PhoneRejected(f"misplaced +: {text} (+ may only start the number)")
    digits = re.sub(r"\D", "", text)
    if len(digits) > 15:  # E.164 allows 15 digits at most, country code included
        raise PhoneRejected(f"too long: {digits} ({len(digits)} digits; two numbers in one cell?)")
    if len(digits) < 3:
        raise PhoneRejected(f"too short: {digits or text} (not a phone number)")
    return text


def _why_not_mobile(number: phonenumbers.PhoneNumber) -> str:
    nsn = phonenumbers.national_significant_number(number)
    cc = number.country_code
    if cc == 86:
        # Mainland mobiles: 11 digits starting with 1. Say which rule failed.
        kind = phonenumbers.number_type(number)
        if phonenumbers.is_valid_number(number) and kind in _TYPE_NAMES:  # e.g. 010 landlines
            shown = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)  # 010 1234 5678
            return f"not a mobile number: {shown} ({_TYPE_NAMES[kind]}; only mobiles can be added)"
        mobile_like = nsn.startswith("1")  # landlines with area codes 10 are caught above
        if mobile_like and len(nsn) < 11:
            return f"too short: {nsn} ({len(nsn)} digits; a mainland mobile has 11 after +86)"
        if mobile_like and len(nsn) > 11:
            return f"too long: {nsn} ({len(nsn)} digits; a mainland mobile has 11 after +86)"
        if mobile_like:
            return f"not a mobile number: {nsn} (no mainland mobile range starts with {nsn[:3]})"
        return f"not a mobile number: {nsn} (a mainland mobile has 11 digits after +86 and starts with 1)"
    possible = phonenumbers.is_possible_number_with_reason(number)
    shown = f"+{cc} {nsn}"
    if possible == ValidationResult.INVALID_COUNTRY_CODE:
        return f"unknown country code: {shown}"
    if possible == ValidationResult.TOO_SHORT:
        return f"too short: {shown} (too few digits for +{cc})"
    if possible == ValidationResult.TOO_LONG:
        return f"too long: {shown} (too many digits for +{cc})"
    if not phonenumbers.is_valid_number(number):
        return f"not a valid number: {shown} (no such number range for +{cc})"
    kind = phonenumbers.number_type(number)
    return f"not a mobile number: {shown} ({_TYPE_NAMES.get(kind, 'not a mobile')}; only mobiles can be added)"


# The shape nearly every cell of a real list has: a mainland mobile, maybe after +86 / 0086 /
# 86, maybe grouped 3-4-4 by spaces or dashes. Anything else takes the full path.
_PLAIN_CN = re.compile(r"(?:(?:\+|00)?86[ -]?)?(1\d\d)[ -]?(\d{4})[ -]?(\d{4})", re.ASCII)  # ASCII digits only
# Whether an 11-digit mainland number starting with 1 is a valid mobile depends only on
# its first 7 digits (the 号段 block numbers are allocated in): phonenumbers' CN patterns
# fix at most 6 leading digits of such numbers and leave the rest free. So each block is
# validated once by phonenumbers; tests check this memo against phonenumbers directly.
# One byte per block 1000000..1999999 (1 MB, flat however many numbers are imported):
# 0 not yet known, 1 a mobile block, 2 not.
_UNKNOWN, _MOBILE, _NOT_MOBILE = 0, 1, 2
_BLOCK_IS_MOBILE = bytearray(1_000_000)


def _fast_cn(raw: str) -> str | None:
    """E.164 for a plain valid mainland mobile, else None (then the full path decides)."""
    match = _PLAIN_CN.fullmatch(raw.strip(" "))
    if match is None:
        return None
    nsn = "".join(match.groups())
    block = int(nsn[:7]) - 1_000_000
    known = _BLOCK_IS_MOBILE[block]
    if known == _UNKNOWN:
        # number_type is UNKNOWN for an invalid number, so one call answers both questions
        number = phonenumbers.PhoneNumber(country_code=86, national_number=int(nsn))
        known = _MOBILE if phonenumbers.number_type(number) in _MOBILE_TYPES else _NOT_MOBILE
        _BLOCK_IS_MOBILE[block] = known
    return "+86" + nsn if known == _MOBILE else None


def normalise_mobile(raw: str, default_region: str = "CN") -> str:
    """Return the E.164 form of a mobile number, or raise PhoneRejected(reason).

    Numbers without a country code are read in `default_region`; "0086...", "86-..."
    and "+86 (0) ..." are understood for China by phonenumbers.
    """
    if default_region == "CN":
        fast = _fast_cn(raw)
        if fast is not None:
            return fast
    return _full(raw, default_region)


def _full(raw: str, default_region: str) -> str:
    text = _precheck(_clean(raw))
    try:
        number = phonenumbers.parse(text, default_region)
    except NumberParseException as exc:
        digits = re.sub(r"\D", "", text)
        if exc.error_type == NumberParseException.INVALID_COUNTRY_CODE:
            raise PhoneRejected(f"unknown country code: {text}") from None
        if exc.error_type in (NumberParseException.TOO_SHORT_NSN, NumberParseException.TOO_SHORT_AFTER_IDD):
            raise PhoneRejected(f"too short: {digits}") from None
        if exc.error_type == NumberParseException.TOO_LONG:
            raise PhoneRejected(f"too long: {digits}") from None
        raise PhoneRejected(f"not a phone number: {text}") from None
    if phonenumbers.is_valid_number(number) and phonenumbers.number_type(number) in _MOBILE_TYPES:
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    raise PhoneRejected(_why_not_mobile(number))
