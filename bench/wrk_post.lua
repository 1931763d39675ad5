-- wrk script: POST one prepared multipart body (BODY_FILE, CONTENT_TYPE, AUTH from the environment).
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE")
local auth = os.getenv("AUTH")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end

local errors = 0
response = function(status, headers, body)
  if status ~= 200 then errors = errors + 1 end
end

done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_us=%d non2xx=%d p50_us=%d p90_us=%d p99_us=%d errors_socket=%d\n",
    summary.requests, summary.duration, summary.errors.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
