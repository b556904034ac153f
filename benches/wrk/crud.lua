-- wrk script: a CRUD mix on Patient against a FHIR base with seeded Patients.
--
--   40% POST {path}/Patient          a new Patient, unique identifier in https://example.org/mrn
--   40% GET  {path}/Patient/<id>     a seeded Patient
--   20% GET  {path}/Patient?identifier=https://example.org/mrn|<value>   a seeded Patient
--
-- The operations follow the fixed cycle create, read, create, read, search (each thread starts at
-- a different point of it), so any stretch of the run has the 40/40/20 proportions; the seeded
-- Patient of a read or search is drawn at random.
--
--   SENTINELLA_WRK_SEEDS=seeds.tsv SENTINELLA_WRK_TAG=abc123 \
--     wrk -t2 -c32 -d30s --latency -s benches/wrk/crud.lua http://127.0.0.1:8080/fhir
--
-- Environment:
--   SENTINELLA_WRK_SEEDS  file of the seeded Patients, one "<id><TAB><identifier value>" a line
--                         (written by benches/wrk/run.sh crud; required)
--   SENTINELLA_WRK_PATH   FHIR base path (default /fhir)
--   SENTINELLA_WRK_TAG    part of every created identifier value, unique per run (default: the time)
--   SENTINELLA_WRK_SEED   random seed of the draws (default 1; thread k uses seed + k)
--
-- Errors: a non-2xx response, a read that is not a Patient, a search that does not find exactly
-- one Patient (the identifiers are unique), plus wrk's socket errors and timeouts. done() prints
-- the counts, p50/p90/p99/p99.9 latency in ms (all operations together: wrk has one histogram),
-- requests/s and one `wrk-result:` line for benches/wrk/run.sh.

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

local MRN = "https://example.org/mrn"
local FAMILY = { "Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci" }
local GIVEN_M = { "Marco", "Giuseppe", "Luca", "Giovanni", "Antonio", "Francesco" }
local GIVEN_F = { "Maria", "Anna", "Giulia", "Francesca", "Chiara", "Sara" }
local CYCLE = { "create", "read", "create", "read", "search" }

-- per thread; globals, so that done() can read them with thread:get()
ids = {}
values = {}
path = "/fhir"
tag = ""
created = 0
step = 0
counts = { create = 0, read = 0, search = 0 }
non2xx = 0
bad_body = 0
statuses = {}
first_error = nil
json_headers = { ["Accept"] = "application/fhir+json" }
post_headers = {
   ["Accept"] = "application/fhir+json",
   ["Content-Type"] = "application/fhir+json",
}

local function urlencode(s)
   return (string.gsub(s, "[^%w%-%._~]", function(c)
      return string.format("%%%02X", string.byte(c))
   end))
end

