"""The Lua scripts of the Redis backend, and the error replies they give.

Pure: text built at import. The state machine's tables at the top of the append
script are generated from jobs.py and events.py, so the script and the memory
backend cannot disagree about it.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from metis_stream.backends.contract import JobLimits
from metis_stream.errors import JobEnded, JobNotFound, JobNotSubmitted, MetisError
from metis_stream.events import TERMINAL_TYPES
from metis_stream.jobs import STATE_AFTER_EVENT, STATE_OTHERWISE, TERMINAL_STATES, JobState

_NOT_SUBMITTED = (JobState.CREATED, JobState.SUBMITTING)
STATES = tuple(JobState)
"""The order of the state index keys that the append and create scripts are given."""


def _lua_constants() -> str:
    """Lua tables generated from jobs.py and events.py: the state machine has one source."""
    tables = {
        "STATE_AFTER": {name: state.value for name, state in STATE_AFTER_EVENT.items()},
        "RANK": {state.value: state.rank for state in JobState},
        "TERMINAL_STATES": {state.value: True for state in TERMINAL_STATES},
        "TERMINAL_TYPES": dict.fromkeys(TERMINAL_TYPES, True),
        "NOT_SUBMITTED": {state.value: True for state in _NOT_SUBMITTED},
        "STATES": [state.value for state in STATES],
    }
    lines = [f"local {name} = cjson.decode([==[{orjson.dumps(value).decode()}]==])"
             for name, value in tables.items()]
    lines.append(f"local OTHERWISE = '{STATE_OTHERWISE.value}'")
    return "\n".join(lines) + "\n"


APPEND_LUA = _lua_constants() + """
-- KEYS: job hash, log stream, ids hash, then one state index per entry of STATES, then
--       the changes stream.
-- ARGV: job id, channel, now (JSON), from_job (1/0), max events, stream cap, retention (ms),
--       wire head, event count, max bytes, changes kept (ms; 0: no journal of changes),
--       then per event: type, idempotency id or '', wire tail, patch pair count, field,
--       value, ...
local job_key, log_key, ids_key = KEYS[1], KEYS[2], KEYS[3]
local job_id, channel, now = ARGV[1], ARGV[2], ARGV[3]
local max_events, cap, retention = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local max_bytes, changes_kept = tonumber(ARGV[10]), tonumber(ARGV[11])

local state = redis.call('HGET', job_key, 'state')
if not state then return redis.error_reply('METIS_NOT_FOUND') end
if ARGV[4] == '1' and NOT_SUBMITTED[state] then return redis.error_reply('METIS_NOT_SUBMITTED') end

local events, cursor = {}, 12
for i = 1, tonumber(ARGV[9]) do
  local pairs_count = tonumber(ARGV[cursor + 3])
  local patch = {}
  for j = 1, 2 * pairs_count do patch[j] = ARGV[cursor + 3 + j] end
  events[i] = {type = ARGV[cursor], id = ARGV[cursor + 1], tail = ARGV[cursor + 2], patch = patch}
  cursor = cursor + 4 + 2 * pairs_count
end

