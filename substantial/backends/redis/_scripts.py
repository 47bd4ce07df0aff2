"""The Lua scripts of the redis backend: each per-run operation is one atomic script.

A script touches only keys of one run (one hash tag, one cluster slot),
except ``DUE`` and ``HEAD``, which read every due shard and run on a single
server only.
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

# KEYS: inbox stream, event-id hash. ARGV: event ids.
_ACK = """
for _, id in ipairs(ARGV) do
  local sid = redis.call('HGET', KEYS[2], id)
  if sid then
    redis.call('XDEL', KEYS[1], sid)
    redis.call('HDEL', KEYS[2], id)
  end
end
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 0
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

# KEYS: lease hash. ARGV: owner, ttl seconds[, steal_from]. Expiry is on the
# server's clock, so workers with skewed clocks agree on it. Returns 0 (held
# elsewhere), 1 (taken), 2 (taken over an unreadable lease, which is expired).
_ACQUIRE = (
    _LEASE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local owner, exp = lease()
local took = 1
if owner == false then
  took = 2
  redis.call('DEL', KEYS[1])
elseif owner and exp > now and owner ~= ARGV[1] and owner ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1],
           'expires_at', string.format('%.6f', now + tonumber(ARGV[2])))
return took
"""
)

# KEYS: lease hash. ARGV: owner. Removes an unreadable lease whoever asks (returns 2).
_RELEASE = (
    _LEASE
    + """
local owner = lease()
if owner == false then
  redis.call('DEL', KEYS[1])
  return 2
end
if owner == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)

# Single server only (the keys are in different slots): the due shards' heads
# in one round trip; a cluster gets one command per shard in a pipeline.
# KEYS: due shards. ARGV: now, limit. Returns member, score, member, score, ...
_DUE = """
local out = {}
for _, key in ipairs(KEYS) do
  local items = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
  for i = 1, #items do out[#out + 1] = items[i] end
end
return out
"""

# Single server only, as _DUE. KEYS: due shards. Returns the member and the
# smallest score as Redis formatted it (exact), or an empty list.
_HEAD = """
local best, out = nil, {}
for _, key in ipairs(KEYS) do
  local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if head[2] and (best == nil or tonumber(head[2]) < best) then
    best, out = tonumber(head[2]), head
  end
end
return out
"""

SCRIPTS = {
    "append": _APPEND,
    "post": _POST,
    "ack": _ACK,
    "acquire": _ACQUIRE,
    "release": _RELEASE,
    "due": _DUE,
    "head": _HEAD,
}
