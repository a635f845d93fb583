"""The shared store: one Redis (standalone, 7.x) that workers on several machines use.

Same semantics as `DiskStore`: every state change is one Lua script (EVALSHA), so Redis
runs it whole or not at all and no other client sees half of it; the counters, queue
entries and the welcome ledger change in the same script as the lead's state.

Stages are `STAGES` (add, welcome, writeback): with `writeback=True`, each final outcome
(add dead, or welcome done / skipped / dead) moves the lead's writeback stage to ready in
the same script, with a new version.

Key layout (every key starts with "{namespace}:"; the scripts build keys from that prefix,
so the store needs a standalone Redis, not a cluster):

  meta.format                    layout version (checked on open)
  meta.id                        random 12-hex id given at creation (names the store in
                                 write-back idempotency keys; lead ids repeat across stores)
  seq                            last lead id given (INCR; ids are 1, 2, 3, ... with no gap)
  campaigns                      LIST of campaign names, in order of first import
  lead:{id}                      HASH, one field per lead key (campaign, phone, name, owner,
                                 fields, source, row, imported_at, external_userid, and what
                                 `complete(updates=...)` adds) and one per stage record key
                                 ("add.state", "add.qkey", "add.attempts", "welcome.intent",
                                 ...; the writeback stage also has "writeback.version", the
                                 final outcome it writes back: 1, 2, ... per final outcome);
                                 every value is JSON written by Python, and the scripts
                                 store the numbers they are given as text, so a timestamp
                                 round-trips exactly (Lua's cjson would keep 14 digits)
  phones:{campaign}              HASH phone -> lead id (the dedupe)
  n:{campaign}                   HASH counters "{stage}:{state}", "imported", "dupes"
  dlq:{campaign}                 HASH "{stage}:{code}" -> dead letters now in the DLQ with
                                 that code (the errcode, else the kind: "poison", ...);
                                 a field is deleted when it reaches 0
  m:{campaign}:{minute}          HASH "{stage}:{what}" -> outcomes in that minute
                                 (int(now // 60)), what = done / dead (a stage entered that
                                 state) or failed (a call that failed, retried or not);
                                 EXPIRE about two hours
  readyseq:{stage}               INCR numbering the ready entries
  ready:{stage}                  LIST of "{n}:{id}", RPUSH/LPOP (FIFO); the lead's qkey
                                 is "ready:{stage}:{n}"
  delay:{stage}                  ZSET member "{id}", score the due time; qkey "delay:{stage}:{id}"
  lease:{stage}                  ZSET member "{id}:{token}", score the expiry;
                                 qkey "lease:{stage}:{id}:{token}"
  ledger:welcome:{campaign}:{euid}  JSON {"lead", "at"}: a customer greeted in that campaign
  flag:{name}                    JSON value of a run-wide flag (fatal stop, ...)
  import:{import id}             SET of dead lead ids a row of that import was judged
                                 against (only the first row for a phone may revive its
                                 lead); EXPIRE a day

Lease tokens are "{hostname}-{pid}-{n}": workers on several hosts share one Redis, and a
pid only means something on its own host (see `reclaim`).

Ready entries are checked when pulled, as in DiskStore: an entry its lead no longer points
at is dropped.

`snapshot` / `restore` (wecomctl store copy) carry the leads' hashes, the campaigns, the
"dupes" counters, meta.id and the ledger; restore rebuilds everything else above from the
leads (seq, phones, n, dlq, the ready lists; delayed and leased items become ready) and
leaves m:* and flag:* behind.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterable, Iterator
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from wecomctl.errors import StoreError, Unavailable
from wecomctl.store import redact_url, unknown_url_parameters
from wecomctl.store.base import STAGES, STATES, Failure, Leased, NewLead, PutResult

# The Redis key layout's own version (not DiskStore's STORE_FORMAT: another layout).
REDIS_FORMAT = 1
MAINTAIN_BATCH = 200
PUT_BATCH = 1000  # leads per script call
PAGE = 1000  # leads per read round trip


def _j(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _glob_escape(text: str) -> str:
    """text matched literally in a SCAN MATCH pattern."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _restore_args(lead: dict[str, Any]) -> list[Any]:
    """A snapshot's lead as the restore script's arguments: id, campaign, phone, the stages
    to queue, then its hash (one field per lead key and per stage record key, JSON values).
    A delayed or leased stage becomes ready, its intent kept and its lease token cleared;
    the script sets its qkey to the new ready entry."""
    fields: dict[str, Any] = {}
    queue = []
    for key, value in lead.items():
        if key in STAGES and isinstance(value, dict):
            rec = dict(value)
            if rec.get("state") in ("ready", "delayed", "leased"):
                rec.update(state="ready", qkey=None, lease=None)
                queue.append(key)
            for field, v in rec.items():
                fields[f"{key}.{field}"] = v
        else:
            fields[key] = value
    fields["id"] = int(lead["id"])
    pairs: list[Any] = []
    for field, value in fields.items():
        pairs += [field, _j(value)]
    return [int(lead["id"]), lead["campaign"], lead["phone"], ",".join(queue), len(fields), *pairs]


def _decode(text: str | None) -> dict[str, Any] | None:
    """A lead from the JSON text of its hash (see lead_json): stage fields regrouped."""
    if not text:
        return None
    lead: dict[str, Any] = {}
    for field, value in json.loads(text).items():
        stage, dot, key = field.partition(".")
        if dot and stage in STAGES:
            lead.setdefault(stage, {})[key] = value
        else:
            lead[field] = value
    return lead