-- Plan the whole batch before changing anything: all or nothing.
local count = redis.call('XLEN', log_key)
local last_seq = tonumber(redis.call('HGET', job_key, 'last_seq'))
-- 'bytes': the wire JSON held in the log, against the job's budget.
local size = tonumber(redis.call('HGET', job_key, 'bytes') or '0')
local added = 0
local ended = TERMINAL_STATES[state] or false
local seqs, fresh, new_ids = {}, {}, {}
for i, event in ipairs(events) do
  local known = false
  if event.id ~= '' then known = new_ids[event.id] or redis.call('HGET', ids_key, event.id) end
  if known then
    seqs[i] = tonumber(known)
  else
    if ended then return redis.error_reply('METIS_ENDED') end
    local seq = last_seq + #fresh + 1
    added = added + #ARGV[8] + #string.format('%d', seq) + #event.tail
    if not TERMINAL_TYPES[event.type] then
      if count + #fresh >= max_events then return redis.error_reply('METIS_LIMIT') end
      if size + added > max_bytes then return redis.error_reply('METIS_BYTES') end
    end
    if event.id ~= '' then new_ids[event.id] = seq end
    seqs[i] = seq
    fresh[#fresh + 1] = i
    ended = TERMINAL_TYPES[event.type] or false
  end
end
if #fresh == 0 then return {seqs, fresh} end

local function state_after(current, event_type)
  if TERMINAL_STATES[current] then return current end
  local target = STATE_AFTER[event_type] or OTHERWISE
  if RANK[target] > RANK[current] then return target end
  return current
end

local old_state, wires = state, {}
for _, i in ipairs(fresh) do
  local event, seq = events[i], string.format('%d', seqs[i])
  local wire = ARGV[8] .. seq .. event.tail
  redis.call('XADD', log_key, 'MAXLEN', '~', cap, '0-' .. seq, 'e', wire)
  if #event.patch > 0 then redis.call('HSET', job_key, unpack(event.patch)) end
  state = state_after(state, event.type)
  wires[#wires + 1] = wire
end
redis.call('HSET', job_key, 'state', state, 'updated', now,
           'last_seq', string.format('%d', seqs[fresh[#fresh]]),
           'bytes', string.format('%d', size + added))
for key, seq in pairs(new_ids) do redis.call('HSET', ids_key, key, string.format('%d', seq)) end
if state ~= old_state then
  local order = redis.call('HGET', job_key, 'order')
  for i, name in ipairs(STATES) do
    if name == old_state then redis.call('ZREM', KEYS[3 + i], job_id) end
    if name == state then redis.call('ZADD', KEYS[3 + i], order, job_id) end
  end
end
if TERMINAL_STATES[state] then
  if redis.call('HGET', job_key, 'ended') == 'null' then
    redis.call('HSET', job_key, 'ended', now)
  end
  for _, key in ipairs({job_key, log_key, ids_key}) do redis.call('PEXPIRE', key, retention) end
end
if changes_kept > 0 then
  -- The journal the webhooks read (backends/contract.py): entries older than changes_kept
  -- go, by Redis's own clock, which also makes the entry's id.
  local clock = redis.call('TIME')
  local oldest = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000) - changes_kept
  redis.call('XADD', KEYS[4 + #STATES], 'MINID', '~', string.format('%d', math.max(oldest, 0)),
             '*', 'j', job_id, 'f', string.format('%d', seqs[fresh[1]]),
             'l', string.format('%d', seqs[fresh[#fresh]]))
end
-- One message for the whole batch: each event's JSON on its own line.
redis.call('PUBLISH', channel, table.concat(wires, '\\n'))
return {seqs, fresh}
"""

CREATE_LUA = """
-- KEYS: job hash, log stream, ids hash, order counter, then every state index, then the
--       other indexes the job joins (its cluster's, and its owner's and end user's if any).
-- ARGV: job id, its state index's position among the state indexes (1-based), the number
--       of state indexes, then field, value, ...
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
local order = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'order', order, unpack(ARGV, 4))
local states = tonumber(ARGV[3])
for i = 5, 4 + states do redis.call('ZREM', KEYS[i], ARGV[1]) end
redis.call('ZADD', KEYS[4 + tonumber(ARGV[2])], order, ARGV[1])
for i = 5 + states, #KEYS do redis.call('ZADD', KEYS[i], order, ARGV[1]) end
"""

SET_FIELD_LUA = """
-- KEYS: job hash. ARGV: field, value. Only on a job that exists: never a stray hash
-- without the fields that every job has. Returns 0 for no such job.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

READ_LUA = """
-- KEYS: job hash, log stream. ARGV: first entry id (or '-'), most events, most bytes.
-- The job's epoch and last seq, and the wire JSON of the events from the first entry on:
-- at most that many, none after the one that brings them to that many bytes. The log is
-- read in small ranges so that neither Redis nor the reply holds more than the page.
local limit, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
local job = redis.call('HMGET', KEYS[1], 'epoch', 'last_seq')
local wires, size, start = {}, 0, ARGV[1]
while #wires < limit and size < max_bytes do
  local range = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', math.min(limit - #wires, 64))
  if #range == 0 then break end
  for _, entry in ipairs(range) do
    wires[#wires + 1] = entry[2][2]
    size = size + #entry[2][2]
    start = '(' .. entry[1]
    if size >= max_bytes then break end
  end
end
return {job[1], job[2], wires}
"""

LEASE_LUA = """
-- Take the lease if free, or renew it if this owner holds it.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

SCRIPT_ERRORS: dict[str, Callable[[str, JobLimits], MetisError]] = {
    "METIS_NOT_FOUND": lambda job_id, limits: JobNotFound(job_id),
    "METIS_NOT_SUBMITTED": lambda job_id, limits: JobNotSubmitted(job_id),
    "METIS_ENDED": lambda job_id, limits: JobEnded(job_id),
    "METIS_LIMIT": lambda job_id, limits: limits.events_reached(job_id),
    "METIS_BYTES": lambda job_id, limits: limits.bytes_reached(job_id),
}
"""What each error reply of the append script (its first word) stands for, given the job
and its limits."""
