"""The queue, results and ledger interface every backend implements.

A lead moves through the stages `add` then `welcome` (then `writeback`, when configured). Per stage it is in exactly one
state: ready, delayed (waiting for a retry), leased (a worker has it), done, dead (in the
DLQ with errcode and reason) or skipped (the welcome ledger says this customer was already
greeted in this campaign). So at every moment, per campaign and stage:

    entered = ready + delayed + leased + done + dead + skipped

and for the add stage `entered` is the number of leads imported (duplicates are not
entered; they are counted as `skipped` at import).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

# writeback: optional; a lead enters it when its outcome is final (add dead, or welcome
# done / skipped / dead), once per final outcome (a replay that ends again writes back again).
STAGES = ("add", "welcome", "writeback")
STATES = ("ready", "delayed", "leased", "done", "dead", "skipped")
STORE_FORMAT = 3  # 2: leads and ready queues in their own SQLite tables; 3: compact lead records


@dataclass
class NewLead:
    phone: str
    name: str | None
    owner: str | None
    fields: dict[str, str]
    source: str
    row: int
    raw: str = ""  # the phone as written in the file (for reports; not stored)


@dataclass
class PutResult:
    accepted: int = 0
    revived: int = 0  # dead letters replaced by a fixed row and queued again
    duplicates: list[tuple[NewLead, int]] = field(default_factory=list)  # (lead, original id)


@dataclass(eq=False)  # identity: a worker keeps the items in hand in a set
class Leased:
    """A leased item: the lead's record as it was when leased, and the lease key."""

    id: int
    stage: str
    key: str
    lead: dict[str, Any]
    expires: float
    token: str = ""  # identifies this lease across renewals

    @property
    def deliveries(self) -> int:
        return self.lead[self.stage]["deliveries"]

    @property
    def attempts(self) -> int:
        return self.lead[self.stage]["attempts"]

    @property
    def intent(self) -> float | None:
        """When an earlier delivery was about to make the call (no outcome recorded)."""
        return self.lead[self.stage].get("intent")


@dataclass
class Failure:
    errcode: int | None
    error: str
    kind: str = "dead"  # the errcode class, or "invalid" / "poison" / "ledger"


class Store(Protocol):
    path: str

    def put_leads(self, campaign: str, leads: list[NewLead], now: float, import_id: str | None = None) -> PutResult: ...

    def take_poisoned(self) -> int: ...

    def lease(self, stage: str, lease_s: float, now: float) -> Leased | None: ...
    def renew(self, item: Leased, lease_s: float, now: float) -> bool: ...
    def mark_intent(self, item: Leased, now: float) -> bool: ...
    def reclaim(self, now: float, dead_pids: set[int] | None = None) -> int: ...
    def complete(self, item: Leased, now: float, updates: dict[str, Any] | None = None,
                 enqueue_next: bool = False, state: str = "done", called: bool = True) -> None: ...
    def retry(self, item: Leased, due: float, failure: Failure, now: float,
              count_attempt: bool = True, called: bool = True) -> str: ...
    def bury(self, item: Leased, failure: Failure, now: float, called: bool = True) -> None: ...
    def release(self, item: Leased, now: float) -> None: ...
    def maintain(self, now: float) -> int: ...
    def next_wakeup(self) -> float | None: ...
    def counts(self) -> dict[str, Any]: ...
    def recent(self, now: float, minutes: int = 5) -> dict[str, dict[str, dict[str, int]]]: ...
    def dead_by_code(self) -> dict[str, dict[str, dict[str, int]]]: ...
    def oldest_ready(self, now: float) -> dict[str, dict[str, float]]: ...
    def leads(self, campaign: str | None = None) -> Iterator[dict[str, Any]]: ...
    def lead(self, lead_id: int) -> dict[str, Any] | None: ...
    def find_phone(self, campaign: str, phone: str) -> int | None: ...
    def requeue_dead(self, stage: str | None, campaign: str | None, now: float,
                     errcode: int | None = None, limit: int | None = None,
                     dry_run: bool = False, kind: str | None = None) -> int: ...
    def welcome_ledger(self, campaign: str, external_userid: str) -> dict[str, Any] | None: ...
    def check(self) -> list[str]: ...
    def store_id(self) -> str: ...
    def snapshot(self) -> Iterator[tuple[str, Any]]: ...
    def restore(self, records, now: float) -> dict[str, int]: ...
    def has_leases(self) -> bool: ...
    def get_flag(self, name: str) -> Any: ...
    def set_flag(self, name: str, value: Any) -> None: ...
    def close(self) -> None: ...


def _filled(fields: dict | None) -> dict:
    """A lead's columns that hold something: whether a re-imported row is a fix does not
    depend on empty columns (a to-fix file from several sources has the columns of all)."""
    return {k: v for k, v in (fields or {}).items() if v not in ("", None)}


def dead_stage(lead: dict | None) -> str | None:
    """The stage (add, then welcome) a lead died in, or None."""
    if lead is None:
        return None
    return next((st for st in ("add", "welcome") if (lead.get(st) or {}).get("state") == "dead"), None)


def same_row(lead: dict, nl: "NewLead") -> bool:
    """The re-imported row is the lead's row again (name, owner and the columns that hold
    something), not a fix: it would only die again."""
    return (lead.get("name"), lead.get("owner"), _filled(lead.get("fields"))) == (nl.name, nl.owner, _filled(nl.fields))


def revivable_stage(lead: dict | None, nl: "NewLead") -> str | None:
    """The stage a re-imported row brings back: the one its lead died in, when the row is
    a fix (another name, owner or column). DiskStore and the import's dry run judge with
    this; RedisStore's put script does the same in Lua."""
    stage = dead_stage(lead)
    return None if stage is None or same_row(lead, nl) else stage
