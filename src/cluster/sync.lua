-- One sync of one replica, atomic (SPEC 7). Every key written gets a TTL in the same call.
--
-- KEYS[1] replicas zset (member: replica id, score: last sync, ms)
-- KEYS[2] bans zset (member: "<client key> <until ms>", score: until ms)
-- KEYS[3] ban log zset (same members, score: when the ban was made, ms)
-- KEYS[3 + i], i = 1..n_rate: the rate hash of a client key (field: second, value: count)
-- KEYS[3 + n_rate + i], i = 1..n_fail: the failure zset of a client key
-- ARGV: replica id, n_rate, n_fail, ban cursor (ms, 0 = all live bans), failure window ms,
--       max_failures, ban ms, buckets, then n_rate counts, n_fail counts, n_fail client keys.
-- Returns: { now ms, replicas, { rate totals }, { ban members }, new cursor }
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now = sec * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local n_rate = tonumber(ARGV[2])
local n_fail = tonumber(ARGV[3])
local cursor = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local max_failures = tonumber(ARGV[6])
local ban_ms = tonumber(ARGV[7])
local buckets = tonumber(ARGV[8])
local replica_ttl = 5000
local log_keep = 60000

redis.call('ZADD', KEYS[1], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - replica_ttl)
local replicas = redis.call('ZCARD', KEYS[1])
redis.call('PEXPIRE', KEYS[1], replica_ttl)

local totals = {}
for i = 1, n_rate do
  local key = KEYS[3 + i]
  local add = tonumber(ARGV[8 + i])
  if add > 0 then
    redis.call('HINCRBY', key, sec, add)
  end
  local flat = redis.call('HGETALL', key)
  local total = 0
  for j = 1, #flat, 2 do
    if tonumber(flat[j]) > sec - buckets then
      total = total + tonumber(flat[j + 1])
    else
      redis.call('HDEL', key, flat[j])
    end
  end
  if total > 0 then
    redis.call('PEXPIRE', key, (buckets + 1) * 1000)
  end
  totals[i] = total
end

for i = 1, n_fail do
  local key = KEYS[3 + n_rate + i]
  local count = tonumber(ARGV[8 + n_rate + i])
  local client = ARGV[8 + n_rate + n_fail + i]
  for k = 1, count do
    redis.call('ZADD', key, now, id .. ':' .. now .. ':' .. k)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) > max_failures then
    redis.call('DEL', key)
    local member = client .. ' ' .. (now + ban_ms)
    redis.call('ZADD', KEYS[2], now + ban_ms, member)
    redis.call('ZADD', KEYS[3], now, member)
    if redis.call('PTTL', KEYS[2]) < ban_ms + 1000 then
      redis.call('PEXPIRE', KEYS[2], ban_ms + 1000)
    end
    redis.call('PEXPIRE', KEYS[3], log_keep)
  else
    redis.call('PEXPIRE', key, window)
  end
end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - log_keep)
local bans
if cursor == 0 or cursor < now - log_keep then
  bans = redis.call('ZRANGEBYSCORE', KEYS[2], now, '+inf')
else
  bans = redis.call('ZRANGEBYSCORE', KEYS[3], cursor, '+inf')
end
return { now, replicas, totals, bans, now }
