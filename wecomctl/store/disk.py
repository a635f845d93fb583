"""The embedded store: one diskcache (SQLite, WAL) directory, safe for many processes.

Every state change is one `transact()` (SQLite BEGIN IMMEDIATE), so a process killed at
any instant leaves either the old state or the new one, never half of each.

Leads and the ready queues are two plain SQLite tables in diskcache's own database, written
through its connection inside its transactions: an import inserts a batch of leads with
one executemany, where diskcache would cost several statements and triggers per key (an
import was write-bound at about 5,000 leads/s). Everything else is diskcache keys.

Tables:
  lead(id, campaign, phone, data)     the lead (leadcodec: its values pickled in a fixed key
                                      order) and, per stage, {state, qkey,
                                      attempts, deliveries, calls, errcode, error, kind, at,
                                      intent, lease}; UNIQUE(campaign, phone) is the dedupe
  ready_{stage}(n, lead)              FIFO of ready lead ids; a lead's qkey "ready:{stage}:{n}"

Key layout (all string keys):
  meta.format                         store format version (checked on open)
  campaigns                           list of campaign names
  ledger:welcome:{campaign}:{euid}    a customer greeted in that campaign (idempotency)
  n:{campaign}:{stage}:{state}        counters, changed in the same transaction as the state
  n:{campaign}:imported / :dupes      import counters
  q.{stage}.delay-{due_ms:015d}.{id}  retries, ordered by due time
  q.{stage}.lease-{exp_ms:015d}.{id}.{n}  leases, ordered by expiry
  flag:{name}                         run-wide flags (fatal stop, ...)

Ready entries are checked when pulled: an entry whose lead no longer points at it (the
lead was finished by a late ack after its lease expired) is dropped, so no extra work.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import diskcache

from wecomctl.errors import StoreError
from wecomctl.faults import crash_point
from wecomctl.store.base import (
    STAGES,
    STATES,
    STORE_FORMAT,
    Failure,
    Leased,
    NewLead,
    PutResult,
    dead_stage,
    same_row,
)
from wecomctl.store.leadcodec import STAGE_KEYS, new_stage, pack, pack_new, unpack

MAINTAIN_BATCH = 200
READS_FORMATS = (2, STORE_FORMAT)


def _ms(t: float) -> str:
    return f"{int(t * 1000):015d}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



def _stage_record(state: str | None, qkey: str | None, now: float) -> dict[str, Any]:
    """A lead's record of one stage, as it starts."""
    return dict(zip(STAGE_KEYS, new_stage(state, qkey, now)))


def _dlq_code(st: dict[str, Any]) -> str:
    """What a dead letter is counted under: its errcode, else its kind (poison, invalid...)."""
    return str(st["errcode"]) if st.get("errcode") is not None else (st.get("kind") or "dead")


def _final(stage: str, state: str) -> bool:
    """Is this the lead's last outcome (nothing more will happen to it)?"""
    return (stage == "add" and state == "dead") or (stage == "welcome" and state in ("done", "skipped", "dead"))