# Helpers every script starts with. ARGV[1] is the key prefix "{namespace}:"; the last
# ARGV is the write-back switch ("1" or "0"), which `_run` appends to every call and the
# prelude takes off, so each script sees only its own arguments.
_PRELUDE = r"""
local WB = table.remove(ARGV) == '1'
local P = ARGV[1]
local NULL = cjson.null
local function dec(v)
  if not v then return nil end
  local x = cjson.decode(v)
  if x == NULL then return nil end
  return x
end
local function enc(s)
  if s == nil then return 'null' end
  return cjson.encode(s)
end
local function int(n) return string.format('%d', n) end
local function lkey(lid) return P .. 'lead:' .. lid end
-- A lead's hash as one JSON object text ({"name": ..., "add.state": ..., ...}): one reply
-- string per lead instead of two per field, and the values go out as Python wrote them.
local function lead_json(lid)
  local flat = redis.call('HGETALL', lkey(lid))
  if #flat == 0 then return false end
  local parts = {}
  for i = 1, #flat, 2 do parts[#parts + 1] = cjson.encode(flat[i]) .. ':' .. flat[i + 1] end
  return '{' .. table.concat(parts, ',') .. '}'
end
local function count(camp, stage, state, delta)
  redis.call('HINCRBY', P .. 'n:' .. camp, stage .. ':' .. state, delta)
end
local function push(stage, lid)
  local n = redis.call('INCR', P .. 'readyseq:' .. stage)
  redis.call('RPUSH', P .. 'ready:' .. stage, n .. ':' .. lid)
  return 'ready:' .. stage .. ':' .. n
end
local function unqueue(qkey)
  local kind, stage, member = string.match(qkey, '^(%a+):(%a+):(.+)$')
  if kind == 'delay' or kind == 'lease' then
    redis.call('ZREM', P .. kind .. ':' .. stage, member)
  end
end
-- The stage record fields a new stage starts with (DiskStore's _stage_record).
local function fresh(stage, now)
  local f = stage .. '.'
  return {f .. 'state', 'null', f .. 'qkey', 'null', f .. 'attempts', '0', f .. 'deliveries', '0',
          f .. 'calls', '0', f .. 'errcode', 'null', f .. 'error', 'null', f .. 'kind', 'null',
          f .. 'at', now, f .. 'intent', 'null', f .. 'lease', 'null'}
end
-- Per-minute outcome counters (DiskStore's _tick): HASH m:{campaign}:{minute}, field
-- "{stage}:{what}", what = done / dead / failed; each minute's hash expires after two hours.
local KEEP_S = 7260
local function tick(camp, stage, what, now)
  local k = P .. 'm:' .. camp .. ':' .. int(math.floor(tonumber(now) / 60))
  redis.call('HINCRBY', k, stage .. ':' .. what, 1)
  redis.call('EXPIRE', k, KEEP_S)
end
-- What a dead letter is counted under (DiskStore's _dlq_code): its errcode, else its kind.
-- errcode and kind are the JSON texts of the stage record; an integer errcode's JSON text
-- is Python's str() of it.
local function dlq_code(errcode, kind)
  local e = dec(errcode)
  if e ~= nil then
    if type(e) == 'string' then return e end
    return errcode
  end
  local k = dec(kind)
  if k == nil or k == '' then return 'dead' end
  return tostring(k)
end
local function dlq(camp, stage, code, delta)
  local k = P .. 'dlq:' .. camp
  if redis.call('HINCRBY', k, stage .. ':' .. code, delta) == 0 then
    redis.call('HDEL', k, stage .. ':' .. code)
  end
end
-- Is this the lead's last outcome (nothing more will happen to it)?
local function final(stage, state)
  return (stage == 'add' and state == 'dead') or
         (stage == 'welcome' and (state == 'done' or state == 'skipped' or state == 'dead'))
end
-- Change a lead's state in one stage, keeping queue entries, counters (states, per-minute
-- outcomes, DLQ codes) and the write-back stage in step.
-- extra: stage record field -> JSON text, applied last (it may keep the intent).
local function move(lid, stage, state, now, qkey, extra)
  local k = lkey(lid)
  local f = stage .. '.'
  local h = redis.call('HMGET', k, f .. 'state', f .. 'qkey', 'campaign', f .. 'errcode', f .. 'kind')
  if not h[1] then
    redis.call('HSET', k, unpack(fresh(stage, now)))
  end
  local old, oldkey, camp = dec(h[1]), dec(h[2]), dec(h[3])
  if oldkey and oldkey ~= qkey and (old == 'delayed' or old == 'leased') then
    unqueue(oldkey)
  end
  if old == 'dead' and state ~= 'dead' then
    dlq(camp, stage, dlq_code(h[4] or 'null', h[5] or 'null'), -1)
  end
  if old ~= state then
    if old then count(camp, stage, old, -1) end
    count(camp, stage, state, 1)
  end
  local set = {state = enc(state), at = now}
  if state ~= 'leased' then
    -- An outcome (or an operator's replay) settles whatever call was intended. Only a
    -- lapsed lease keeps it: the caller passes it back in extra.
    set.intent = 'null'
    set.lease = 'null'
  end
  for field, v in pairs(extra or {}) do set[field] = v end
  if state == 'ready' and qkey == nil then qkey = push(stage, lid) end
  set.qkey = enc(qkey)
  local args = {}
  for field, v in pairs(set) do
    args[#args + 1] = f .. field
    args[#args + 1] = v
  end
  redis.call('HSET', k, unpack(args))
  if state ~= old and (state == 'done' or state == 'dead') then tick(camp, stage, state, now) end
  if state == 'dead' and old ~= 'dead' then
    dlq(camp, stage, dlq_code(set.errcode or h[4] or 'null', set.kind or h[5] or 'null'), 1)
  end
  if WB and state ~= old and final(stage, state) then
    -- Each final outcome is written back once; the version tells a replay's new outcome
    -- from a retry of the old one (it is part of the idempotency key).
    local version = tonumber(dec(redis.call('HGET', k, 'writeback.version')) or 0)
    move(lid, 'writeback', 'ready', now, nil, {attempts = '0', deliveries = '0', version = int(version + 1)})
  end
end
-- Does this lease token still hold the lead? (The token survives renewals.)
local function holds(lid, stage, token)
  local h = redis.call('HMGET', lkey(lid), stage .. '.state', stage .. '.lease')
  return h[1] and dec(h[1]) == 'leased' and dec(h[2]) == token
end
-- Should an outcome for this lead still be recorded? A late outcome is the truth about
-- what happened, so yes, unless the stage already has a final state.
local function current(lid, stage)
  local s = redis.call('HGET', lkey(lid), stage .. '.state')
  if not s then return false end
  s = dec(s)
  return not (s == 'done' or s == 'dead' or s == 'skipped')
end
-- A due retry or a lapsed lease goes back to ready, keeping the intent (a lapsed holder
-- may have been mid-call). 0 for an entry its lead does not point at.
local function back_to_ready(stage, kind, member, now)
  local lid = string.match(member, '^(%d+)')
  if not lid then return 0 end
  local h = redis.call('HMGET', lkey(lid), stage .. '.qkey', stage .. '.intent')
  if not h[1] or dec(h[1]) ~= kind .. ':' .. stage .. ':' .. member then return 0 end
  move(lid, stage, 'ready', now, nil, {intent = h[2] or 'null'})
  return 1
end
"""

