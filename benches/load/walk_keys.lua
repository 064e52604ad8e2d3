-- wrk script for the cold path and the memory fill: walks a key file WITHOUT repeats.
-- Thread t of T sends the keys at indexes offset+t, offset+t+T, offset+t+2T, ... (1-based
-- lines after skipping `offset`), each exactly once, so every request is a cache miss on
-- a fresh keygate. When a thread runs out of keys it sends `GET /healthz` (a public
-- route: no key, no store read) and reports itself as exhausted; the harness treats an
-- exhausted timed run as invalid and, for the memory fill, stops wrk with SIGINT once
-- every key has been read from Redis.
--
-- With DELAY_MS > 0 each connection waits that long after a response before its next
-- request (wrk's delay() hook): a throttled, "moderate" load instead of a saturating one.
--
-- usage: wrk -tT ... -s walk_keys.lua URL -- KEYFILE OFFSET T [PATH [DELAY_MS]]
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

local keys = {}
local pos = 0
local path
local fallback
exhausted = 0
sent = 0

function init(args)
  local file = args[1]
  local offset = tonumber(args[2] or "0")
  local nthreads = tonumber(args[3] or "1")
  path = args[4] or "/api/v1/items/42"
  local me = tid or 0
  local i = 0
  for line in io.lines(file) do
    i = i + 1
    if i > offset and (i - offset - 1) % nthreads == me and #line > 0 then
      keys[#keys + 1] = line
    end
  end
  fallback = wrk.format("GET", "/healthz")
  local delay_ms = tonumber(args[5] or "0")
  if delay_ms > 0 then
    -- Defined here, before wrk asks whether the script has a delay() hook.
    delay = function() return delay_ms end
  end
end

function request()
  pos = pos + 1
  local k = keys[pos]
  if k == nil then
    exhausted = 1
    return fallback
  end
  sent = sent + 1
  return wrk.format("GET", path, { ["Authorization"] = "Bearer " .. k })
end

function done(summary, latency, requests)
  local sent_total, exhausted_threads, max_sent = 0, 0, 0
  for _, t in ipairs(threads) do
    local s = t:get("sent") or 0
    sent_total = sent_total + s
    if s > max_sent then max_sent = s end
    exhausted_threads = exhausted_threads + (t:get("exhausted") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
    "status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d " ..
    "keys_sent=%d max_thread_sent=%d exhausted_threads=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout, sent_total, max_sent,
    exhausted_threads))
end
