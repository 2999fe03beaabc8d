-- The session-ticket keys of the current and previous rotation periods (SPEC 7). The first
-- replica that finds none for the current period sets its candidate (SET NX, with a TTL of
-- two periods and a minute); every replica then reads the same key.
-- ARGV: key prefix, rotation (s), candidate key (hex), TTL (ms).
-- Returns: { period, current key (hex), previous key (hex, or "" when gone) }
local t = redis.call('TIME')
local period = math.floor(tonumber(t[1]) / tonumber(ARGV[2]))
local current = ARGV[1] .. 'ticket:' .. period
local previous = ARGV[1] .. 'ticket:' .. (period - 1)
redis.call('SET', current, ARGV[3], 'NX', 'PX', ARGV[4])
return { period, redis.call('GET', current), redis.call('GET', previous) or '' }
