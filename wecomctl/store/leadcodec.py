"""How the embedded store writes a lead record: its values in a fixed key order.

A pickled dict repeats every key name in every record: the keys were two thirds of a
lead (427 of its bytes, half a gigabyte at a million leads), and pickling them a third
of an import's store time. So a lead is pickled as a tuple of its values in the order of
LEAD_KEYS, each stage's record as a tuple in the order of STAGE_KEYS. Nothing is lost
whatever a record holds: a key it lacks is written as ABSENT, and keys not listed here
(a stage may add its own) go into a trailing dict.

Records written as plain pickled dicts (store format 2) are read as they are.
"""

from __future__ import annotations

import pickle
from typing import Any

from wecomctl.store.base import STAGES

LEAD_KEYS = ("id", "campaign", "phone", "name", "owner", "fields", "source", "row", "imported_at",
             "external_userid")
STAGE_KEYS = ("state", "qkey", "attempts", "deliveries", "calls", "errcode", "error", "kind", "at", "intent",
              "lease")
ABSENT = Ellipsis  # never a value of a lead: it marks a key the record does not have
_KNOWN = frozenset(LEAD_KEYS) | frozenset(STAGES)
_KNOWN_STAGE = frozenset(STAGE_KEYS)
_PROTOCOL = pickle.HIGHEST_PROTOCOL


def _pack_stage(record: dict | None):
    if not isinstance(record, dict):
        return record  # None, or ABSENT
    extra = {k: v for k, v in record.items() if k not in _KNOWN_STAGE} or None
    return tuple([record.get(k, ABSENT) for k in STAGE_KEYS]), extra


def _unpack_stage(packed) -> dict | None:
    if not isinstance(packed, tuple):
        return packed
    values, extra = packed
    record = {k: v for k, v in zip(STAGE_KEYS, values) if v is not ABSENT}
    if extra:
        record.update(extra)
    return record


def new_stage(state: str | None, qkey: str | None, now: float) -> tuple:
    """A stage record as it starts, in STAGE_KEYS order."""
    return (state, qkey, 0, 0, 0, None, None, None, now, None, None)


def pack(lead: dict[str, Any]) -> bytes:
    values = tuple([lead.get(k, ABSENT) for k in LEAD_KEYS])
    stages = tuple([_pack_stage(lead.get(s, ABSENT)) for s in STAGES])
    extra = {k: v for k, v in lead.items() if k not in _KNOWN} or None
    return pickle.dumps((values, stages, extra), _PROTOCOL)


def pack_new(values: tuple, add: tuple) -> bytes:
    """pack() of a just-imported lead, from its LEAD_KEYS values and its add record
    (new_stage): the import's hot path builds no dict."""
    return pickle.dumps((values, ((add, None), ABSENT, ABSENT), None), _PROTOCOL)


def unpack(blob: bytes) -> dict[str, Any]:
    obj = pickle.loads(blob)
    if isinstance(obj, dict):
        return obj  # written as a dict (store format 2)
    values, stages, extra = obj
    lead = {k: v for k, v in zip(LEAD_KEYS, values) if v is not ABSENT}
    for stage, packed in zip(STAGES, stages):
        if packed is not ABSENT:
            lead[stage] = _unpack_stage(packed)
    if extra:
        lead.update(extra)
    return lead
