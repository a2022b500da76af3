-- wrk script for bench/intake.py: posts pre-generated signed appeals, each one once.
--
-- INTAKE_APPEALS names a file of lines "<Dispatch-Signature value>\t<JSON body>". Thread k of
-- INTAKE_THREADS takes lines k, k + T, k + 2T...: every request carries a distinct appeal (a
-- repeated one would be answered as a replay, and counted as accepted without a write).
-- INTAKE_WRAP=1 starts over at the end (the bare endpoint does not care); otherwise a thread
-- that runs out stops and says so, and the bench reports the run as invalid.
-- done() prints one line "INTAKE_RESULT <json>" that the bench parses.

local threads = {}
local next_id = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

function init(args)
  local path = os.getenv("INTAKE_APPEALS")
  local nthreads = tonumber(os.getenv("INTAKE_THREADS"))
  wrap = os.getenv("INTAKE_WRAP") == "1"
  reqs = {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == id then
      local sig, body = line:match("^([^\t]*)\t(.*)$")
      local headers = { ["Content-Type"] = "application/json", ["Dispatch-Signature"] = sig }
      table.insert(reqs, wrk.format("POST", nil, headers, body))
    end
    i = i + 1
  end
  pos = 0
  accepted = 0   -- 202
  other_2xx = 0
  non_2xx = 0
  exhausted = 0
  statuses = {}
end

function request()
  pos = pos + 1
  if pos > #reqs then
    if wrap then
      pos = 1
    else
      exhausted = exhausted + 1
      wrk.thread:stop()
      pos = #reqs
    end
  end
  return reqs[pos]
end

function response(status, headers, body)
  if status == 202 then
    accepted = accepted + 1
  elseif status >= 200 and status < 300 then
    other_2xx = other_2xx + 1
  else
    non_2xx = non_2xx + 1
  end
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
end

function done(summary, latency, requests)
  local a, o, n, x = 0, 0, 0, 0
  local by_status = {}
  for _, t in ipairs(threads) do
    a = a + t:get("accepted")
    o = o + t:get("other_2xx")
    n = n + t:get("non_2xx")
    x = x + t:get("exhausted")
    for k, v in pairs(t:get("statuses")) do
      by_status[k] = (by_status[k] or 0) + v
    end
  end
  local parts = {}
  for k, v in pairs(by_status) do
    table.insert(parts, string.format('"%s":%d', k, v))
  end
  local e = summary.errors
  io.write(string.format(
    'INTAKE_RESULT {"duration_us":%d,"requests":%d,"accepted":%d,"other_2xx":%d,"non_2xx":%d,'
      .. '"exhausted":%d,"statuses":{%s},"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},'
      .. '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.duration, summary.requests, a, o, n, x, table.concat(parts, ","),
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