# ARGV: P, campaign, campaign JSON, now, count, import id ('' for none), then per lead:
# phone, name, owner, fields, source, row (JSON). Returns {accepted, revived, {index,
# original id, ...}}. import:{id} holds the dead leads a row of that import was judged
# against (a day, then it expires): only the first row for a phone may revive it.
_PUT = r"""
local camp, campj, now, n, import_id = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
if not redis.call('LPOS', P .. 'campaigns', camp) then
  redis.call('RPUSH', P .. 'campaigns', camp)
end
local phones = P .. 'phones:' .. camp
-- A fixed row re-imported over its dead letter replaces the lead's data and queues the
-- stage that died again (the welcome ledger still guards greetings).
-- Two leads' columns (JSON objects) hold the same, empty columns aside (as DiskStore's
-- _filled): a to-fix file from several sources has the columns of all.
local function same_filled(a, b)
  if a == b then return true end
  if not a or not b then return false end
  local x, y = cjson.decode(a), cjson.decode(b)
  if type(x) ~= 'table' or type(y) ~= 'table' then return false end
  for key, v in pairs(x) do
    if v ~= '' and v ~= cjson.null and y[key] ~= v then return false end
  end
  for key, v in pairs(y) do
    if v ~= '' and v ~= cjson.null and x[key] ~= v then return false end
  end
  return true
end
local function revive(lid, b)
  local k = lkey(lid)
  local stage = nil
  for _, st in ipairs({'add', 'welcome'}) do
    if dec(redis.call('HGET', k, st .. '.state')) == 'dead' then stage = st break end
  end
  if not stage then return false end
  if import_id ~= '' then
    local judged = P .. 'import:' .. import_id
    if redis.call('SADD', judged, lid) == 0 then return false end
    redis.call('EXPIRE', judged, 86400)
  end
  local h = redis.call('HMGET', k, 'name', 'owner', 'fields')
  if h[1] == ARGV[b + 1] and h[2] == ARGV[b + 2] and same_filled(h[3], ARGV[b + 3]) then
    return false  -- the same row again, not a fix: it would only die again
  end
  redis.call('HSET', k, 'name', ARGV[b + 1], 'owner', ARGV[b + 2], 'fields', ARGV[b + 3],
             'source', ARGV[b + 4], 'row', ARGV[b + 5])
  move(lid, stage, 'ready', now, nil,
       {attempts = '0', deliveries = '0', errcode = 'null', error = 'null', kind = 'null'})
  return true
end
local known = {}  -- phone -> id: a string for the leads already stored (HMGET, one call)
if n > 0 then
  local ph = {}
  for i = 0, n - 1 do ph[#ph + 1] = ARGV[7 + i * 6] end
  local ids = redis.call('HMGET', phones, unpack(ph))
  for i, id in ipairs(ids) do if id then known[ph[i]] = id end end
end
local seq = tonumber(redis.call('GET', P .. 'seq') or '0')
local new, dups, revived = {}, {}, 0
for i = 0, n - 1 do
  local b = 7 + i * 6
  local phone = ARGV[b]
  local first = known[phone]
  if first and type(first) == 'string' and revive(first, b) then
    revived = revived + 1
  elseif first then
    dups[#dups + 1] = i
    dups[#dups + 1] = tonumber(first)
  else
    new[#new + 1] = b
    known[phone] = seq + #new  -- a number: a later row of this batch is its duplicate
  end
end
-- Ids, queue numbers and counters are taken once for the batch; queue entries after any
-- revive above pushed its own, as in DiskStore.
if #new > 0 then
  redis.call('SET', P .. 'seq', seq + #new)
  local first_n = redis.call('INCRBY', P .. 'readyseq:add', #new) - #new
  local pairs_, entries = {}, {}
  for j, b in ipairs(new) do
    local lid, qn = int(seq + j), int(first_n + j)
    pairs_[#pairs_ + 1] = ARGV[b]
    pairs_[#pairs_ + 1] = lid
    entries[#entries + 1] = qn .. ':' .. lid
    redis.call('HSET', lkey(lid), 'id', lid, 'campaign', campj, 'phone', cjson.encode(ARGV[b]),
               'name', ARGV[b + 1], 'owner', ARGV[b + 2], 'fields', ARGV[b + 3],
               'source', ARGV[b + 4], 'row', ARGV[b + 5], 'imported_at', now,
               'external_userid', 'null',
               'add.state', '"ready"', 'add.qkey', '"ready:add:' .. qn .. '"', 'add.attempts', '0',
               'add.deliveries', '0', 'add.calls', '0', 'add.errcode', 'null', 'add.error', 'null',
               'add.kind', 'null', 'add.at', now, 'add.intent', 'null', 'add.lease', 'null')
  end
  redis.call('HSET', phones, unpack(pairs_))
  redis.call('RPUSH', P .. 'ready:add', unpack(entries))
  count(camp, 'add', 'ready', #new)
  redis.call('HINCRBY', P .. 'n:' .. camp, 'imported', #new)
end
if #dups > 0 then
  redis.call('HINCRBY', P .. 'n:' .. camp, 'dupes', #dups / 2)
end
return {#new, revived, dups}
"""

# ARGV: P, stage, now, expires, token, max_deliveries. Returns {items dead-lettered as
# poison on the way, the leased lead's hash (absent when none)}.
_LEASE = r"""
local stage, now, expires, token, maxd = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local poisoned = 0
while true do
  local e = redis.call('LPOP', P .. 'ready:' .. stage)
  if not e then return {poisoned} end
  local n, lid = string.match(e, '^(%d+):(%d+)$')
  local h = redis.call('HMGET', lkey(lid), stage .. '.qkey', stage .. '.deliveries')
  if h[1] and dec(h[1]) == 'ready:' .. stage .. ':' .. n then
    local d = tonumber(h[2])
    if d >= maxd then
      -- It was leased this often and never finished: it keeps killing workers. Its intent
      -- stays: a replay must settle a call that may have gone out (as in DiskStore).
      move(lid, stage, 'dead', now, nil, {errcode = 'null', kind = '"poison"',
           intent = redis.call('HGET', lkey(lid), stage .. '.intent') or 'null',
           error = enc('poison: leased ' .. int(d) .. ' times without an outcome (a worker died each time)')})
      poisoned = poisoned + 1
    else
      local member = lid .. ':' .. token
      redis.call('ZADD', P .. 'lease:' .. stage, expires, member)
      move(lid, stage, 'leased', now, 'lease:' .. stage .. ':' .. member,
           {deliveries = int(d + 1), lease = enc(token)})
      return {poisoned, lead_json(lid)}
    end
  end
  -- else a stale entry: the lead has moved on
end
"""

# ARGV: P, id, stage, token, expires, now. Returns 1 if renewed.
_RENEW = r"""
local lid, stage, token, expires, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if not holds(lid, stage, token) then return 0 end
local member = lid .. ':' .. token
redis.call('ZADD', P .. 'lease:' .. stage, expires, member)
move(lid, stage, 'leased', now, 'lease:' .. stage .. ':' .. member, {})
return 1
"""

# ARGV: P, id, stage, token, now. Returns the lead's hash, or nil if the lease was lost.
_INTENT = r"""
local lid, stage, token, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not holds(lid, stage, token) then return false end
redis.call('HSET', lkey(lid), stage .. '.intent', now)
return lead_json(lid)
"""

# ARGV: P, stage, member, now. Returns 1 if the lease went back to ready.
_RECLAIM = r"""
return back_to_ready(ARGV[2], 'lease', ARGV[3], ARGV[4])
"""

# ARGV: P, id, stage, now, state, called (0/1), enqueue_next (0/1), the leased writeback
# version (JSON), then update pairs (field, JSON). Returns 1 if recorded.
_COMPLETE = r"""
local lid, stage, now, state = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local called, enqueue = tonumber(ARGV[6]), ARGV[7] == '1'
if not current(lid, stage) then return 0 end
local k = lkey(lid)
if stage == 'writeback' and dec(redis.call('HGET', k, 'writeback.version')) ~= dec(ARGV[8]) then
  return 0  -- a newer outcome arrived meanwhile and is queued: it must still go out
end
if #ARGV > 8 then redis.call('HSET', k, unpack(ARGV, 9)) end
local calls = tonumber(redis.call('HGET', k, stage .. '.calls') or '0') + called
move(lid, stage, state, now, nil, {errcode = 'null', error = 'null', kind = 'null', calls = int(calls)})
if stage == 'welcome' and state == 'done' then
  local h = redis.call('HMGET', k, 'external_userid', 'campaign')
  local euid = dec(h[1])
  if type(euid) == 'string' and euid ~= '' then
    redis.call('SET', P .. 'ledger:welcome:' .. dec(h[2]) .. ':' .. euid,
               '{"at":' .. now .. ',"lead":' .. lid .. '}')
  end
end
if enqueue and stage == 'add' then move(lid, 'welcome', 'ready', now, nil, {}) end
return 1
"""

