"""Which column holds the phone, the name and the owner.

Operators do not rename columns before importing: headers come as the CRM, the form
tool or a colleague wrote them, in Chinese or English. Matching ignores case, spaces,
underscores, full-width forms, invisible characters and "(必填)"-style notes (text.header_key).
A guess between two candidate columns would import the wrong one silently, so two
matches for one role refuse the file and ask for --phone-column (or --name-column...).
"""

from __future__ import annotations

from wecomctl.ingest.text import clean_header, header_key

ALIASES: dict[str, tuple[str, ...]] = {
    "phone": (
        "手机号", "手机", "手机号码", "电话", "电话号码", "联系电话", "联系方式", "联系手机",
        "移动电话", "客户手机", "客户手机号", "客户电话", "手机电话",
        "mobile", "mobile number", "mobile phone", "phone", "phone number", "phone no",
        "tel", "telephone", "cellphone", "cell", "cell phone", "contact number", "contact phone",
    ),
    "name": (
        "姓名", "名字", "客户姓名", "客户名称", "客户名", "联系人", "联系人姓名", "称呼",
        "name", "full name", "customer name", "customer", "contact name", "client name", "lead name",
    ),
    "owner": (
        "负责人", "跟进人", "归属员工", "员工账号", "所属员工", "跟进员工", "负责员工", "归属人",
        "所属人", "员工", "员工id", "员工userid",
        "owner", "staff", "userid", "user id", "owner userid", "owner id", "staff id",
        "staff userid", "assignee",
    ),
    # Kept for the welcome template as {remark} and {tags}, whatever the header says.
    "remark": ("备注", "客户备注", "备注信息", "说明", "remark", "remarks", "note", "notes", "comment", "comments"),
    "tags": ("标签", "客户标签", "tag", "tags", "label", "labels"),
}
ROLES = ("phone", "name", "owner", "remark", "tags")
# Columns `wecomctl dlq export` adds beside a lead's own: what died and why. A fixed
# to-fix file imported again is read without them, so an unchanged row is the same row.
DLQ_PREFIX = "dlq_"
FLAGGED = ("phone", "name", "owner")  # roles with a --ROLE-column override
_KEYS = {role: {header_key(alias) for alias in names} for role, names in ALIASES.items()}


class ColumnError(ValueError):
    """The header cannot be mapped; the message says what to do (without the file name)."""


class MissingPhone(ColumnError):
    pass


def unique_headers(cells: list[str]) -> list[str]:
    """Cleaned headers, usable as dict keys: empty → _col_N, repeated → name_2."""
    out: list[str] = []
    seen: set[str] = set()
    for i, cell in enumerate(cells, 1):
        header = clean_header(cell) or f"_col_{i}"
        candidate, n = header, 2
        while candidate in seen:
            candidate, n = f"{header}_{n}", n + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def _shown(headers: list[str]) -> str:
    # One line, even for a wide file of long headers.
    names = [h if len(h) <= 30 else h[:29] + "…" for h in headers[:15]]
    more = f" (+{len(headers) - 15} more)" if len(headers) > 15 else ""
    return ", ".join(names) + more if names else "(none)"


def _mojibake_hint(headers: list[str]) -> str:
    # "鎵嬫満鍙" is 手机号 in UTF-8 read as GBK, "æ‰‹æœº" the same read as Latin-1: say so,
    # because the fix (re-export as UTF-8 / --encoding) is not where the operator looks.
    for header in headers:
        for wrong in ("gb18030", "cp1252", "latin-1"):
            try:
                fixed = header.encode(wrong).decode("utf-8", errors="ignore")
            except UnicodeError:
                continue
            if fixed != header and any(k and header_key(fixed).startswith(k) for k in _KEYS["phone"]):
                return (f" The header {header!r} looks like {fixed!r} decoded with the wrong encoding:"
                        " re-save the file as CSV UTF-8 or pass --encoding.")
    return ""


def role_of(header: str) -> str | None:
    key = header_key(header)
    return next((role for role in ROLES if key in _KEYS[role]), None)


def _find(headers: list[str], wanted: str, flag: str) -> str:
    exact = [h for h in headers if h == clean_header(wanted)]
    loose = exact or [h for h in headers if header_key(h) == header_key(wanted)]
    if not loose:
        raise ColumnError(f"{flag} {wanted!r} is not a column; found: {_shown(headers)}")
    if len(loose) > 1:
        raise ColumnError(f"{flag} {wanted!r} matches several columns: {_shown(loose)}; "
                          "rename one of them in the file")
    return loose[0]


def resolve_columns(headers: list[str], phone: str | None = None, name: str | None = None,
                    owner: str | None = None) -> dict[str, str | None]:
    """Map each role to a header. Overrides (--phone-column...) win over aliases."""
    overrides = {"phone": phone, "name": name, "owner": owner}
    columns: dict[str, str | None] = {}
    for role in ROLES:
        if overrides.get(role):
            columns[role] = _find(headers, overrides[role], f"--{role}-column")
    taken = set(columns.values())
    for role in ROLES:
        if role in columns:
            continue
        matches = [h for h in headers if h not in taken and header_key(h) in _KEYS[role]]
        if len(matches) > 1:
            fix = f"pass --{role}-column with the one to use" if role in FLAGGED else "rename one of them"
            raise ColumnError(f"two {role} columns: {_shown(matches)}; {fix}")
        columns[role] = matches[0] if matches else None
    if columns["phone"] is None:
        raise MissingPhone(f"no phone column; found: {_shown(headers)}. Name the phone column one of "
                           f"{', '.join(ALIASES['phone'])}, or pass --phone-column HEADER."
                           + _mojibake_hint(headers))
    return columns