function init(args)
   local seeds = env("SENTINELLA_WRK_SEEDS", nil)
   if seeds == nil then
      error("SENTINELLA_WRK_SEEDS must name the file of seeded Patients (<id>\\t<value> a line)")
   end
   path = env("SENTINELLA_WRK_PATH", "/fhir")
   tag = env("SENTINELLA_WRK_TAG", tostring(os.time()))
   local index = thread_index or 0
   local f = io.open(seeds, "r")
   if f == nil then
      error("cannot open " .. seeds)
   end
   for line in f:lines() do
      local id, value = string.match(line, "^(%S+)\t(%S+)$")
      if id ~= nil then
         ids[#ids + 1] = id
         values[#values + 1] = value
      end
   end
   f:close()
   if #ids == 0 then
      error("no seeded Patient in " .. seeds)
   end
   math.randomseed((tonumber(env("SENTINELLA_WRK_SEED", "1")) or 1) + index)
   step = index % #CYCLE
end

local function create_request()
   created = created + 1
   local female = math.random(2) == 1
   local body = string.format(
      '{"resourceType":"Patient","identifier":[{"system":"%s","value":"wrk-%s-%d-%d"}],' ..
      '"name":[{"family":"%s","given":["%s"]}],"gender":"%s","birthDate":"%04d-%02d-%02d"}',
      MRN, tag, thread_index or 0, created,
      FAMILY[math.random(#FAMILY)], (female and GIVEN_F or GIVEN_M)[math.random(6)],
      female and "female" or "male",
      1930 + math.random(0, 75), math.random(12), math.random(28))
   return wrk.format("POST", path .. "/Patient", post_headers, body)
end

function request()
   step = step % #CYCLE + 1
   local op = CYCLE[step]
   counts[op] = counts[op] + 1
   if op == "create" then
      return create_request()
   end
   local k = math.random(#ids)
   if op == "read" then
      return wrk.format("GET", path .. "/Patient/" .. ids[k], json_headers)
   end
   return wrk.format("GET", path .. "/Patient?identifier=" .. urlencode(MRN .. "|" .. values[k]),
      json_headers)
end

local function note_error(status, what, body)
   if first_error == nil then
      first_error = string.format("HTTP %d, %s: %s", status, what, string.sub(body, 1, 400))
   end
end

function response(status, headers, body)
   statuses[status] = (statuses[status] or 0) + 1
   body = body or ""
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      note_error(status, "non-2xx", body)
      return
   end
   if status == 201 then
      return -- a create (its body is the Patient or empty, per Prefer)
   end
   -- a 200 is a read (the Patient) or a search (a searchset)
   if string.find(body, '"searchset"', 1, true) then
      local _, found = string.gsub(body, '"fullUrl"%s*:', "")
      if found ~= 1 then
         bad_body = bad_body + 1
         note_error(status, string.format("search found %d Patients, expected 1", found), body)
      end
   elseif not string.find(body, '"resourceType"%s*:%s*"Patient"') then
      bad_body = bad_body + 1
      note_error(status, "read did not return a Patient", body)
   end
end

local function ms(us)
   return us / 1000.0
end

function done(summary, latency, requests_stats)
   local non2xx_total, bad_total, first = 0, 0, nil
   local merged, ops = {}, { create = 0, read = 0, search = 0 }
   for _, t in ipairs(threads) do
      non2xx_total = non2xx_total + (t:get("non2xx") or 0)
      bad_total = bad_total + (t:get("bad_body") or 0)
      first = first or t:get("first_error")
      for status, n in pairs(t:get("statuses") or {}) do
         merged[status] = (merged[status] or 0) + n
      end
      for op, n in pairs(t:get("counts") or {}) do
         ops[op] = ops[op] + n
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

   io.write("--- crud.lua\n")
   io.write(string.format("requests issued: create %d, read %d, search %d\n", ops.create, ops.read,
      ops.search))
   io.write(string.format("responses by status %s\n", #codes > 0 and table.concat(codes, " ") or "(none)"))
   io.write(string.format(
      "errors %d: non-2xx %d, wrong body %d, socket connect %d read %d write %d timeout %d\n",
      errors, non2xx_total, bad_total, e.connect, e.read, e.write, e.timeout))
   if first ~= nil then
      io.write("first error: " .. first .. "\n")
   end
   io.write(string.format("latency ms: p50 %.2f | p90 %.2f | p99 %.2f | p99.9 %.2f | max %.2f\n",
      ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
      ms(latency:percentile(99.9)), ms(latency.max)))
   io.write(string.format("throughput %.1f requests/s (%d in %.2f s)\n", rps, summary.requests, secs))
   io.write(string.format(
      "wrk-result: requests=%d duration_s=%.3f rps=%.2f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f p999_ms=%.2f max_ms=%.2f errors=%d non2xx=%d bad=%d socket_errors=%d wraps=0\n",
      summary.requests, secs, rps, ms(latency:percentile(50)), ms(latency:percentile(90)),
      ms(latency:percentile(99)), ms(latency:percentile(99.9)), ms(latency.max), errors,
      non2xx_total, bad_total, socket))
end