# ARGV: P, id, stage, due, now, errcode JSON, error JSON, kind JSON, count_attempt, called,
# max_attempts. Returns "gone", "dead" or "delayed".
_RETRY = r"""
local lid, stage, due, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local errcode, err, kind = ARGV[6], ARGV[7], ARGV[8]
local counted, called, maxa = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
if not current(lid, stage) then return 'gone' end
local f = stage .. '.'
local h = redis.call('HMGET', lkey(lid), f .. 'attempts', f .. 'deliveries', f .. 'calls')
local attempts = tonumber(h[1]) + counted
local info = {errcode = errcode, error = err, kind = kind, attempts = int(attempts),
              calls = int(tonumber(h[3] or '0') + called)}
if called == 1 then tick(dec(redis.call('HGET', lkey(lid), 'campaign')), stage, 'failed', now) end
if counted == 1 and attempts >= maxa then
  info.error = enc(tostring(dec(err) or 'None') .. ' (gave up after ' .. int(attempts) .. ' attempts)')
  move(lid, stage, 'dead', now, nil, info)
  return 'dead'
end
redis.call('ZADD', P .. 'delay:' .. stage, due, lid)
-- A retry is a fresh delivery: the lease that ended in a known outcome does not count
-- toward the poison limit.
info.deliveries = int(math.max(0, tonumber(h[2]) - 1))
move(lid, stage, 'delayed', now, 'delay:' .. stage .. ':' .. lid, info)
return 'delayed'
"""

# ARGV: P, id, stage, now, errcode JSON, error JSON, kind JSON, called (0/1).
_BURY = r"""
local lid, stage, now = ARGV[2], ARGV[3], ARGV[4]
local called = tonumber(ARGV[8])
if not current(lid, stage) then return 0 end
local f = stage .. '.'
local h = redis.call('HMGET', lkey(lid), f .. 'attempts', f .. 'calls', 'campaign')
if called == 1 then tick(dec(h[3]), stage, 'failed', now) end
move(lid, stage, 'dead', now, nil, {errcode = ARGV[5], error = ARGV[6], kind = ARGV[7],
     attempts = int(tonumber(h[1]) + called), calls = int(tonumber(h[2] or '0') + called)})
return 1
"""

# ARGV: P, id, stage, token, now. Give an item back untouched: no attempt, no delivery.
_RELEASE = r"""
local lid, stage, token, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if not holds(lid, stage, token) then return 0 end
local d = tonumber(redis.call('HGET', lkey(lid), stage .. '.deliveries'))
move(lid, stage, 'ready', now, nil, {deliveries = int(math.max(0, d - 1))})
return 1
"""

# ARGV: P, stage, kind ("delay" or "lease"), now, batch. Returns how many moved.
_MAINTAIN = r"""
local stage, kind, now, batch = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local z = P .. kind .. ':' .. stage
local moved = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, batch)) do
  redis.call('ZREM', z, member)
  moved = moved + back_to_ready(stage, kind, member, now)
end
return moved
"""

# ARGV: P, id, stage, now. A replay starts the item afresh; the welcome ledger still guards it.
_REQUEUE = r"""
local lid, stage, now = ARGV[2], ARGV[3], ARGV[4]
local h = redis.call('HMGET', lkey(lid), stage .. '.state', stage .. '.kind', stage .. '.intent')
if not h[1] or dec(h[1]) ~= 'dead' then return 0 end
-- As DiskStore.requeue_dead: a possible call is settled first, unless the operator
-- replays an ambiguous item after checking it in WeCom.
local intent = 'null'
if dec(h[2] or 'null') ~= 'ambiguous' then intent = h[3] or 'null' end
move(lid, stage, 'ready', now, nil, {attempts = '0', deliveries = '0', intent = intent})
return 1
"""

# ARGV: P. Returns the list of problems (DiskStore.check's messages).
_CHECK = r"""
local STAGES = {'add', 'welcome', 'writeback'}
local STATES = {'ready', 'delayed', 'leased', 'done', 'dead', 'skipped'}
local problems = {}
local function problem(s) problems[#problems + 1] = s end
local camps, counted = {}, {}
local function tally(camp)
  if not counted[camp] then
    counted[camp] = {}
    for _, st in ipairs(STAGES) do
      counted[camp][st] = {}
      for _, s in ipairs(STATES) do counted[camp][st][s] = 0 end
    end
    camps[#camps + 1] = camp
  end
  return counted[camp]
end
for _, camp in ipairs(redis.call('LRANGE', P .. 'campaigns', 0, -1)) do tally(camp) end
-- every queue entry: ready entries by number, delay and lease entries by qkey
local ready, entries, entry_order = {}, {}, {}
for _, st in ipairs(STAGES) do
  ready[st] = {}
  for _, e in ipairs(redis.call('LRANGE', P .. 'ready:' .. st, 0, -1)) do
    local n, lid = string.match(e, '^(%d+):(%d+)$')
    ready[st][n] = lid
  end
  for _, kind in ipairs({'delay', 'lease'}) do
    for _, m in ipairs(redis.call('ZRANGE', P .. kind .. ':' .. st, 0, -1)) do
      local q = kind .. ':' .. st .. ':' .. m
      entries[q] = string.match(m, '^(%d+)')
      entry_order[#entry_order + 1] = q
    end
  end
end
local referenced = {}
local dead_codes = {}  -- campaign -> "{stage}:{code}" -> dead letters with that code
local FIELDS = {'campaign', 'phone', 'external_userid'}
for _, st in ipairs(STAGES) do
  for _, x in ipairs({'state', 'qkey', 'errcode', 'kind'}) do FIELDS[#FIELDS + 1] = st .. '.' .. x end
end
local seq = tonumber(redis.call('GET', P .. 'seq') or '0')
local expected = 1
for lid = 1, seq do
  local v = redis.call('HMGET', lkey(lid), unpack(FIELDS))
  if v[1] then
    local h = {}
    for i, field in ipairs(FIELDS) do h[field] = v[i] end
    local id = tostring(lid)
    if lid ~= expected then
      problem('leads ' .. int(expected) .. ' to ' .. int(lid - 1) .. ' are missing (ids are given in sequence)')
    end
    expected = lid + 1
    local camp, phone = dec(h['campaign']), dec(h['phone'])
    if redis.call('HGET', P .. 'phones:' .. camp, phone) ~= id then
      problem('lead ' .. id .. ": its phone's dedupe entry does not point at it")
    end
    local c = tally(camp)
    for _, stage in ipairs(STAGES) do
      local state = dec(h[stage .. '.state'])
      if state then
        c[stage][state] = c[stage][state] + 1
        if state == 'dead' then
          local codes = dead_codes[camp] or {}
          dead_codes[camp] = codes
          local key = stage .. ':' .. dlq_code(h[stage .. '.errcode'] or 'null', h[stage .. '.kind'] or 'null')
          codes[key] = (codes[key] or 0) + 1
        end
        local q = dec(h[stage .. '.qkey'])
        if state == 'ready' or state == 'delayed' or state == 'leased' then
          local found = nil
          if q then
            local kind, st, member = string.match(q, '^(%a+):(%a+):(.+)$')
            if kind == 'ready' then found = ready[st] and ready[st][member] else found = entries[q] end
            referenced[q] = true
          end
          if found ~= id then
            problem('lead ' .. id .. ' ' .. stage .. ': ' .. state .. ' but its queue entry is missing')
          end
        end
        if stage == 'welcome' and state == 'done' then
          local euid = dec(h['external_userid'])
          if type(euid) == 'string' and euid ~= '' and
             redis.call('EXISTS', P .. 'ledger:welcome:' .. camp .. ':' .. euid) == 0 then
            problem('lead ' .. id .. ': welcomed but not in the welcome ledger')
          end
        end
      end
    end
    if h['welcome.state'] and dec(h['add.state']) ~= 'done' then
      problem('lead ' .. id .. ': in the welcome stage although its add is not done')
    end
  end
end
if expected <= seq then
  problem('leads ' .. int(expected) .. ' to ' .. int(seq) .. ' are missing (ids are given in sequence)')
end
for _, q in ipairs(entry_order) do
  if not referenced[q] then problem('orphan queue entry ' .. q .. ' (no lead points at it)') end
end
for _, camp in ipairs(camps) do
  local codes, stored_codes, seen = dead_codes[camp] or {}, {}, {}
  local flat = redis.call('HGETALL', P .. 'dlq:' .. camp)
  for i = 1, #flat, 2 do stored_codes[flat[i]] = tonumber(flat[i + 1]) end
  local keys = {}
  for key in pairs(stored_codes) do keys[#keys + 1] = key seen[key] = true end
  for key in pairs(codes) do if not seen[key] then keys[#keys + 1] = key end end
  table.sort(keys)
  for _, key in ipairs(keys) do
    local s, n = stored_codes[key] or 0, codes[key] or 0
    if s ~= n then
      problem('DLQ counter dlq:' .. camp .. ':' .. key .. '=' .. int(s) .. ' but ' .. int(n) ..
              ' dead letters have that code')
    end
  end
  local stored = {}
  flat = redis.call('HGETALL', P .. 'n:' .. camp)
  for i = 1, #flat, 2 do stored[flat[i]] = tonumber(flat[i + 1]) end
  local stages = counted[camp]
  local entered = {}
  for _, stage in ipairs(STAGES) do
    entered[stage] = 0
    for _, state in ipairs(STATES) do
      local n = stages[stage][state]
      entered[stage] = entered[stage] + n
      local s = stored[stage .. ':' .. state] or 0
      if s ~= n then
        problem(camp .. ' ' .. stage .. ': counter ' .. state .. '=' .. int(s) .. ' but ' .. int(n) .. ' leads are ' .. state)
      end
    end
  end
  local imported = stored['imported'] or 0
  if imported ~= entered['add'] then
    problem(camp .. ': imported=' .. int(imported) .. ' but ' .. int(entered['add']) .. ' leads are in the add stage')
  end
  if entered['welcome'] ~= stages['add']['done'] then
    problem(camp .. ': ' .. int(stages['add']['done']) .. ' added but ' .. int(entered['welcome']) .. ' in the welcome stage')
  end
end
return problems
"""

