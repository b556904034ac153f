-- wrk script: POST one resource (by default the antibiogram transaction Bundle) to an operation
-- such as $validate, again and again, and count the answers that are not a clean 200.
--
--   target/release/sentinella serve --database sqlite:///tmp/sentinella-wrk.db --listen 127.0.0.1:8080 &
--   SENTINELLA_WRK_BODY=tests/fixtures/antibiogram-transaction.json \
--     wrk -t2 -c16 -d20s --latency -s benches/wrk/validate.lua 'http://127.0.0.1:8080/fhir/Bundle/$validate'
--
-- Environment: SENTINELLA_WRK_BODY (default tests/fixtures/antibiogram-transaction.json).
-- An answer is an error when its status is not 200 or its OperationOutcome holds an error issue.

local path = os.getenv("SENTINELLA_WRK_BODY") or "tests/fixtures/antibiogram-transaction.json"
local f = assert(io.open(path, "rb"), "cannot read " .. path)
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/fhir+json"
wrk.headers["Accept"] = "application/fhir+json"

local bad = 0

function response(status, headers, body)
   if status ~= 200 or string.find(body, '"severity":"error"', 1, true) then
      bad = bad + 1
      if bad == 1 then
         io.stderr:write("first bad answer: " .. status .. " " .. string.sub(body, 1, 300) .. "\n")
      end
   end
end

function done(summary, latency, requests)
   io.write(string.format("requests %d, bad answers (this thread's count) %d, %.0f req/s\n",
      summary.requests, bad, summary.requests / (summary.duration / 1e6)))
end
