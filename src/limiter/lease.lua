-- Leases tokens from the fleet's buckets of one key's rate limits.
--
-- KEYS[i]: the bucket of limit i, `keywarden:rl:{<key id>}:<name>`; the hash
--          tag puts every limit of a key in one Redis Cluster slot.
-- ARGV:    for each limit, three numbers: limit, window (µs), tokens wanted.
--
-- A bucket holds `limit` tokens and refills at `limit / window`, on Redis's
-- clock (one clock for the whole fleet). Its state is the tokens it held at
-- `at`; a bucket that is absent, or was made for another limit or window,
-- is full. It expires one window after its last use, when it would be full.
--
-- Returns, for each limit: tokens granted (at most what is wanted and what
-- the bucket holds), whole tokens left, µs until the bucket is full again,
-- and µs until it holds a whole token (0 if it does now).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[3 * i - 2])
  local window = tonumber(ARGV[3 * i - 1])
  local want = tonumber(ARGV[3 * i])
  local s = redis.call('HMGET', key, 'tokens', 'at', 'limit', 'window')
  local tokens = limit
  if s[1] and tonumber(s[3]) == limit and tonumber(s[4]) == window then
    local elapsed = math.max(0, now - tonumber(s[2]))
    tokens = math.min(limit, tonumber(s[1]) + elapsed * limit / window)
  end
  local granted = math.max(0, math.min(want, math.floor(tokens)))
  tokens = tokens - granted
  redis.call('HSET', key, 'tokens', string.format('%.17g', tokens), 'at', string.format('%d', now),
    'limit', limit, 'window', window)
  redis.call('PEXPIRE', key, math.ceil(window / 1000))
  local until_full = math.ceil((limit - tokens) * window / limit)
  local next_token = 0
  if tokens < 1 then
    next_token = math.ceil((1 - tokens) * window / limit)
  end
  out[#out + 1] = granted
  out[#out + 1] = math.floor(tokens)
  out[#out + 1] = until_full
  out[#out + 1] = next_token
end
return out
