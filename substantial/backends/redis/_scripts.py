"""The Lua scripts of the redis backend: each per-run operation is one atomic script.

A script touches only keys of one run (one hash tag, one cluster slot), or
one runs shard and its creation index (one slot too), except ``DUE``,
``PUT_RUN`` and ``START_RUN``, which touch keys of several slots and run on a
single server only.
"""

from __future__ import annotations

__all__ = ["SCRIPTS"]

# KEYS: log, last-append token. ARGV: position, entry, token.
# Returns 1 (stored, or this very call was already stored), 0 (taken), -1 (gap).
_APPEND = """
local n = redis.call('LLEN', KEYS[1])
local pos = tonumber(ARGV[1])
local mark = ARGV[1] .. ':' .. ARGV[3]
if n == pos then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  redis.call('SET', KEYS[2], mark)
  return 1
end
if n > pos then
  if redis.call('GET', KEYS[2]) == mark then return 1 end
  return 0
end
return -1
"""

# KEYS: inbox stream, event-id hash. ARGV: event id, data. Returns 1 if stored now.
_POST = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'data', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], sid)
return 1
"""

# KEYS: inbox stream, event-id hash. ARGV: event ids to delete. Returns the rest
# of the stream (XRANGE), so acknowledging and reading cost one round trip.
_ACK_READ = """
for _, id in ipairs(ARGV) do
  local sid = redis.call('HGET', KEYS[2], id)
  if sid then
    redis.call('XDEL', KEYS[1], sid)
    redis.call('HDEL', KEYS[2], id)
  end
end
if redis.call('XLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1])
  return {}
end
return redis.call('XRANGE', KEYS[1], '-', '+')
"""

# Reads the lease at KEYS[1]: nil if absent, false if unreadable (not a hash, no
# owner, an expiry that is not a finite number), else owner and expiry.
_LEASE = """
local function lease()
  local kind = redis.call('TYPE', KEYS[1])['ok']
  if kind == 'none' then return nil end
  if kind ~= 'hash' then return false end
  local cur = redis.call('HMGET', KEYS[1], 'owner', 'expires_at')
  local exp = tonumber(cur[2])
  if not cur[1] or cur[1] == '' or not exp or exp ~= exp or exp == math.huge
     or exp == -math.huge then
    return false
  end
  return cur[1], exp
end
"""

# KEYS: lease hash. ARGV: owner ('' to only read), ttl seconds, take_from ('' for
# nobody). Expiry is on the server's clock, so workers with skewed clocks agree on
# it. Returns {'none'} or {'bad'} (read only: no lease, an unreadable one), {'held',
# owner, expiry} (left as it is), or {'set' | 'set-over-bad'[, owner, expiry]}
# (taken or renewed; given up when the ttl is 0, replacing an unreadable one).
_LEASE_OP = (
    _LEASE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local owner, exp = lease()
if ARGV[1] == '' then
  if owner == nil then return {'none'} end
  if owner == false then return {'bad'} end
  return {'held', owner, string.format('%.6f', exp)}
end
if owner and exp > now and owner ~= ARGV[1] and owner ~= ARGV[3] then
  return {'held', owner, string.format('%.6f', exp)}
end
local code = 'set'
if owner == false then code = 'set-over-bad' end
redis.call('DEL', KEYS[1])
local ttl = tonumber(ARGV[2])
if ttl <= 0 then return {code} end
local expires = string.format('%.6f', now + ttl)
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'expires_at', expires)
return {code, ARGV[1], expires}
"""
)

# Single server only (the keys are in different slots): the due shards' heads
# in one round trip; a cluster gets the same commands per shard in pipelines.
# KEYS: due shards. ARGV: now, limit. Returns {due, next}: members and scores due
# by now (at most limit per shard), and per shard the entry right after those.
_DUE = """
local due, following = {}, {}
for _, key in ipairs(KEYS) do
  local items = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
  for i = 1, #items do due[#due + 1] = items[i] end
  local n = #items / 2
  local after = redis.call('ZRANGE', key, n, n, 'WITHSCORES')
  if after[2] then
    following[#following + 1] = after[1]
    following[#following + 1] = after[2]
  end
end
return {due, following}
"""

