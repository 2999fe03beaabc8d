-- One sync of one replica, atomic (SPEC 7). Every key written gets a TTL in the same call.
--
-- KEYS[1] replicas zset (member: replica id, score: last sync, ms)
-- KEYS[2] bans zset (member: the client key, score: until ms), so that a lift is one ZREM
-- KEYS[3] ban log zset (member: "<client key> <until ms>", score: when the ban was made, ms;
--         "lift <client key> <ms>" when an operator lifted a key's ban)
-- KEYS[4] admin ban zset (member: network, score: until ms)
-- KEYS[5] admin ban version ("<counter> <nonce>": the counter grows at every change of
--         KEYS[4], so a replica can tell a Redis that went back in time)
-- KEYS[6] rate totals hash (field: client key, value: admissions in the seconds not yet
--         drained out of it: the last `buckets`, and any whose draining is under way)
-- KEYS[7 + j], j = 0..buckets: the rate hash of one second, the second s in slot
--         s mod (buckets + 1) (field: client key, value: count; field ":second": s;
--         field ":cursor": where draining goes on)
-- KEYS[7 + buckets + i], i = 1..n_fail: the failure zset of a client key
-- ARGV: replica id, n_rate, n_fail, ban cursor (ms, 0 = all live bans), failure window ms,
--       max_failures, ban ms, buckets, load score (-1: not loading), load skip, page size,
--       n_add, then n_add counts, n_rate client keys (the first n_add have those new
--       admissions, the others only fetch their totals), n_fail counts, n_fail client keys,
--       then the admin part: known version ("" = none), max_bans, new version nonce,
--       republish (1: the ops republish the bans a replica holds), n_ops,
--       then n_ops triples (kind: "ban" | "lift" | "key", network or client key, ban ms).
-- Returns: { now ms, replicas, { rate totals }, { ban members }, new cursor, load score,
--            load skip,
--            admin version, lost (1: Redis lost the version this replica knew),
--            { network, until ms, ... } (only when the version is not the known one),
--            { refused networks } }
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
local load_from = tonumber(ARGV[9])
local load_skip = tonumber(ARGV[10])
local page_size = tonumber(ARGV[11])
local n_add = tonumber(ARGV[12])
local base = 12
local replica_ttl = 5000
local log_keep = 60000

redis.call('ZADD', KEYS[1], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - replica_ttl)
local replicas = redis.call('ZCARD', KEYS[1])
redis.call('PEXPIRE', KEYS[1], replica_ttl)

-- Connection rates. A command called from Lua costs more than the work it does on a few
-- fields, so each step is a few multi-field commands (in chunks: Lua's unpack has a stack
-- limit): publishing reads the current second's counts and the totals of the keys with
-- new admissions and writes both back, and the batch's totals are one HMGET. A second that
-- left the window is drained out of the totals oldest first, at most `2 × page_size`
-- fields per call (HSCAN with a cursor kept in its hash), so no call's work grows with an
-- address spray or the number of replicas: each call adds at most `page_size` fields and
-- drains up to twice that. A second's hash lives until it is drained (its 60 s TTL is
-- renewed while draining goes on; Redis must not evict keys, see the README).
local totals_key = KEYS[6]
local slots = buckets + 1
local chunk = 1000
local slot_ttl = 60000
-- The totals outlive every second's hash (both are refreshed by the call that writes a
-- second), so no second is ever drained from totals that no longer hold it.
local totals_ttl = slot_ttl + 1000
-- The counts of `names` in the hash at `key`, 0 where absent.
local function counts_of(key, names)
  local out = {}
  for first = 1, #names, chunk do
    local got = redis.call('HMGET', key, unpack(names, first, math.min(first + chunk - 1, #names)))
    for j = 1, #got do
      out[first + j - 1] = tonumber(got[j]) or 0
    end
  end
  return out
end
-- Runs `command key ...` over `args` in chunks of `step` arguments.
local function chunked(command, key, args, step)
  for first = 1, #args, step do
    redis.call(command, key, unpack(args, first, math.min(first + step - 1, #args)))
  end
end
-- Takes `counts` of `names` out of the totals (a field that reaches 0 goes).
local function subtract(names, counts)
  local have = counts_of(totals_key, names)
  local keep, gone = {}, {}
  for j = 1, #names do
    local left = have[j] - counts[j]
    if left > 0 then
      keep[#keep + 1] = names[j]
      keep[#keep + 1] = left
    else
      gone[#gone + 1] = names[j]
    end
  end
  chunked('HSET', totals_key, keep, 2 * chunk)
  chunked('HDEL', totals_key, gone, chunk)
end
-- Drains the second held at `key` out of the totals: at most `budget` fields. Each field
-- drained is deleted from the second's hash, so none is taken twice. Returns the fields
-- drained and whether the hash is gone.
local function drain(key, budget)
  local cursor = redis.call('HGET', key, ':cursor') or '0'
  local whole = redis.call('HLEN', key) <= budget
  local taken = 0
  repeat
    -- All of it when it fits: no field needs deleting one by one.
    local page = whole and { '0', redis.call('HGETALL', key) } or redis.call('HSCAN', key, cursor, 'COUNT', chunk)
    cursor = page[1]
    local flat, names, counts, seen = page[2], {}, {}, {}
    -- A page may hold more than COUNT fields (while Redis resizes the hash): those over
    -- the budget stay for a later pass (the hash goes only once it is empty).
    local room = budget - taken
    for j = 1, #flat, 2 do
      local field = flat[j]
      if #names < room and field ~= ':second' and field ~= ':cursor' and not seen[field] then
        seen[field] = true
        names[#names + 1] = field
        counts[#counts + 1] = tonumber(flat[j + 1])
      end
    end
    subtract(names, counts)
    if not whole then
      chunked('HDEL', key, names, chunk)
    end
    taken = taken + #names
  until cursor == '0' or taken >= budget
  if cursor ~= '0' then
    redis.call('HSET', key, ':cursor', cursor)
    redis.call('PEXPIRE', key, slot_ttl)
    return taken, false
  end
  if not whole then
    -- A scan resumed from a cursor of an earlier Redis process (restarted, or failed
    -- over: another hash seed) may have skipped fields: gone only when none is left.
    redis.call('HDEL', key, ':cursor')
    if redis.call('HLEN', key) > 1 then
      redis.call('PEXPIRE', key, slot_ttl)
      return taken, false
    end
  end
  redis.call('UNLINK', key)
  return taken, true
end
-- No call for longer than the window (Redis unreachable for everyone, the cluster
-- stopped): nothing the rate hashes hold still counts. The totals' TTL, set by every
-- call, tells how long ago the last one was; dropping everything now keeps old seconds
-- drained later from being subtracted from new totals.
local since = totals_ttl - redis.call('PTTL', totals_key)
if since > (buckets + 1) * 1000 and since <= totals_ttl then
  redis.call('UNLINK', totals_key)
  for j = 0, slots - 1 do
    redis.call('UNLINK', KEYS[7 + j])
  end
end
-- Which second each slot holds (nil: none).
local held = {}
for j = 0, slots - 1 do
  held[j] = tonumber(redis.call('HGET', KEYS[7 + j], ':second') or '')
end
local expire_to = sec - buckets
local due = {}
for j = 0, slots - 1 do
  if held[j] ~= nil and held[j] <= expire_to then
    due[#due + 1] = j
  end
end
table.sort(due, function(x, y) return held[x] < held[y] end)
local budget = 2 * page_size
for _, j in ipairs(due) do
  if budget <= 0 then
    break
  end
  local taken, done = drain(KEYS[7 + j], budget)
  budget = budget - taken
  if done then
    held[j] = nil
  end
end

-- The batch's keys are distinct (a map's keys), so read, add and write back is exact.
local fields, added, adds = {}, {}, {}
for i = 1, n_rate do
  fields[i] = ARGV[base + n_add + i]
end
for i = 1, n_add do
  added[i] = fields[i]
  adds[i] = tonumber(ARGV[base + i])
end
if #added > 0 then
  local j = sec % slots
  local now_key = KEYS[7 + j]
  if held[j] ~= sec then
    -- A slot still holding another second (one that the budget above did not empty, when
    -- draining fell a whole window behind after a spray over many replicas; or one ahead
    -- of Redis' clock, which went back) becomes this second, with what is left of the
    -- other in it: those counts then leave the totals with this second, later, which only
    -- refuses earlier, instead of this call draining them without bound.
    redis.call('HDEL', now_key, ':cursor')
    redis.call('HSET', now_key, ':second', sec)
  end
  redis.call('PEXPIRE', now_key, slot_ttl)
  for _, key in ipairs({ now_key, totals_key }) do
    local have = counts_of(key, added)
    local flat = {}
    for k = 1, #added do
      flat[2 * k - 1] = added[k]
      flat[2 * k] = have[k] + adds[k]
    end
    chunked('HSET', key, flat, 2 * chunk)
  end
end
-- Every call refreshes it (see totals_ttl).
redis.call('PEXPIRE', totals_key, totals_ttl)
local totals = counts_of(totals_key, fields)

for i = 1, n_fail do
  local key = KEYS[7 + buckets + i]
  local count = tonumber(ARGV[base + n_add + n_rate + i])
  local client = ARGV[base + n_add + n_rate + n_fail + i]
  for k = 1, count do
    redis.call('ZADD', key, now, id .. ':' .. now .. ':' .. k)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) > max_failures then
    redis.call('DEL', key)
    redis.call('ZADD', KEYS[2], 'GT', now + ban_ms, client)
    redis.call('ZADD', KEYS[3], now, client .. ' ' .. (now + ban_ms))
    if redis.call('PTTL', KEYS[2]) < ban_ms + 1000 then
      redis.call('PEXPIRE', KEYS[2], ban_ms + 1000)
    end
    redis.call('PEXPIRE', KEYS[3], log_keep)
  else
    redis.call('PEXPIRE', key, window)
  end
end

-- Admin bans (SPEC 9), see src/cluster/admin.rs.
local a = base + n_add + n_rate + 2 * n_fail
local known = ARGV[a + 1]
local max_bans = tonumber(ARGV[a + 2])
local nonce = ARGV[a + 3]
local republish = ARGV[a + 4] == '1'
local n_ops = tonumber(ARGV[a + 5])
local function counter(v)
  return tonumber(string.match(v, '^(%d+) '))
end
local version = redis.call('GET', KEYS[5]) or ''
local current = counter(version) or 0
local known_counter = counter(known) or 0
local lost = 0
-- Lost: the version this replica knew is gone (Redis restarted empty), older (restored
-- from an older snapshot, failed over to a lagging replica) or another history.
if known ~= '' and version ~= known and current <= known_counter and not republish then
  lost = 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local keep = 0
local changed = false
local refused = {}
-- When Redis lost the bans, changes wait: the replicas first publish every ban they hold.
if lost == 1 then n_ops = 0 end
for i = 0, n_ops - 1 do
  local kind = ARGV[a + 6 + 3 * i]
  local target = ARGV[a + 7 + 3 * i]
  local ms = tonumber(ARGV[a + 8 + 3 * i])
  if kind == 'ban' then
    if redis.call('ZSCORE', KEYS[4], target) or redis.call('ZCARD', KEYS[4]) < max_bans then
      redis.call('ZADD', KEYS[4], now + ms, target)
      keep = math.max(keep, ms)
      changed = true
    else
      refused[#refused + 1] = target
    end
  elseif kind == 'lift' then
    local expiry = redis.call('ZSCORE', KEYS[4], target)
    if expiry then
      redis.call('ZREM', KEYS[4], target)
      keep = math.max(keep, tonumber(expiry) - now)
      changed = true
    end
  elseif kind == 'key' then
    -- The key's authentication-failure ban: out of the set a starting replica reads (one
    -- member per key: O(log N) however large an attacker grew the set), and into the log
    -- the others read.
    redis.call('ZREM', KEYS[2], target)
    redis.call('ZADD', KEYS[3], now, 'lift ' .. target .. ' ' .. now)
    redis.call('PEXPIRE', KEYS[3], log_keep)
  end
end
if changed then
  -- The version outlives no ban it covered, so it is absent only when Redis lost it or
  -- every ban it covered has expired.
  version = (math.max(current, known_counter) + 1) .. ' ' .. nonce
  redis.call('SET', KEYS[5], version, 'KEEPTTL')
  if redis.call('PTTL', KEYS[5]) < keep then
    redis.call('PEXPIRE', KEYS[5], keep)
  end
  local last = redis.call('ZRANGE', KEYS[4], -1, -1, 'WITHSCORES')
  if #last > 0 then
    redis.call('PEXPIRE', KEYS[4], tonumber(last[2]) - now)
  end
end
local admin = {}
if lost == 0 and version ~= known then
  admin = redis.call('ZRANGE', KEYS[4], 0, -1, 'WITHSCORES')
end

redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - log_keep)
local bans = {}
if cursor == 0 or cursor < now - log_keep then
  -- A replica that starts (or was cut off too long) reads every live ban, one page per
  -- sync (the set may be large: each sync's work stays bounded), and the log from now on.
  load_from = now
  load_skip = 0
else
  bans = redis.call('ZRANGEBYSCORE', KEYS[3], cursor, '+inf')
end
if load_from >= 0 then
  -- Pages by (score, rank among equal scores): members ban at the same millisecond.
  local page = redis.call('ZRANGEBYSCORE', KEYS[2], load_from, '+inf', 'WITHSCORES',
    'LIMIT', load_skip, page_size)
  for j = 1, #page, 2 do
    bans[#bans + 1] = page[j] .. ' ' .. page[j + 1]
  end
  local n = #page / 2
  if n < page_size then
    load_from = -1
    load_skip = 0
  else
    local last = tonumber(page[#page])
    if last == load_from then
      load_skip = load_skip + n
    else
      load_skip = 0
      for j = #page, 2, -2 do
        if tonumber(page[j]) ~= last then break end
        load_skip = load_skip + 1
      end
      load_from = last
    end
  end
end
return { now, replicas, totals, bans, now, load_from, load_skip, version, lost, admin, refused }
