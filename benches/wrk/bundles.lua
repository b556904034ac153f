-- wrk script: POST the transaction Bundles written by `benches/load.rs` with
-- SENTINELLA_BENCH_WRITE_DIR=<dir> (bundle-00000.json, bundle-00001.json, ...), one per request.
--
--   SENTINELLA_WRK_BUNDLES=<dir> SENTINELLA_WRK_THREADS=2 \
--     wrk -t2 -c32 -d30s --latency -s benches/wrk/bundles.lua http://127.0.0.1:8080/fhir
--
-- Environment:
--   SENTINELLA_WRK_BUNDLES  directory of the Bundles (required)
--   SENTINELLA_WRK_COUNT    use bundle-00000 .. bundle-<COUNT-1> (default: up to the first missing file)
--   SENTINELLA_WRK_PATH     request path (default /fhir)
--   SENTINELLA_WRK_THREADS  the -t given to wrk (default 2): thread k of T sends Bundles k, k+T,
--                           k+2T, ... so that together the threads send every Bundle once, in file
--                           order, before any is sent again. wrk gives a thread's init() neither the
--                           number of threads nor their total, hence the variable; done() warns
--                           when it does not match.
--
-- Each thread reads its share of the files and pre-formats its requests in init() (memory: the
-- Bundles' size, about 8 KiB each). The headers are those of benches/load.rs: Content-Type and
-- Accept application/fhir+json, Prefer: return=minimal.
--
-- A response counts as an error when its status is not 2xx, or when it is not a
-- transaction-response whose every entry has a 2xx status; wrk's socket errors and timeouts are
-- added in done(), which prints the counts, p50/p90/p99/p99.9 latency in ms, requests/s and one
-- `wrk-result:` line for benches/wrk/run.sh.

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("thread_index", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local function env(name, default)
   local v = os.getenv(name)
   if v == nil or v == "" then
      return default
   end
   return v
end

local function env_int(name, default)
   local v = env(name, nil)
   if v == nil then
      return default
   end
   local n = tonumber(v)
   if n == nil or n < 1 or n ~= math.floor(n) then
      error(name .. " must be a positive integer, got " .. v)
   end
   return n
end

local function read_file(path)
   local f = io.open(path, "rb")
   if f == nil then
      return nil
   end
   local body = f:read("*a")
   f:close()
   return body
end

-- per thread (each wrk thread has its own Lua state); globals, so that done() can read them
-- with thread:get()
requests = {}
next_request = 1
sent = 0
wraps = 0
bundles_total = 0
path = "/fhir"
threads_expected = 2
non2xx = 0
bad_body = 0
statuses = {}
first_error = nil

function init(args)
   local dir = env("SENTINELLA_WRK_BUNDLES", nil)
   if dir == nil then
      error("SENTINELLA_WRK_BUNDLES must name the directory of bundle-NNNNN.json files")
   end
   path = env("SENTINELLA_WRK_PATH", "/fhir")
   threads_expected = env_int("SENTINELLA_WRK_THREADS", 2)
   local count = env_int("SENTINELLA_WRK_COUNT", nil)
   local index = thread_index or 0
   local headers = {
      ["Content-Type"] = "application/fhir+json",
      ["Accept"] = "application/fhir+json",
      ["Prefer"] = "return=minimal",
   }
   local i = 0
   while count == nil or i < count do
      local file = string.format("%s/bundle-%05d.json", dir, i)
      local stride_member = (i % threads_expected) == (index % threads_expected)
      if stride_member then
         local body = read_file(file)
         if body == nil then
            if count ~= nil then
               error("missing " .. file .. " (SENTINELLA_WRK_COUNT=" .. count .. ")")
            end
            break
         end
         requests[#requests + 1] = wrk.format("POST", path, headers, body)
      else
         -- another thread's Bundle: only find out whether the sequence goes on
         local f = io.open(file, "rb")
         if f == nil then
            if count ~= nil then
               error("missing " .. file .. " (SENTINELLA_WRK_COUNT=" .. count .. ")")
            end
            break
         end
         f:close()
      end
      i = i + 1
   end
   bundles_total = i
   if #requests == 0 then
      error(string.format("thread %d: no Bundle to send in %s (found %d files)", index, dir, i))
   end
end

function request()
   -- note: wrk calls request() once in the first thread before the run to check for pipelining,
   -- so that thread's first Bundle is skipped in the first pass
   if next_request > #requests then
      next_request = 1
      wraps = wraps + 1
   end
   local r = requests[next_request]
   next_request = next_request + 1
   sent = sent + 1
   return r
end

local function note_error(status, what)
   if first_error == nil then
      first_error = string.format("HTTP %d, %s", status, what)
   end
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   body = body or ""
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      note_error(status, "body: " .. string.sub(body, 1, 400))
      return
   end
   -- a 2xx transaction-response must carry one 2xx status per entry (11 for these Bundles);
   -- anything else is counted as an error
   if not string.find(body, '"transaction%-response"') then
      bad_body = bad_body + 1
      note_error(status, "not a transaction-response: " .. string.sub(body, 1, 400))
      return
   end
   -- entry.response.status is "201 Created" etc.; resources (if any) have statuses like "final"
   local _, entries = string.gsub(body, '"status"%s*:%s*"%d%d%d', "")
   local _, ok = string.gsub(body, '"status"%s*:%s*"2%d%d', "")
   if entries == 0 or entries ~= ok then
      bad_body = bad_body + 1
      note_error(status, string.format("%d of %d entries 2xx: %s", ok, entries, string.sub(body, 1, 400)))
   end
end

local function ms(us)
   return us / 1000.0
end

function done(summary, latency, requests_stats)
   local non2xx_total, bad_total, wraps_max, bundles, first = 0, 0, 0, 0, nil
   local merged = {}
   local expected = nil
   for _, t in ipairs(threads) do
      non2xx_total = non2xx_total + (t:get("non2xx") or 0)
      bad_total = bad_total + (t:get("bad_body") or 0)
      wraps_max = math.max(wraps_max, t:get("wraps") or 0)
      bundles = math.max(bundles, t:get("bundles_total") or 0)
      expected = expected or t:get("threads_expected")
      first = first or t:get("first_error")
      for status, n in pairs(t:get("statuses") or {}) do
         merged[status] = (merged[status] or 0) + n
      end
   end
   local e = summary.errors
   local socket = e.connect + e.read + e.write + e.timeout
   local errors = non2xx_total + bad_total + socket
   local secs = summary.duration / 1e6
   local rps = summary.requests / secs
   local codes = {}
   for status, n in pairs(merged) do
      codes[#codes + 1] = string.format("%d:%d", status, n)
   end
   table.sort(codes)

   io.write("--- bundles.lua\n")
   if expected ~= nil and expected ~= thread_count then
      io.write(string.format(
         "WARNING: SENTINELLA_WRK_THREADS=%d but wrk ran %d threads: the Bundle order is not the file order\n",
         expected, thread_count))
   end
   io.write(string.format("Bundles available %d, sent %d (%s)\n", bundles, summary.requests,
      wraps_max > 0 and string.format("WARNING: the list was sent %d more time(s): returning patients above the generated share", wraps_max)
      or "each at most once"))
   io.write(string.format("responses by status %s\n", #codes > 0 and table.concat(codes, " ") or "(none)"))
   io.write(string.format(
      "errors %d: non-2xx %d, 2xx with failed entries %d, socket connect %d read %d write %d timeout %d\n",
      errors, non2xx_total, bad_total, e.connect, e.read, e.write, e.timeout))
   if first ~= nil then
      io.write("first error: " .. first .. "\n")
   end
   io.write(string.format("latency ms: p50 %.2f | p90 %.2f | p99 %.2f | p99.9 %.2f | max %.2f\n",
      ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
      ms(latency:percentile(99.9)), ms(latency.max)))
   io.write(string.format("throughput %.1f requests/s (%d in %.2f s)\n", rps, summary.requests, secs))
   io.write(string.format(
      "wrk-result: requests=%d duration_s=%.3f rps=%.2f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f p999_ms=%.2f max_ms=%.2f errors=%d non2xx=%d bad=%d socket_errors=%d wraps=%d\n",
      summary.requests, secs, rps, ms(latency:percentile(50)), ms(latency:percentile(90)),
      ms(latency:percentile(99)), ms(latency:percentile(99.9)), ms(latency.max), errors,
      non2xx_total, bad_total, socket, wraps_max))
end
