"""What a reader produces for each data row: a Lead, a Reject or a Blank.

Readers do not deduplicate: the importer dedupes across files and across imports, by
(campaign, E.164 phone), so the same lead in two files is enqueued once.
"""

from __future__ import annotations

from dataclasses import dataclass

# Slotted, not frozen: a frozen dataclass sets each field through object.__setattr__,
# which at a million rows is seconds of an import.


@dataclass(slots=True)
class Lead:
    """One accepted row."""

    phone: str  # E.164, e.g. "+8613800138000"
    name: str | None
    owner: str | None  # staff userid from an owner column, else None
    fields: dict[str, str]  # every column by its cleaned header, incl. `_extra_N` (for {templates})
    source: str  # file path as given
    row: int  # data row number, 1-based, header excluded; for JSON/JSONL the record number
    raw: str  # the phone cell as read
    size: int = 0  # characters in the row's cells: an import batches by size as well as count


@dataclass(slots=True)
class Reject:
    """A row that cannot be imported, with a reason an operator can act on.

    The reason starts with a fixed class ("too short", "contains letters", ...), then
    ": " and the detail, so reports can group rejects by the text before the colon.
    """

    source: str
    row: int
    raw: str
    reason: str


@dataclass(slots=True)
class Blank:
    """A row whose cells are all empty (Excel leaves these behind); counts as nothing."""

    source: str
    row: int