# ARGV: P. Returns {campaign, stage, at JSON, ...}: per stage, for the first 200 entries of
# its ready list that their lead still points at, the lead's campaign and when it became ready.
_OLDEST = r"""
local out = {}
for _, stage in ipairs({'add', 'welcome', 'writeback'}) do
  local seen = {}
  for _, e in ipairs(redis.call('LRANGE', P .. 'ready:' .. stage, 0, 199)) do
    local n, lid = string.match(e, '^(%d+):(%d+)$')
    local h = redis.call('HMGET', lkey(lid), 'campaign', stage .. '.qkey', stage .. '.at')
    if h[1] and dec(h[2]) == 'ready:' .. stage .. ':' .. n and not seen[h[1]] then
      seen[h[1]] = true  -- the front of the list: that campaign's oldest in this stage
      out[#out + 1] = dec(h[1])
      out[#out + 1] = stage
      out[#out + 1] = h[3]
    end
  end
end
return out
"""

# ARGV: P, then lead ids. Returns each lead as JSON text (false where there is none).
_READ = r"""
local out = {}
for i = 2, #ARGV do out[#out + 1] = lead_json(ARGV[i]) end
return out
"""

# ARGV: P, the last lead id already restored (0 before the first batch), count, then per
# lead: id, campaign, phone, the stages to queue ("add,welcome" or ""), the number of hash
# field/value pairs, the pairs (JSON values; a queued stage's state already "ready").
# Returns the number of leads written, or a text saying why none was.
_RESTORE = r"""
local after, n = ARGV[2], tonumber(ARGV[3])
-- Everything is checked before the first write: a script that fails halfway keeps what
-- it wrote.
if (redis.call('GET', P .. 'seq') or '0') ~= after then
  return 'the store got leads from elsewhere while the copy was loading it'
end
local leads, seen = {}, {}
local b = 4
for i = 1, n do
  local x = {id = ARGV[b], camp = ARGV[b + 1], phone = ARGV[b + 2], queue = ARGV[b + 3],
             first = b + 5, last = b + 4 + 2 * tonumber(ARGV[b + 4])}
  b = x.last + 1
  local dkey = x.camp .. '\0' .. x.phone
  if redis.call('EXISTS', lkey(x.id)) == 1 then return 'lead ' .. x.id .. ' is already in the store' end
  if seen[dkey] or redis.call('HEXISTS', P .. 'phones:' .. x.camp, x.phone) == 1 then
    return 'campaign ' .. x.camp .. ' has two leads with the phone ' .. x.phone
  end
  seen[dkey] = true
  leads[i] = x
end
local listed = {}
local last = after
for _, x in ipairs(leads) do
  if not listed[x.camp] then
    if not redis.call('LPOS', P .. 'campaigns', x.camp) then redis.call('RPUSH', P .. 'campaigns', x.camp) end
    listed[x.camp] = true
  end
  local k = lkey(x.id)
  redis.call('HSET', k, unpack(ARGV, x.first, x.last))
  redis.call('HSET', P .. 'phones:' .. x.camp, x.phone, x.id)
  -- In id order, so the copy's ready queues hand the items out in id order.
  for stage in string.gmatch(x.queue, '%a+') do
    redis.call('HSET', k, stage .. '.qkey', enc(push(stage, x.id)))
  end
  for _, stage in ipairs({'add', 'welcome', 'writeback'}) do
    local f = stage .. '.'
    local h = redis.call('HMGET', k, f .. 'state', f .. 'errcode', f .. 'kind')
    local state = h[1] and dec(h[1])
    if state then
      count(x.camp, stage, state, 1)
      if state == 'dead' then dlq(x.camp, stage, dlq_code(h[2] or 'null', h[3] or 'null'), 1) end
    end
  end
  redis.call('HINCRBY', P .. 'n:' .. x.camp, 'imported', 1)
  last = x.id
end
redis.call('SET', P .. 'seq', last)
return n
"""

_SCRIPTS = {
    "put": _PUT, "lease": _LEASE, "renew": _RENEW, "intent": _INTENT, "reclaim": _RECLAIM,
    "complete": _COMPLETE, "retry": _RETRY, "bury": _BURY, "release": _RELEASE,
    "maintain": _MAINTAIN, "requeue": _REQUEUE, "check": _CHECK, "read": _READ, "oldest": _OLDEST,
    "restore": _RESTORE,
}


