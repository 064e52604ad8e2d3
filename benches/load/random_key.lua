-- wrk script for the warm (hot-path) runs: every request carries
-- `Authorization: Bearer <key>` with a key picked at random from a file, so requests are
-- spread over all the keys. The same script drives every target (nginx, HAProxy and the
-- upstream simply ignore the header), so the load generator pays the same per-request
-- cost everywhere. Requests are formatted once in init(), not per request.
--
-- usage: wrk ... -s random_key.lua URL -- KEYFILE [PATH]
local threads = {}
local reqs = {}
local n = 0

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file = args[1]
  local path = args[2] or "/api/v1/items/42"
  for line in io.lines(file) do
    if #line > 0 then
      n = n + 1
      reqs[n] = wrk.format("GET", path, { ["Authorization"] = "Bearer " .. line })
    end
  end
  if n == 0 then error("no keys in " .. tostring(file)) end
  math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

function request()
  return reqs[math.random(n)]
end

-- One machine-readable line for the harness (latency in microseconds).
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d " ..
    "status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d\n",
    summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.status, e.connect, e.read, e.write, e.timeout))
end
