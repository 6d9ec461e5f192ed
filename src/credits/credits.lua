-- Leases credits from, or returns them to, the fleet's copy of one key's
-- balance.
--
-- KEYS[1]: `keywarden:cr:{<key id>}`, a hash: `epoch` (the key's
--          credits_epoch the balance was seeded at), `balance` (credits not
--          leased to any replica) and `born` (Redis's time at the seeding,
--          µs, so that a lease taken before the entry was lost and seeded
--          again is never returned into the new one).
-- ARGV[1]: 0 to lease, 1 to return.
--
-- lease: ARGV[2] the caller's epoch, ARGV[3] the balance to seed with, or
--        -1 if the caller has not read it, ARGV[4] credits needed (beyond
--        what the caller holds), ARGV[5] the largest lease, ARGV[6] the
--        entry's lifetime (ms). An absent entry, or one of an older epoch,
--        is seeded from ARGV[3]; without a seed the answer asks for one. A
--        caller with an older epoch leases from the newer entry. The grant
--        is at least what is needed and at most ⌈balance / 16⌉ or the
--        largest lease, or nothing if the balance cannot pay what is needed.
--        Returns {1 if a seed is needed else 0, granted, balance left,
--        epoch, born}.
-- return: ARGV[2] epoch, ARGV[3] born, ARGV[4] credits. Added back only to
--         the entry they were leased from. Returns 1 if added, else 0.
local key = KEYS[1]
local s = redis.call('HMGET', key, 'epoch', 'balance', 'born')
local epoch, balance, born = tonumber(s[1]), tonumber(s[2]), tonumber(s[3])
if tonumber(ARGV[1]) == 1 then
  if epoch == tonumber(ARGV[2]) and born == tonumber(ARGV[3]) then
    redis.call('HINCRBY', key, 'balance', ARGV[4])
    return 1
  end
  return 0
end
local want_epoch, seed, need = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local largest, lifetime = tonumber(ARGV[5]), tonumber(ARGV[6])
if not epoch or not balance or not born or epoch < want_epoch then
  if seed < 0 then
    return {1, 0, 0, 0, 0}
  end
  local t = redis.call('TIME')
  epoch, balance, born = want_epoch, seed, tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local granted = 0
if need <= balance then
  granted = math.min(balance, math.max(need, math.min(largest, math.ceil(balance / 16))))
  balance = balance - granted
end
redis.call('HSET', key, 'epoch', string.format('%d', epoch), 'balance', string.format('%d', balance),
  'born', string.format('%d', born))
redis.call('PEXPIRE', key, lifetime)
return {0, granted, balance, epoch, born}