class RedisStore:
    def __init__(self, url: str, namespace: str = "wecomctl", max_attempts: int = 6, max_deliveries: int = 5,
                 create: bool = True, writeback: bool = False):
        self.path = redact_url(url)
        self.namespace = namespace
        self.writeback = writeback  # queue each final outcome for the write-back stage
        self.max_attempts = max_attempts
        self.max_deliveries = max_deliveries
        self._p = f"{namespace}:"
        parts = urlsplit(url)
        password = parts.password or ""
        for key, value in (q.split("=", 1) for q in parts.query.split("&") if "=" in q):
            if key.lower() == "password":
                password = unquote(value)
        self._secrets = [s for s in {password, unquote(password)} if s]
        unknown = unknown_url_parameters(url)
        if unknown:
            raise StoreError(f"the store URL {self.path} has an unknown parameter {unknown[0]!r}; wecomctl knows "
                             "?namespace=NAME, redis-py knows ?db=N, ?socket_timeout=S, ?password=... (a typo?)")
        try:
            self.r = redis.Redis.from_url(
                url, decode_responses=True, socket_connect_timeout=5, socket_timeout=60,
                health_check_interval=30,
                # Reconnect once after a dropped connection (a Redis restart, an idle
                # connection cut by a firewall). A timeout is not retried: the script may
                # have run, and a resend would apply it twice.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1,
                            supported_errors=(redis.exceptions.ConnectionError,)),
            )
        except (ValueError, redis.RedisError) as exc:
            raise StoreError(f"cannot use the store URL {self.path}: {self._scrub(exc)} "
                             "(expected redis://[user[:password]@]host[:port]/db, rediss://... or unix:///path.sock)") from None
        kw = self.r.connection_pool.connection_kwargs
        self._where = kw.get("path") or f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"
        self._scripts = {name: self.r.register_script(_PRELUDE + body) for name, body in _SCRIPTS.items()}
        self._host = socket.gethostname()
        self._lease_seq = itertools.count(1)
        self._seq_lock = threading.Lock()
        self._poisoned = 0  # items lease() dead-lettered as poison, not yet taken
        self._check_format(create)

    # -- plumbing ---------------------------------------------------------------
    def _scrub(self, exc: BaseException) -> str:
        msg = str(exc) or type(exc).__name__
        for secret in self._secrets:
            msg = msg.replace(secret, "***")
        return msg

    @contextmanager
    def _errors(self):
        """Translate redis-py's errors into StoreError, saying what to do (never the password)."""
        where, store = self._where, f"{self.path} (namespace {self.namespace})"
        try:
            yield
        except redis.exceptions.AuthenticationError as exc:
            raise StoreError(f"Redis at {where} refused the credentials of the store URL {store}: "
                             f"{self._scrub(exc)} (check the user and password in the URL)") from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            # Unavailable: a run waits and tries again (see pipeline/patience.py); a command
            # such as `status` says it and stops.
            raise Unavailable(f"cannot reach the store at {store}: {self._scrub(exc)} "
                              f"(is Redis running at {where}? check the store URL)") from None
        except redis.exceptions.ReadOnlyError as exc:
            raise StoreError(f"Redis at {where} is a read-only replica: {self._scrub(exc)} "
                             "(point the store URL at the primary)") from None
        except redis.exceptions.ResponseError as exc:
            msg = self._scrub(exc)
            if msg.startswith("OOM"):
                raise StoreError(f"Redis at {where} is out of memory: {msg} (raise maxmemory or free memory, "
                                 "then run again; nothing was lost)") from None
            if msg.startswith(("BUSY", "LOADING")):
                raise Unavailable(f"Redis at {where} is busy running a long script (a `wecomctl check` of a "
                                 f"big store?): {msg} (wait for it to end, then run again)") from None
            if msg.startswith("NOAUTH") or msg.startswith("NOPERM"):
                raise StoreError(f"Redis at {where} refused the store {store}: {msg} "
                                 "(check the user, password and ACL in the URL)") from None
            raise StoreError(f"store {store}: Redis at {where} answered: {msg}") from None
        except redis.RedisError as exc:
            raise StoreError(f"store {store}: {type(exc).__name__}: {self._scrub(exc)}") from None

    def _run(self, name: str, *args, client=None):
        # The last argument is the write-back switch: the prelude takes it off (see _PRELUDE).
        return self._scripts[name](keys=[], args=[self._p, *args, int(self.writeback)], client=client)

    def _check_format(self, create: bool) -> None:
        key = self._p + "meta.format"
        with self._errors():
            found = self.r.get(key)
            if found is None:
                if not create:
                    raise StoreError(f"no wecomctl data in {self.path} under namespace {self.namespace} "
                                     "(run `wecomctl import` first, or check the store URL and namespace)")
                self.r.set(key, REDIS_FORMAT, nx=True)
                # Names this store in write-back idempotency keys (lead ids repeat across stores).
                self.r.set(self._p + "meta.id", uuid.uuid4().hex[:12], nx=True)
                found = self.r.get(key)
        if str(found) != str(REDIS_FORMAT):
            raise StoreError(
                f"store {self.path} (namespace {self.namespace}) has format {found}, this wecomctl reads "
                f"format {REDIS_FORMAT}: use the wecomctl version that wrote it, or another namespace"
            )

    def close(self) -> None:
        self.r.close()

    def _token(self) -> str:
        with self._seq_lock:
            n = next(self._lease_seq)
        return f"{self._host}-{os.getpid()}-{n}"

    # -- import -------------------------------------------------------------------
    def put_leads(self, campaign: str, leads: list[NewLead], now: float, import_id: str | None = None) -> PutResult:
        """One script per 1,000 leads, all of them in one MULTI/EXEC: one round trip, and
        the whole call applies at once as DiskStore's one transaction does."""
        res = PutResult()
        nowj = _j(now)
        with self._errors():
            pipe = self.r.pipeline(transaction=True)
            for start in range(0, max(len(leads), 1), PUT_BATCH):  # an empty batch still lists the campaign
                chunk = leads[start:start + PUT_BATCH]
                args: list[Any] = [campaign, _j(campaign), nowj, len(chunk), import_id or ""]
                for nl in chunk:
                    args += [nl.phone, _j(nl.name), _j(nl.owner), _j(nl.fields), _j(nl.source), _j(nl.row)]
                self._run("put", *args, client=pipe)
            answers = pipe.execute()
        for i, (accepted, revived, dups) in enumerate(answers):
            res.accepted += accepted
            res.revived += revived
            base = i * PUT_BATCH
            res.duplicates += [(leads[base + dups[j]], dups[j + 1]) for j in range(0, len(dups), 2)]
        return res

    # -- leasing ------------------------------------------------------------------
    def lease(self, stage: str, lease_s: float, now: float) -> Leased | None:
        token = self._token()
        expires = now + lease_s
        with self._errors():
            reply = self._run("lease", stage, _j(now), _j(expires), token, self.max_deliveries)
        if reply[0]:
            with self._seq_lock:
                self._poisoned += int(reply[0])
        lead = _decode(reply[1]) if len(reply) > 1 else None
        if lead is None:
            return None
        return Leased(lead["id"], stage, lead[stage]["qkey"], lead, expires, token)

    def take_poisoned(self) -> int:
        """How many items this store's lease() dead-lettered as poison since last asked
        (a run counts them as its own dead letters)."""
        with self._seq_lock:
            n, self._poisoned = self._poisoned, 0
        return n

    def renew(self, item: Leased, lease_s: float, now: float) -> bool:
        """Extend a lease while its call waits or runs."""
        expires = now + lease_s
        with self._errors():
            ok = self._run("renew", item.id, item.stage, item.token, _j(expires), _j(now))
        if ok:
            item.expires = expires
        return bool(ok)

    def reclaim(self, now: float, dead_pids: set[int] | None = None) -> int:
        """Return the leases of this host's worker processes that are gone to ready at once,
        instead of waiting for them to expire. dead_pids None: every pid of this host not
        running now. Leases taken on other hosts are left alone (a pid means nothing here):
        they come back through maintain when they expire."""
        moved = 0
        for stage in STAGES:
            with self._errors():
                members = self.r.zrange(f"{self._p}lease:{stage}", 0, -1)
            for member in members:
                try:
                    host, pid, _n = member.split(":", 1)[1].rsplit("-", 2)
                    pid = int(pid)
                except (IndexError, ValueError):
                    continue
                if host != self._host:
                    continue
                if (pid not in dead_pids) if dead_pids is not None else _alive(pid):
                    continue
                with self._errors():
                    moved += self._run("reclaim", stage, member, _j(now))
        return moved

    def mark_intent(self, item: Leased, now: float) -> bool:
        """Record, before a call with a side effect, that it is about to be made.

        False if the lease was lost meanwhile (then the call must not be made)."""
        with self._errors():
            flat = self._run("intent", item.id, item.stage, item.token, _j(now))
        lead = _decode(flat)
        if lead is None:
            return False
        item.lead = lead
        return True

    def complete(self, item: Leased, now: float, updates: dict[str, Any] | None = None,
                 enqueue_next: bool = False, state: str = "done", called: bool = True) -> None:
        pairs: list[str] = []
        for key, value in (updates or {}).items():
            if key.partition(".")[0] in STAGES or key == "id":
                raise ValueError(f"complete(updates=...) cannot set {key!r}")
            pairs += [key, _j(value)]
        with self._errors():
            self._run("complete", item.id, item.stage, _j(now), state, int(called), int(enqueue_next),
                      _j((item.lead.get("writeback") or {}).get("version")), *pairs)

    def retry(self, item: Leased, due: float, failure: Failure, now: float, count_attempt: bool = True,
              called: bool = True) -> str:
        with self._errors():
            return self._run("retry", item.id, item.stage, _j(due), _j(now), _j(failure.errcode),
                             _j(failure.error), _j(failure.kind), int(count_attempt), int(called), self.max_attempts)

    def bury(self, item: Leased, failure: Failure, now: float, called: bool = True) -> None:
        with self._errors():
            self._run("bury", item.id, item.stage, _j(now), _j(failure.errcode), _j(failure.error),
                      _j(failure.kind), int(called))

    def release(self, item: Leased, now: float) -> None:
        """Give an item back untouched (shutdown, fatal stop): no attempt, no delivery."""
        with self._errors():
            self._run("release", item.id, item.stage, item.token, _j(now))

    def maintain(self, now: float) -> int:
        """Move due retries and expired leases (of any host) back to ready. Returns how many moved."""
        moved = 0
        with self._errors():
            for stage in STAGES:
                for kind in ("delay", "lease"):
                    moved += self._run("maintain", stage, kind, _j(now), MAINTAIN_BATCH)
        return moved

    def next_wakeup(self) -> float | None:
        """The earliest due retry or lease expiry, or None when there are none."""
        with self._errors():
            pipe = self.r.pipeline(transaction=False)
            for stage in STAGES:
                for kind in ("delay", "lease"):
                    pipe.zrange(f"{self._p}{kind}:{stage}", 0, 0, withscores=True)
            fronts = pipe.execute()
        times = [front[0][1] for front in fronts if front]
        return min(times) if times else None

    # -- recent outcomes (for status, error rate and alerts) ---------------------------
    def recent(self, now: float, minutes: int = 5) -> dict[str, dict[str, dict[str, int]]]:
        """{campaign: {stage: {done, dead, failed}}} over the last `minutes` whole minutes
        and the current one."""
        camps = self.campaigns()
        last = int(now // 60)
        span = range(last - minutes, last + 1)
        with self._errors():
            pipe = self.r.pipeline(transaction=False)
            for camp in camps:
                for m in span:
                    pipe.hgetall(f"{self._p}m:{camp}:{m}")
            rows = pipe.execute()
        out: dict[str, dict[str, dict[str, int]]] = {}
        for i, camp in enumerate(camps):
            sums = {f"{stage}:{what}": 0 for stage in STAGES for what in ("done", "dead", "failed")}
            for row in rows[i * len(span):(i + 1) * len(span)]:
                for field, n in row.items():
                    if field in sums:
                        sums[field] += int(n)
            out[camp] = {stage: {what: sums[f"{stage}:{what}"] for what in ("done", "dead", "failed")}
                         for stage in STAGES}
        return out

    def dead_by_code(self) -> dict[str, dict[str, dict[str, int]]]:
        """{campaign: {stage: {errcode or kind: n}}} of the dead letters now in the DLQ."""
        camps = self.campaigns()
        with self._errors():
            pipe = self.r.pipeline(transaction=False)
            for camp in camps:
                pipe.hgetall(f"{self._p}dlq:{camp}")
            rows = pipe.execute()
        out: dict[str, dict[str, dict[str, int]]] = {}
        for camp, row in zip(camps, rows):
            for field, n in row.items():
                stage, _, code = field.partition(":")
                if int(n):
                    out.setdefault(camp, {}).setdefault(stage, {})[code] = int(n)
        return out

    def oldest_ready(self, now: float) -> dict[str, dict[str, float]]:
        """{campaign: {stage: seconds the oldest ready item has waited}}. Looks at the front
        of each ready list (stale entries are skipped), so it costs the same at any depth."""
        with self._errors():
            flat = self._run("oldest")
        out: dict[str, dict[str, float]] = {}
        for i in range(0, len(flat), 3):
            camp, stage, at = flat[i], flat[i + 1], json.loads(flat[i + 2])
            out.setdefault(camp, {}).setdefault(stage, round(max(0.0, now - at), 1))
        return out

    # -- reading ------------------------------------------------------------------
    def campaigns(self) -> list[str]:
        with self._errors():
            return self.r.lrange(self._p + "campaigns", 0, -1)

    def counts(self) -> dict[str, Any]:
        """{campaign: {imported, skipped, stages: {stage: {state: n, entered: n}}}}.

        Each campaign's counters are one hash read at once, so its sums always hold."""
        camps = self.campaigns()
        with self._errors():
            pipe = self.r.pipeline(transaction=False)
            for camp in camps:
                pipe.hgetall(f"{self._p}n:{camp}")
            rows = pipe.execute()
        out: dict[str, Any] = {}
        for camp, n in zip(camps, rows):
            stages = {}
            for stage in STAGES:
                row = {state: int(n.get(f"{stage}:{state}", 0)) for state in STATES}
                row["entered"] = sum(row.values())
                stages[stage] = row
            out[camp] = {"imported": int(n.get("imported", 0)), "skipped": int(n.get("dupes", 0)), "stages": stages}
        return out

    def find_phone(self, campaign: str, phone: str) -> int | None:
        with self._errors():
            found = self.r.hget(f"{self._p}phones:{campaign}", phone)
        return int(found) if found is not None else None

    def lead(self, lead_id: int) -> dict[str, Any] | None:
        with self._errors():
            return _decode(self._run("read", lead_id)[0])

    def leads(self, campaign: str | None = None) -> Iterator[dict[str, Any]]:
        # In id order, a page per round trip; nothing stays open while the caller writes.
        with self._errors():
            if campaign is None:
                ids: Any = range(1, int(self.r.get(self._p + "seq") or 0) + 1)
            else:
                ids = sorted(int(v) for v in self.r.hvals(f"{self._p}phones:{campaign}"))
        for start in range(0, len(ids), PAGE):
            with self._errors():
                page = self._run("read", *ids[start:start + PAGE])
            for text in page:
                lead = _decode(text)
                if lead is not None and (campaign is None or lead["campaign"] == campaign):
                    yield lead

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
                if dry_run:
                    moved += 1
                    continue
                with self._errors():
                    # The script looks again: it moves the item only if it is still dead.
                    moved += self._run("requeue", lead["id"], st, _j(now))
        return moved

    def check(self) -> list[str]:
        """Verify the store's invariants; returns what is wrong (empty when all holds).

        One script reads a consistent snapshot, so it also works while a run is going on;
        but Redis serves nobody else meanwhile: about 2-3 s per 100,000 leads, and past
        Redis's busy-script limit (5 s) other clients get BUSY errors until it ends."""
        with self._errors():
            return list(self._run("check"))

    def store_id(self) -> str:
        """A random id given when the store was created (one made now for an older store),
        the same for every process and every open afterwards."""
        key = self._p + "meta.id"
        with self._errors():
            found = self.r.get(key)
            if found is None:
                self.r.set(key, uuid.uuid4().hex[:12], nx=True)
                found = self.r.get(key)
        return found

    # -- copying between stores (wecomctl store copy) ---------------------------------
    def has_leases(self) -> bool:
        """Is any item leased (a run is working on the store)?"""
        with self._errors():
            pipe = self.r.pipeline(transaction=False)
            for stage in STAGES:
                pipe.zcard(f"{self._p}lease:{stage}")
            return any(pipe.execute())

    def snapshot(self) -> Iterator[tuple[str, Any]]:
        """Everything a copy needs, as records: ("meta", {"id"}), ("campaigns", [...]),
        ("counter", (campaign, "dupes", n)) per campaign, ("lead", lead) in id order,
        ("ledger", (campaign, external_userid, value)). Read while no run works on the store
        (the records are read a page at a time, not at one instant)."""
        yield "meta", {"id": self.store_id()}
        camps = self.campaigns()
        yield "campaigns", camps
        with self._errors():
            pipe = self.r.pipeline(transaction=False)
            for camp in camps:
                pipe.hget(f"{self._p}n:{camp}", "dupes")
            dupes = pipe.execute()
        for camp, n in zip(camps, dupes):
            yield "counter", (camp, "dupes", int(n or 0))
        yield from (("lead", lead) for lead in self.leads())
        yield from (("ledger", entry) for entry in self._ledger_entries(camps))

    def _ledger_entries(self, camps: list[str]) -> list[tuple[str, str, Any]]:
        """Every welcome-ledger entry as (campaign, external_userid, value), sorted."""
        head = f"{self._p}ledger:welcome:"
        with self._errors():
            keys = list(self.r.scan_iter(match=_glob_escape(head) + "*", count=1000))
        entries = []
        for start in range(0, len(keys), PAGE):
            page = keys[start:start + PAGE]
            with self._errors():
                values = self.r.mget(page)
            for key, raw in zip(page, values):
                if raw is None:
                    continue
                value = json.loads(raw)
                rest = key[len(head):]
                # The key is "{campaign}:{euid}" and either may hold a ":": a campaign the
                # key starts with; when several do, the campaign of the greeted lead.
                fits = [c for c in camps if rest.startswith(c + ":")]
                if len(fits) > 1 and isinstance(value, dict) and value.get("lead") is not None:
                    owner = (self.lead(value["lead"]) or {}).get("campaign")
                    fits = [c for c in fits if c == owner] or fits
                if fits:
                    camp = max(fits, key=len) if len(fits) > 1 else fits[0]
                else:
                    camp = rest.rsplit(":", 1)[0]  # a campaign no longer listed
                entries.append((camp, rest[len(camp) + 1:], value))
        entries.sort(key=lambda e: (e[0], e[1]))
        return entries

    def restore(self, records: Iterable[tuple[str, Any]], now: float) -> dict[str, int]:
        """Load a snapshot into this store, which must hold no lead. Returns {"leads": n,
        "ledger": n}.

        Leads keep their id, data and stage records; queue entries and the counters (states,
        imported, DLQ by code), the dedupe and the id sequence are rebuilt from them. Delayed
        and leased items become ready (a copy is made while nothing runs): a leased item keeps
        its intent, so its next delivery settles the call before making it again. The store
        takes the source's id (write-back idempotency keys stay the same). Per-minute outcomes
        are not copied. One script per 1,000 leads, each applied whole; a copy that fails
        halfway leaves a partly loaded store (copy again into a new namespace)."""
        with self._errors():
            held = int(self.r.get(self._p + "seq") or 0)
        if held:
            raise StoreError(f"the store {self.path} (namespace {self.namespace}) already holds {held} leads; "
                             "copy into a new namespace")
        loaded = {"leads": 0, "ledger": 0}
        batch: list[tuple[int, list[Any]]] = []  # (id, the script's arguments for it)
        last = 0  # the last lead id written
        recomputed = {"imported"} | {f"{stage}:{state}" for stage in STAGES for state in STATES}

        def flush() -> None:
            nonlocal last
            if not batch:
                return
            args: list[Any] = [str(last), len(batch)]
            for _lid, lead_args in batch:
                args += lead_args
            with self._errors():
                answer = self._run("restore", *args)
            if isinstance(answer, str):
                raise StoreError(f"cannot copy into {self.path} (namespace {self.namespace}): {answer}")
            last = batch[-1][0]
            loaded["leads"] += len(batch)
            batch.clear()

        ledger: list[tuple[str, str]] = []

        def flush_ledger() -> None:
            if ledger:
                with self._errors():
                    pipe = self.r.pipeline(transaction=True)
                    for key, value in ledger:
                        pipe.set(key, value)
                    pipe.execute()
                loaded["ledger"] += len(ledger)
                ledger.clear()

        for kind, value in records:
            if kind == "meta":
                with self._errors():
                    self.r.set(self._p + "meta.id", value["id"])
            elif kind == "campaigns":
                with self._errors():
                    pipe = self.r.pipeline(transaction=True)
                    pipe.delete(self._p + "campaigns")
                    if value:
                        pipe.rpush(self._p + "campaigns", *value)
                    pipe.execute()
            elif kind == "counter":
                camp, name, n = value
                if name not in recomputed:  # the state counters are rebuilt from the leads
                    with self._errors():
                        self.r.hset(f"{self._p}n:{camp}", name, int(n))
            elif kind == "lead":
                lid, prev = int(value["id"]), batch[-1][0] if batch else last
                if lid <= prev:
                    raise StoreError(f"cannot copy into {self.path}: lead {lid} comes after lead {prev} "
                                     "(a snapshot lists leads in id order)")
                batch.append((lid, _restore_args(value)))
                if len(batch) >= PUT_BATCH:
                    flush()
            elif kind == "ledger":
                camp, euid, entry = value
                ledger.append((f"{self._p}ledger:welcome:{camp}:{euid}", _j(entry)))
                if len(ledger) >= PUT_BATCH:
                    flush_ledger()
            else:
                raise StoreError(f"cannot copy into {self.path}: unknown snapshot record {kind!r} "
                                 "(made by a newer wecomctl?)")
        flush()
        flush_ledger()
        return loaded

    def welcome_ledger(self, campaign: str, external_userid: str) -> dict[str, Any] | None:
        with self._errors():
            raw = self.r.get(f"{self._p}ledger:welcome:{campaign}:{external_userid}")
        return json.loads(raw) if raw is not None else None

    def get_flag(self, name: str) -> Any:
        with self._errors():
            raw = self.r.get(f"{self._p}flag:{name}")
        return json.loads(raw) if raw is not None else None

    def set_flag(self, name: str, value: Any) -> None:
        with self._errors():
            if value is None:
                self.r.delete(f"{self._p}flag:{name}")
            else:
                self.r.set(f"{self._p}flag:{name}", _j(value))
