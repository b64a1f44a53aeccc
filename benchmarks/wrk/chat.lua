-- wrk script: POST one fixed chat request, as an OpenAI SDK would, and print the results
-- as one JSON line that benchmarks/loadgen.py reads.
--
-- Environment (set by loadgen.py):
--   BENCH_BODY_FILE  the request body (benchmarks/mock_bodies.py request_body)
--   BENCH_KEY        the client key, sent as "Authorization: Bearer <key>"
--
-- No response() callback on purpose: defining one makes wrk hand every body to Lua,
-- which would slow the load generator down more than some targets. Non-2xx answers are
-- still counted, in summary.errors.status.

local f = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "none")

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"mean":%.1f,"max":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