# The runs shard (score 0: members in id order), its creation index (score:
# created_at) and the creation index of each status share a slot, and change
# together: the first two always hold the same runs, and a run is in the set of
# its status alone. index(first, ...) takes them from KEYS[first]: the runs shard,
# the creation index, the status sets (STATUS_SETS order); mine is the position of
# the run's status set among them (from 1; 0: none).
_INDEX = """
local function index(first, id, created, mine)
  redis.call('ZADD', KEYS[first], 0, id)
  redis.call('ZADD', KEYS[first + 1], created, id)
  for i = first + 2, #KEYS do
    if i - first + 1 == mine then
      redis.call('ZADD', KEYS[i], created, id)
    else
      redis.call('ZREM', KEYS[i], id)
    end
  end
end
"""

# KEYS: the index keys (above). ARGV: run id, created at, the position of its status's set.
_INDEX_RUN = _INDEX + "index(1, ARGV[1], ARGV[2], tonumber(ARGV[3]))\nreturn 1\n"

# Single server only (the metadata and the index are in different slots; a
# cluster sends INDEX_RUN, then SET). KEYS: meta, then the index keys. ARGV:
# metadata, run id, created at, the position of its status's set.
_PUT_RUN = (
    _INDEX
    + """
index(2, ARGV[2], ARGV[3], tonumber(ARGV[4]))
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""
)

# Single server only: a new run's entry at 0, metadata, index and due entry in one
# step, then the wake-up. KEYS: log, last-append token, meta, due shard, then the
# index keys. ARGV: entry, token, metadata, run id, created at, the position of its
# status's set, due at, wake channel. Returns 1 (created, or this very call was),
# 0 (position 0 taken: nothing written).
_START_RUN = (
    _INDEX
    + """
local mark = '0:' .. ARGV[2]
if redis.call('LLEN', KEYS[1]) > 0 then
  if redis.call('GET', KEYS[2]) == mark then return 1 end
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], mark)
index(5, ARGV[4], ARGV[5], tonumber(ARGV[6]))
redis.call('SET', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[4])
redis.call('PUBLISH', ARGV[8], ARGV[7])
return 1
"""
)

# KEYS: as INDEX_RUN. ARGV: run id. Returns the entries removed.
_UNINDEX_RUN = """
local n = 0
for i = 1, #KEYS do n = n + redis.call('ZREM', KEYS[i], ARGV[1]) end
return n
"""

# A run of a store written before creation indexes: index it unless deleted since it
# was read (then it is gone from the runs shard) or indexed meanwhile (NX).
# KEYS: as INDEX_RUN. ARGV: run id, created at, its status's set (0: none, unreadable).
_REINDEX_RUN = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local mine = tonumber(ARGV[3])
if mine > 0 then redis.call('ZADD', KEYS[mine], 'NX', ARGV[2], ARGV[1]) end
return redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1])
"""

# KEYS: inbox stream, due shard (a single server: two slots). ARGV: run id. Takes the
# run out of the due index unless an event waits: 1 if so (or it was not in it), 0 if
# not (an inbox key of another type counts as waiting: the reader reports it).
_UNSCHEDULE_IDLE = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and (kind ~= 'stream' or redis.call('XLEN', KEYS[1]) > 0) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

SCRIPTS = {
    "index_run": _INDEX_RUN,
    "put_run": _PUT_RUN,
    "start_run": _START_RUN,
    "unindex_run": _UNINDEX_RUN,
    "reindex_run": _REINDEX_RUN,
    "append": _APPEND,
    "post": _POST,
    "ack_read": _ACK_READ,
    "lease": _LEASE_OP,
    "due": _DUE,
    "unschedule_idle": _UNSCHEDULE_IDLE,
}