def _minute(t: float) -> int:
    return int(t // 60)


def _due(prefix: str, key: str) -> float:
    """The time encoded in a delay or lease key."""
    return int(key[len(prefix) + 1:len(prefix) + 16]) / 1000


class DiskStore:
    def __init__(self, data_dir: str, max_attempts: int = 6, max_deliveries: int = 5, create: bool = True,
                 writeback: bool = False):
        self.path = str(Path(data_dir) / "store")
        self.writeback = writeback  # queue each final outcome for the write-back stage
        self.max_attempts = max_attempts
        self.max_deliveries = max_deliveries
        if not create and not Path(self.path).exists():
            raise StoreError(f"no wecomctl data in {data_dir} (run `wecomctl import` first, or pass --data-dir)")
        try:
            Path(self.path).mkdir(parents=True, exist_ok=True)
            # Never evict: this is a queue, not a cache.
            self.cache = diskcache.Cache(
                self.path, eviction_policy="none", size_limit=2**62, cull_limit=0,
                statistics=False, tag_index=False, timeout=60,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the store in {self.path}: {exc} (check the path exists, is writable and has free space)") from None
        self._old_format = False  # a format-2 store not yet written to (see _check_format)
        self._check_format()
        self._create_tables()
        self._lease_seq = 0
        self._seq_lock = threading.Lock()
        self._judged: dict[str, set[int]] = {}  # per import: dead leads a row was judged against
        self._poisoned = 0  # items lease() dead-lettered as poison, not yet taken

    # -- plumbing ---------------------------------------------------------------
    @contextmanager
    def _tx(self):
        try:
            with self.cache.transact():
                yield self.cache
        except diskcache.Timeout:
            raise StoreError(f"the store in {self.path} stayed locked for 60 s (another process hung?)") from None
        except sqlite3.OperationalError as exc:
            raise StoreError(f"store {self.path}: {exc} (disk full or read-only? free space or fix permissions, then run again; nothing was lost)") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"store {self.path} is damaged or not a wecomctl store: {exc}") from None

    def _check_format(self) -> None:
        with self._tx() as c:
            found = c.get("meta.format")
            if found is None:
                c.set("meta.format", STORE_FORMAT)
                # Names this store in write-back idempotency keys (lead ids repeat across stores).
                c.set("meta.id", uuid.uuid4().hex[:12])
            elif found in READS_FORMATS and found != STORE_FORMAT:
                # Format 2 wrote leads as pickled dicts, which unpack() still reads. New
                # records are tuples, which an older wecomctl cannot read: the store says
                # format 3 from the first record written (see _wrote), not on a mere open
                # (status, check and dry runs leave it as it was).
                self._old_format = True
            elif found != STORE_FORMAT:
                raise StoreError(
                    f"store {self.path} has format {found}, this wecomctl reads format {STORE_FORMAT}: "
                    "use the wecomctl version that wrote it, or a new --data-dir"
                )

    def _create_tables(self) -> None:
        with self._tx():
            db = self._db()
            db.execute("CREATE TABLE IF NOT EXISTS lead (id INTEGER PRIMARY KEY, campaign TEXT NOT NULL,"
                       " phone TEXT NOT NULL, data BLOB NOT NULL)")
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS lead_phone ON lead (campaign, phone)")
            for stage in STAGES:
                db.execute(f"CREATE TABLE IF NOT EXISTS ready_{stage} (n INTEGER PRIMARY KEY, lead INTEGER NOT NULL)")

    def _db(self) -> sqlite3.Connection:
        """diskcache's connection for this thread: statements on it join its transaction."""
        return self.cache._con

    def _load(self, lead_id) -> dict[str, Any] | None:
        row = self._db().execute("SELECT data FROM lead WHERE id = ?", (lead_id,)).fetchone()
        return unpack(row[0]) if row else None

    def _save(self, lead: dict[str, Any]) -> None:
        self._wrote()
        self._db().execute("UPDATE lead SET data = ? WHERE id = ?", (pack(lead), lead["id"]))

    def _wrote(self) -> None:
        """Called in the transaction that writes a lead record."""
        if self._old_format:
            self.cache.set("meta.format", STORE_FORMAT)
            self._old_format = False

    def _push(self, stage: str, lead_id: int) -> str:
        cur = self._db().execute(f"INSERT INTO ready_{stage} (lead) VALUES (?)", (lead_id,))
        return f"ready:{stage}:{cur.lastrowid}"

    def _pull(self, stage: str) -> tuple[str | None, int | None]:
        db = self._db()
        row = db.execute(f"SELECT n, lead FROM ready_{stage} ORDER BY n LIMIT 1").fetchone()
        if row is None:
            return None, None
        db.execute(f"DELETE FROM ready_{stage} WHERE n = ?", (row[0],))
        return f"ready:{stage}:{row[0]}", row[1]

    def _ready_entry(self, key: str) -> int | None:
        _, stage, n = key.split(":")
        row = self._db().execute(f"SELECT lead FROM ready_{stage} WHERE n = ?", (int(n),)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self.cache.close()

    @staticmethod
    def _count(c, campaign: str, stage: str, state: str, delta: int) -> None:
        c.incr(f"n:{campaign}:{stage}:{state}", delta, default=0)

    def _move(self, c, lead: dict, stage: str, state: str, now: float, qkey: str | None = None,
              counted: bool = True, **extra) -> None:
        """Change a lead's state in one stage, keeping queue entries and counters in step
        (counted=False: the caller counts a whole batch itself, in the same transaction)."""
        st = lead.get(stage)
        if st is None:
            st = lead[stage] = _stage_record(None, None, now)
        old, oldkey = st["state"], st["qkey"]
        if oldkey and oldkey != qkey and old in ("delayed", "leased"):
            c.delete(oldkey)
        if old == "dead" and state != "dead":
            c.incr(f"dlq:{lead['campaign']}:{stage}:{_dlq_code(st)}", -1, default=0)
        if old != state and counted:
            if old is not None:
                self._count(c, lead["campaign"], stage, old, -1)
            self._count(c, lead["campaign"], stage, state, +1)
        st["state"] = state
        st["qkey"] = qkey
        st["at"] = now
        if state != "leased":
            # An outcome (or an operator's replay) settles whatever call was intended.
            # Only a lease that expires keeps it: see maintain().
            st["intent"] = None
            st["lease"] = None
        st.update(extra)
        if state != old and state in ("done", "dead"):
            self._tick(c, lead["campaign"], stage, state, now)
        if state == "dead" and old != "dead":
            c.incr(f"dlq:{lead['campaign']}:{stage}:{_dlq_code(st)}", 1, default=0)
        if state == "ready" and qkey is None:
            st["qkey"] = self._push(stage, lead["id"])
        if self.writeback and state != old and _final(stage, state):
            # Each final outcome is written back once; the version tells a replay's new
            # outcome from a retry of the old one (it is part of the idempotency key).
            wb = lead.get("writeback") or {}
            self._move(c, lead, "writeback", "ready", now, attempts=0, deliveries=0,
                       version=(wb.get("version") or 0) + 1)
            return  # that move saved the lead
        self._save(lead)

    # -- import -------------------------------------------------------------------
    def put_leads(self, campaign: str, leads: list[NewLead], now: float, import_id: str | None = None) -> PutResult:
        res = PutResult()
        # An import writes a lot: let this connection's WAL grow to ~80 MB between
        # checkpoints (each one fsyncs); at 1M rows that took the commits from 17 s to 10 s.
        self._db().execute("PRAGMA wal_autocheckpoint = 20000")
        with self._tx() as c:
            db = self._db()
            camps = c.get("campaigns", [])
            if campaign not in camps:
                c.set("campaigns", camps + [campaign])
            # The transaction holds the write lock: ids, queue numbers and counters are
            # taken once per batch, and the batch's earlier leads are read in one query.
            known = self._ids_by_phone(campaign, [nl.phone for nl in leads])
            seq = db.execute("SELECT coalesce(max(id), 0) FROM lead").fetchone()[0]
            new: list[tuple[int, NewLead]] = []
            for nl in leads:
                first = known.get(nl.phone)
                if first is not None:
                    if self._revive(c, first, nl, now, import_id):
                        res.revived += 1
                        continue
                    res.duplicates.append((nl, first))
                    continue
                seq += 1
                known[nl.phone] = seq
                new.append((seq, nl))
            if new:
                # Queue numbers are taken after any revive above pushed its own entry.
                ready = db.execute("SELECT coalesce(max(n), 0) FROM ready_add").fetchone()[0]
                rows, entries = [], []
                for lead_id, nl in new:
                    ready += 1
                    values = (lead_id, campaign, nl.phone, nl.name, nl.owner, nl.fields, nl.source, nl.row, now, None)
                    add = new_stage("ready", f"ready:add:{ready}", now)
                    rows.append((lead_id, campaign, nl.phone, pack_new(values, add)))
                    entries.append((ready, lead_id))
                self._wrote()
                db.executemany("INSERT INTO lead (id, campaign, phone, data) VALUES (?, ?, ?, ?)", rows)
                db.executemany("INSERT INTO ready_add (n, lead) VALUES (?, ?)", entries)
                res.accepted = len(new)
                self._count(c, campaign, "add", "ready", res.accepted)
                c.incr(f"n:{campaign}:imported", res.accepted, default=0)
            if res.duplicates:
                c.incr(f"n:{campaign}:dupes", len(res.duplicates), default=0)
        return res

    def _ids_by_phone(self, campaign: str, phones: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        for i in range(0, len(phones), 500):  # well under SQLite's bound-variable limit
            chunk = phones[i:i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self._db().execute(
                f"SELECT phone, id FROM lead WHERE campaign = ? AND phone IN ({marks})", [campaign, *chunk]))
        return found

    def _revive(self, c, lead_id: int, nl: NewLead, now: float, import_id: str | None = None) -> bool:
        """A fixed row re-imported over its dead letter replaces the lead's data and
        queues the stage that died again (the welcome ledger still guards greetings).
        Within one import only the first row for a dead lead is judged: a file holding
        the phone twice must not revive it again on every import."""
        lead = self._load(lead_id)
        stage = dead_stage(lead)
        if stage is None:
            return False
        if import_id is not None:
            judged = self._judged.setdefault(import_id, set())  # dead leads only: small
            if lead_id in judged:
                return False
            judged.add(lead_id)
        if same_row(lead, nl):
            return False
        lead.update(name=nl.name, owner=nl.owner, fields=nl.fields, source=nl.source, row=nl.row)
        self._move(c, lead, stage, "ready", now, attempts=0, deliveries=0, errcode=None, error=None, kind=None)
        return True

    # -- leasing ------------------------------------------------------------------
    def lease(self, stage: str, lease_s: float, now: float) -> Leased | None:
        with self._tx() as c:
            while True:
                key, lid = self._pull(stage)
                if key is None:
                    return None
                lead = self._load(lid)
                if lead is None or lead.get(stage, {}).get("qkey") != key:
                    continue  # stale entry: the lead has moved on
                st = lead[stage]
                if st["deliveries"] >= self.max_deliveries:
                    # It was leased this often and never finished: it keeps killing workers.
                    # Its intent stays: a worker may have died after the call went out, and
                    # a replay (retry-dlq) must settle that call before making it again.
                    self._move(c, lead, stage, "dead", now, errcode=None, kind="poison", intent=st.get("intent"),
                               error=f"poison: leased {st['deliveries']} times without an outcome (a worker died each time)")
                    with self._seq_lock:
                        self._poisoned += 1
                    continue
                with self._seq_lock:
                    self._lease_seq += 1
                    token = f"{os.getpid()}-{self._lease_seq}"
                expires = now + lease_s
                lkey = f"q.{stage}.lease-{_ms(expires)}.{lid}.{token}"
                c.set(lkey, lid)
                self._move(c, lead, stage, "leased", now, qkey=lkey, deliveries=st["deliveries"] + 1, lease=token)
                return Leased(lid, stage, lkey, lead, expires, token)

    def _holds(self, lead: dict | None, item: Leased) -> bool:
        """Does this worker still hold the lease? (The token survives renewals.)"""
        return (lead is not None and lead[item.stage]["state"] == "leased"
                and lead[item.stage].get("lease") == item.token)

    def renew(self, item: Leased, lease_s: float, now: float) -> bool:
        """Extend a lease while its call waits or runs."""
        with self._tx() as c:
            lead = self._load(item.id)
            if not self._holds(lead, item):
                return False
            expires = now + lease_s
            lkey = f"q.{item.stage}.lease-{_ms(expires)}.{item.id}.{item.token}"
            c.set(lkey, item.id)
            self._move(c, lead, item.stage, "leased", now, qkey=lkey)
            item.key, item.expires = lkey, expires
            return True

    def reclaim(self, now: float, dead_pids: set[int] | None = None) -> int:
        """Return the leases of worker processes that are gone to ready at once, instead
        of waiting for them to expire. dead_pids None: every pid not running now."""
        moved = 0
        for stage in STAGES:
            for key in self._keys(f"q.{stage}.lease-"):
                try:
                    pid = int(key.rsplit(".", 1)[1].split("-")[0])
                except (IndexError, ValueError):
                    continue
                if (pid not in dead_pids) if dead_pids is not None else _alive(pid):
                    continue
                with self._tx() as c:
                    moved += self._back_to_ready(c, stage, key, c.get(key), now)
        return moved

    def _back_to_ready(self, c, stage: str, key: str, lid, now: float) -> int:
        """A due retry or a lapsed lease (expired, or its worker is gone) goes back to ready.
        The intent stays: a lapsed holder may have been mid-call, and the next holder must
        not repeat it blindly. Returns 1 if moved, 0 for an entry no lead points at."""
        lead = self._load(lid) if lid is not None else None
        if lead is None or lead[stage]["qkey"] != key:
            return 0
        self._move(c, lead, stage, "ready", now, intent=lead[stage].get("intent"))
        return 1

    def _keys(self, prefix: str) -> list[str]:
        """Keys starting with prefix, through SQLite's key index (diskcache has no public
        range scan; a full iteration would read every lead)."""
        sql = getattr(self.cache, "_sql", None)
        if sql is None:
            return [k for k in self.cache.iterkeys() if isinstance(k, str) and k.startswith(prefix)]
        rows = sql("SELECT key FROM Cache WHERE key >= ? AND key < ? AND raw = 1", (prefix, prefix + "\uffff")).fetchall()
        return [r[0] for r in rows]

    def take_poisoned(self) -> int:
        """How many items this store's lease() dead-lettered as poison since last asked
        (a run counts them as its own dead letters)."""
        with self._seq_lock:
            n, self._poisoned = self._poisoned, 0
        return n

    def mark_intent(self, item: Leased, now: float) -> bool:
        """Record, before a call with a side effect, that it is about to be made.

        False if the lease was lost meanwhile (then the call must not be made)."""
        with self._tx():
            lead = self._load(item.id)
            if not self._holds(lead, item):
                return False
            lead[item.stage]["intent"] = now
            self._save(lead)
            item.lead = lead
            return True

    def _current(self, c, item: Leased) -> dict | None:
        """The lead, if this outcome should still be recorded.

        A late outcome (the lease expired and the item went back to ready, or another
        worker has it) is still the truth about what happened, so it is recorded; only an
        item that already has a final state keeps it.
        """
        lead = self._load(item.id)
        if lead is None:
            return None
        if lead[item.stage]["state"] in ("done", "dead", "skipped"):
            return None
        return lead

    def complete(self, item: Leased, now: float, updates: dict[str, Any] | None = None,
                 enqueue_next: bool = False, state: str = "done", called: bool = True) -> None:
        with self._tx() as c:
            lead = self._current(c, item)
            if lead is None:
                return
            if item.stage == "writeback" and lead["writeback"].get("version") != item.lead["writeback"].get("version"):
                return  # a newer outcome arrived meanwhile and is queued: it must still go out
            if updates:
                lead.update(updates)
            calls = lead[item.stage].get("calls", 0) + (1 if called else 0)
            self._move(c, lead, item.stage, state, now, errcode=None, error=None, kind=None, calls=calls)
            if item.stage == "welcome" and state == "done" and lead.get("external_userid"):
                c.set(f"ledger:welcome:{lead['campaign']}:{lead['external_userid']}",
                      {"lead": lead["id"], "at": now})
            if enqueue_next and item.stage == "add":
                self._move(c, lead, "welcome", "ready", now)

    def retry(self, item: Leased, due: float, failure: Failure, now: float, count_attempt: bool = True,
              called: bool = True) -> str:
        with self._tx() as c:
            lead = self._current(c, item)
            if lead is None:
                return "gone"
            st = lead[item.stage]
            attempts = st["attempts"] + (1 if count_attempt else 0)
            info = dict(errcode=failure.errcode, error=failure.error, kind=failure.kind, attempts=attempts,
                        calls=st.get("calls", 0) + (1 if called else 0))
            if called:
                self._tick(c, lead["campaign"], item.stage, "failed", now)
            if count_attempt and attempts >= self.max_attempts:
                info["error"] = f"{failure.error} (gave up after {attempts} attempts)"
                self._move(c, lead, item.stage, "dead", now, **info)
                return "dead"
            dkey = f"q.{item.stage}.delay-{_ms(due)}.{item.id}"
            c.set(dkey, item.id)
            # A retry is a fresh delivery: the lease that ended in a known outcome does not
            # count toward the poison limit.
            self._move(c, lead, item.stage, "delayed", now, qkey=dkey, deliveries=max(0, st["deliveries"] - 1), **info)
            return "delayed"

    def bury(self, item: Leased, failure: Failure, now: float, called: bool = True) -> None:
        with self._tx() as c:
            lead = self._current(c, item)
            if lead is None:
                return
            st = lead[item.stage]
            n = 1 if called else 0
            if called:
                self._tick(c, lead["campaign"], item.stage, "failed", now)
            self._move(c, lead, item.stage, "dead", now, errcode=failure.errcode, error=failure.error,
                       kind=failure.kind, attempts=st["attempts"] + n, calls=st.get("calls", 0) + n)

    def release(self, item: Leased, now: float) -> None:
        """Give an item back untouched (shutdown, fatal stop): no attempt, no delivery."""
        with self._tx() as c:
            lead = self._load(item.id)
            if not self._holds(lead, item):
                return
            st = lead[item.stage]
            self._move(c, lead, item.stage, "ready", now, deliveries=max(0, st["deliveries"] - 1))

    def maintain(self, now: float) -> int:
        """Move due retries and expired leases back to ready. Returns how many moved."""
        moved = 0
        for stage in STAGES:
            for kind in ("delay", "lease"):
                prefix = f"q.{stage}.{kind}"
                for _ in range(MAINTAIN_BATCH):
                    key, _lid = self.cache.peek(prefix=prefix)
                    if key is None or _due(prefix, key) > now:
                        break
                    with self._tx() as c:
                        # Look again inside the transaction: another process may have
                        # taken that entry, and the new front may not be due yet.
                        key, _lid = c.peek(prefix=prefix)
                        if key is None or _due(prefix, key) > now:
                            break
                        key, lid = c.pull(prefix=prefix)
                        moved += self._back_to_ready(c, stage, key, lid, now)
        return moved

    def next_wakeup(self) -> float | None:
        """The earliest due retry or lease expiry, or None when there are none."""
        times = []
        for stage in STAGES:
            for kind in ("delay", "lease"):
                prefix = f"q.{stage}.{kind}"
                key, _ = self.cache.peek(prefix=prefix)
                if key is not None:
                    times.append(_due(prefix, key))
        return min(times) if times else None

    # -- recent outcomes (for status, error rate and alerts) ---------------------------
    # Per-minute counters m:{campaign}:{stage}:{what}:{minute}, what = done / dead / failed
    # (a call that failed, retried or not), kept for two hours.
    KEEP_MINUTES = 120

    def _tick(self, c, campaign: str, stage: str, what: str, now: float) -> None:
        minute = _minute(now)
        if c.incr(f"m:{campaign}:{stage}:{what}:{minute}", 1, default=0) == 1:
            c.delete(f"m:{campaign}:{stage}:{what}:{minute - self.KEEP_MINUTES}")

    def recent(self, now: float, minutes: int = 5) -> dict[str, dict[str, dict[str, int]]]:
        """{campaign: {stage: {done, dead, failed}}} over the last `minutes` whole minutes
        and the current one."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        last = _minute(now)
        for camp in self.campaigns():
            out[camp] = {}
            for stage in STAGES:
                out[camp][stage] = {
                    what: sum(int(self.cache.get(f"m:{camp}:{stage}:{what}:{m}", 0))
                              for m in range(last - minutes, last + 1))
                    for what in ("done", "dead", "failed")}
        return out

    def dead_by_code(self) -> dict[str, dict[str, dict[str, int]]]:
        """{campaign: {stage: {errcode or kind: n}}} of the dead letters now in the DLQ."""
        out: dict[str, dict[str, dict[str, int]]] = {}
        for key in self._keys("dlq:"):
            _, camp, stage, code = key.split(":", 3)
            n = int(self.cache.get(key, 0))
            if n:
                out.setdefault(camp, {}).setdefault(stage, {})[code] = n
        return out

    def oldest_ready(self, now: float) -> dict[str, dict[str, float]]:
        """{campaign: {stage: seconds the oldest ready item has waited}}. Looks at the front
        of each queue (stale entries are skipped), so it costs the same at any depth."""
        out: dict[str, dict[str, float]] = {}
        for stage in STAGES:
            rows = self._db().execute(f"SELECT n, lead FROM ready_{stage} ORDER BY n LIMIT 200").fetchall()
            for n, lid in rows:
                lead = self._load(lid)
                st = (lead or {}).get(stage) or {}
                if st.get("qkey") != f"ready:{stage}:{n}":
                    continue
                ages = out.setdefault(lead["campaign"], {})
                ages.setdefault(stage, round(max(0.0, now - st["at"]), 1))
        return out

    # -- reading ------------------------------------------------------------------
    def campaigns(self) -> list[str]:
        return list(self.cache.get("campaigns", []))

    def counts(self) -> dict[str, Any]:
        """{campaign: {imported, skipped, stages: {stage: {state: n, entered: n}}}}."""
        out: dict[str, Any] = {}
        for camp in self.campaigns():
            stages = {}
            for stage in STAGES:
                row = {state: int(self.cache.get(f"n:{camp}:{stage}:{state}", 0)) for state in STATES}
                row["entered"] = sum(row.values())
                stages[stage] = row
            out[camp] = {
                "imported": int(self.cache.get(f"n:{camp}:imported", 0)),
                "skipped": int(self.cache.get(f"n:{camp}:dupes", 0)),
                "stages": stages,
            }
        return out

    def find_phone(self, campaign: str, phone: str) -> int | None:
        return self._ids_by_phone(campaign, [phone]).get(phone)

    def lead(self, lead_id: int) -> dict[str, Any] | None:
        return self._load(lead_id)

    def leads(self, campaign: str | None = None) -> Iterator[dict[str, Any]]:
        # Page by id and fetch each page whole: no statement stays open while the caller
        # writes (requeue_dead does), and memory stays flat.
        last = 0
        where, args = ("AND campaign = ?", [campaign]) if campaign is not None else ("", [])
        while True:
            page = self._db().execute(f"SELECT id, data FROM lead WHERE id > ? {where} ORDER BY id LIMIT 1000",
                                      [last, *args]).fetchall()
            if not page:
                return
            for lid, data in page:
                yield unpack(data)
            last = page[-1][0]

    def requeue_dead(self, stage: str | None, campaign: str | None, now: float,
                     errcode: int | None = None, limit: int | None = None, dry_run: bool = False,
                     kind: str | None = None) -> int:
        moved = 0
        stages = [stage] if stage else list(STAGES)
        for lead in self.leads(campaign):
            for st in stages:
                s = lead.get(st)
                if not s or s["state"] != "dead" or (errcode is not None and s["errcode"] != errcode):
                    continue
                if kind is not None and s.get("kind") != kind:
                    continue
                if limit is not None and moved >= limit:
                    return moved
                moved += 1
                if dry_run:
                    continue
                with self._tx() as c:
                    fresh = self._load(lead["id"])
                    if fresh[st]["state"] != "dead":
                        moved -= 1
                        continue
                    # A replay starts the item afresh; the welcome ledger still guards it. A
                    # call that may have gone out (a poison item's intent) is settled first,
                    # unless the operator replays an ambiguous one after checking in WeCom.
                    keep = {} if fresh[st].get("kind") == "ambiguous" else {"intent": fresh[st].get("intent")}
                    self._move(c, fresh, st, "ready", now, attempts=0, deliveries=0, **keep)
                crash_point("retry_dlq.after_move", str(Path(self.path).parent))
        return moved

    def check(self) -> list[str]:
        """Verify the store's invariants; returns what is wrong (empty when all holds).

        Reads a consistent snapshot: the whole check runs in one transaction, so it
        also works while a run is going on (writers wait for it).
        """
        problems: list[str] = []
        with self._tx() as c:
            counted = {camp: {st: {s: 0 for s in STATES} for st in STAGES} for camp in c.get("campaigns", [])}
            referenced: set[str] = set()
            dead_codes: dict[str, int] = {}
            expected = 1
            for lead in self.leads():
                lid, camp = lead["id"], lead["campaign"]
                if lid != expected:
                    problems.append(f"leads {expected} to {lid - 1} are missing (ids are given in sequence)")
                expected = lid + 1
                if self._ids_by_phone(camp, [lead["phone"]]).get(lead["phone"]) != lid:
                    problems.append(f"lead {lid}: its phone's dedupe entry does not point at it")
                for stage in STAGES:
                    st = lead.get(stage)
                    if st is None:
                        continue
                    counted.setdefault(camp, {s2: {s: 0 for s in STATES} for s2 in STAGES})[stage][st["state"]] += 1
                    if st["state"] == "dead":
                        code_key = f"dlq:{camp}:{stage}:{_dlq_code(st)}"
                        dead_codes[code_key] = dead_codes.get(code_key, 0) + 1
                    key = st.get("qkey")
                    if st["state"] in ("ready", "delayed", "leased"):
                        entry = self._ready_entry(key) if key and key.startswith("ready:") else c.get(key) if key else None
                        if entry != lid:
                            problems.append(f"lead {lid} {stage}: {st['state']} but its queue entry is missing")
                        referenced.add(key)
                    if stage == "welcome" and st["state"] == "done" and lead.get("external_userid"):
                        if not c.get(f"ledger:welcome:{camp}:{lead['external_userid']}"):
                            problems.append(f"lead {lid}: welcomed but not in the welcome ledger")
                if lead.get("welcome") and (lead.get("add") or {}).get("state") != "done":
                    problems.append(f"lead {lid}: in the welcome stage although its add is not done")
            for key in c.iterkeys():
                if isinstance(key, str) and key.startswith("q.") and (".lease-" in key or ".delay-" in key):
                    if key not in referenced:
                        problems.append(f"orphan queue entry {key} (no lead points at it)")
            for key in set(self._keys("dlq:")) | set(dead_codes):
                stored = int(c.get(key, 0))
                if stored != dead_codes.get(key, 0):
                    problems.append(f"DLQ counter {key}={stored} but {dead_codes.get(key, 0)} dead letters have that code")
            for camp, stages in counted.items():
                for stage, states in stages.items():
                    for state, n in states.items():
                        stored = int(c.get(f"n:{camp}:{stage}:{state}", 0))
                        if stored != n:
                            problems.append(f"{camp} {stage}: counter {state}={stored} but {n} leads are {state}")
                imported = int(c.get(f"n:{camp}:imported", 0))
                entered = sum(stages["add"].values())
                if imported != entered:
                    problems.append(f"{camp}: imported={imported} but {entered} leads are in the add stage")
                added = stages["add"]["done"]
                welcome_entered = sum(stages["welcome"].values())
                if welcome_entered != added:
                    problems.append(f"{camp}: {added} added but {welcome_entered} in the welcome stage")
        return problems

    # -- copying between stores (wecomctl store copy) ---------------------------------
    def snapshot(self) -> Iterator[tuple[str, Any]]:
        """Everything a copy needs, as records: ("meta", {"id"}), ("campaigns", [...]),
        ("counter", (campaign, "dupes", n)), ("lead", lead) in id order, ("ledger",
        (campaign, external_userid, value)). Read while no run works on the store."""
        yield "meta", {"id": self.store_id()}
        camps = self.campaigns()
        yield "campaigns", camps
        for camp in camps:
            yield "counter", (camp, "dupes", int(self.cache.get(f"n:{camp}:dupes", 0)))
        for lead in self.leads():
            yield "lead", lead
        for key in self._keys("ledger:welcome:"):
            rest, entry = key[len("ledger:welcome:"):], self.cache.get(key)
            # Campaign names and external_userids may both hold ":": the entry's lead says
            # which campaign it belongs to when more than one name fits.
            fits = [c for c in camps if rest.startswith(c + ":")]
            if len(fits) > 1:
                owner = (self.lead((entry or {}).get("lead")) or {}).get("campaign")
                fits = [c for c in fits if c == owner] or fits
            camp = max(fits, key=len) if fits else rest.rsplit(":", 1)[0]
            yield "ledger", (camp, rest[len(camp) + 1:], entry)

    def has_leases(self) -> bool:
        return any(self._keys(f"q.{stage}.lease-") for stage in STAGES)

    def restore(self, records, now: float) -> dict[str, int]:
        """Load a snapshot into this store, which must hold no lead. Queue entries and
        counters are rebuilt from the leads' states; delayed and leased items become ready
        (a leased item keeps its intent, so its next delivery settles it first)."""
        loaded = {"leads": 0, "ledger": 0}
        if self._db().execute("SELECT 1 FROM lead LIMIT 1").fetchone():
            raise StoreError(f"the store {self.path} already holds leads; copy into a new data dir")
        batch: list[dict] = []

        def flush(c) -> None:
            for lead in batch:
                for stage in STAGES:
                    st = lead.get(stage)
                    if not st:
                        continue
                    if st["state"] in ("ready", "delayed", "leased"):
                        st.update(state="ready", qkey=None, lease=None)
                        st["qkey"] = self._push(stage, lead["id"])
                    elif st["state"] == "dead":
                        c.incr(f"dlq:{lead['campaign']}:{stage}:{_dlq_code(st)}", 1, default=0)
                    self._count(c, lead["campaign"], stage, st["state"], 1)
                self._wrote()
                self._db().execute("INSERT INTO lead (id, campaign, phone, data) VALUES (?, ?, ?, ?)",
                                   (lead["id"], lead["campaign"], lead["phone"], pack(lead)))
                c.incr(f"n:{lead['campaign']}:imported", 1, default=0)
            loaded["leads"] += len(batch)
            batch.clear()

        with self._tx() as c:
            for kind, value in records:
                if kind == "meta":
                    c.set("meta.id", value["id"])
                elif kind == "campaigns":
                    c.set("campaigns", list(value))
                elif kind == "counter":
                    camp, name, n = value
                    c.set(f"n:{camp}:{name}", int(n))
                elif kind == "lead":
                    batch.append(value)
                    if len(batch) >= 1000:
                        flush(c)
                elif kind == "ledger":
                    camp, euid, entry = value
                    c.set(f"ledger:welcome:{camp}:{euid}", entry)
                    loaded["ledger"] += 1
            flush(c)
        return loaded

    def store_id(self) -> str:
        return self.cache.get("meta.id") or "store"

    def welcome_ledger(self, campaign: str, external_userid: str) -> dict[str, Any] | None:
        return self.cache.get(f"ledger:welcome:{campaign}:{external_userid}")

    def get_flag(self, name: str) -> Any:
        return self.cache.get(f"flag:{name}")

    def set_flag(self, name: str, value: Any) -> None:
        with self._tx() as c:
            if value is None:
                c.delete(f"flag:{name}")
            else:
                c.set(f"flag:{name}", value)
