#!/usr/bin/env bash
# wrk benchmark of the release server: benches/wrk/run.sh ingest|crud|notifications [sqlite|postgres]
#
#   ingest         POST the transaction Bundles of benches/load.rs (11 resources each; 5% CRE
#                  cases, 20% returning patients, fixed seed), written to files with
#                  SENTINELLA_BENCH_WRITE_DIR
#   crud           seed 2,000 Patients, then 40% create Patient, 40% read by id, 20% search by
#                  identifier
#   notifications  POST the D.M. 1990 segnalazione transaction Bundles of benches/notifications.rs
#                  (5 to 7 resources each; classes I-V mixed, 10% in outbreak communities, fixed
#                  seed), written to files with SENTINELLA_NOTIF_WRITE_DIR; at the end the rules'
#                  time inside write transactions, as the server logs it when it stops
#
# It builds nothing: it runs target/release/sentinella (cargo build --release) on a free loopback
# port with a fresh SQLite file in a temporary directory, or a fresh PostgreSQL database
# sentinella_bench_<random> (created with psql on SENTINELLA_BENCH_PG, dropped at the end). The
# writes are durable as the server makes them (SQLite WAL synchronous=FULL; PostgreSQL with its
# own synchronous_commit). Load: wrk -t2 -c32 -d30s --latency. While wrk runs, the server's
# VmRSS is sampled from /proc; at the end one `summary:` line gives backend, scenario, req/s,
# p50/p99 ms, errors and the server's peak RSS (VmHWM), then the server gets SIGTERM.
#
# Needs: wrk (Debian/Ubuntu: apt-get install -y wrk; installed here when missing and apt-get is
# usable as root), curl, and psql for postgres. The ingest Bundles come from the compiled load
# bench (target/release/deps/load-*, built by `cargo build --release --benches` or a previous
# `cargo bench --bench load`), else from `cargo bench --bench load`, which compiles it; the
# notifications Bundles likewise from target/release/deps/notifications-* or `cargo bench --bench
# notifications`.
#
# Environment (all optional):
#   DURATION=30s THREADS=2 CONNECTIONS=32 WRK_TIMEOUT=30s   the wrk run
#   SENTINELLA_BENCH_N=20000                ingest, notifications: Bundles generated (sent round
#                                           robin, each once unless the run outlasts them: then a
#                                           warning)
#   SENTINELLA_BENCH_CRE_PCT=5 SENTINELLA_BENCH_REPEAT_PCT=20 SENTINELLA_BENCH_SEED=20250601
#   SENTINELLA_BENCH_BUNDLES=<dir>          ingest, notifications: use Bundles already written there
#   SENTINELLA_BENCH_LOAD_BIN=<path>        ingest: the compiled load bench to generate them with
#   SENTINELLA_BENCH_NOTIF_BIN=<path>       notifications: the compiled notifications bench to
#                                           generate them with
#   SENTINELLA_BENCH_PATIENTS=2000          crud: seeded Patients
#   SENTINELLA_BENCH_PG=postgres://postgres@127.0.0.1:5432   postgres: the server to create on
#   SENTINELLA_BENCH_BIN=target/release/sentinella
#   SENTINELLA_BENCH_URL=http://127.0.0.1:8080/fhir   use a server that is already running (its
#                                           FHIR base; loopback only): nothing is started or
#                                           dropped, the backend argument is only a label, and
#                                           SENTINELLA_BENCH_PID=<pid> enables the RSS figures
#   SENTINELLA_BENCH_RESULTS=<file>         append the summary line (with date and commit) there
#
# Exit status: 0 when the run had no errors, 1 when it had errors, 2 when it could not run.

set -euo pipefail

usage() {
    echo "usage: $0 ingest|crud|notifications [sqlite|postgres]   (see the header of this script)" >&2
    exit 2
}

die() {
    echo "run.sh: $*" >&2
    exit 2
}

scenario=${1:-}
backend=${2:-sqlite}
case $scenario in ingest | crud | notifications) ;; *) usage ;; esac
case $backend in sqlite | postgres) ;; *) usage ;; esac

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)

duration=${DURATION:-30s}
threads=${THREADS:-2}
connections=${CONNECTIONS:-32}
wrk_timeout=${WRK_TIMEOUT:-30s}
bundle_count=${SENTINELLA_BENCH_N:-20000}
cre_pct=${SENTINELLA_BENCH_CRE_PCT:-5}
repeat_pct=${SENTINELLA_BENCH_REPEAT_PCT:-20}
seed=${SENTINELLA_BENCH_SEED:-20250601}
patients=${SENTINELLA_BENCH_PATIENTS:-2000}
pg_admin=${SENTINELLA_BENCH_PG:-postgres://postgres@127.0.0.1:5432}
pg_admin=${pg_admin%/}
server_bin=${SENTINELLA_BENCH_BIN:-$root/target/release/sentinella}
external_url=${SENTINELLA_BENCH_URL:-}
results_file=${SENTINELLA_BENCH_RESULTS:-}

# --- tools ------------------------------------------------------------------------------------

if ! command -v wrk >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "wrk is missing: apt-get install -y wrk"
        DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >/dev/null ||
            { apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk >/dev/null; } ||
            die "could not install wrk (apt-get install -y wrk)"
    else
        die "wrk is needed: apt-get install -y wrk (Debian/Ubuntu), brew install wrk (macOS)"
    fi
fi
command -v curl >/dev/null 2>&1 || die "curl is needed"
if [[ -z $external_url && $backend == postgres ]]; then
    command -v psql >/dev/null 2>&1 || die "psql is needed for the postgres backend"
fi
if [[ -z $external_url && ! -x $server_bin ]]; then
    die "$server_bin is missing: build it first with 'cargo build --release' (this script builds nothing)"
fi

# --- state and cleanup -------------------------------------------------------------------------

tag=$(od -An -N4 -tx4 /dev/urandom | tr -d ' \n')
workdir=$(mktemp -d "${TMPDIR:-/tmp}/sentinella-wrk.XXXXXX")
server_pid=
server_log=$workdir/server.log
sampler_pid=
pg_db=
status=2

stop_server() {
    [[ -n $server_pid ]] || return 0
    local pid=$server_pid waited=0
    server_pid=
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && ((waited < 150)); do
            sleep 0.1
            waited=$((waited + 1))
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "the server did not stop within 15 s of SIGTERM: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    if ((rc != 0)); then
        echo "the server exited with status $rc" >&2
        status=2
    fi
}

# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    local rc=$?
    if [[ -n $sampler_pid ]]; then
        kill "$sampler_pid" 2>/dev/null || true
        wait "$sampler_pid" 2>/dev/null || true
    fi
    stop_server
    if [[ -n $pg_db ]]; then
        psql "$pg_admin/postgres" -qAt -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$pg_db\"" >/dev/null 2>&1 ||
            psql "$pg_admin/postgres" -qAt -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS \"$pg_db\" WITH (FORCE)" >/dev/null ||
            echo "could not drop database $pg_db" >&2
    fi
    if ((rc != 0 || status != 0)) && [[ -s $server_log ]]; then
        local kept
        kept=$(mktemp --suffix=.log "${TMPDIR:-/tmp}/sentinella-wrk-server.XXXXXX")
        cp "$server_log" "$kept"
        echo "server log kept: $kept" >&2
    fi
    rm -rf "$workdir"
}
trap cleanup EXIT
trap 'exit 2' INT TERM

# curl without proxies (the target is on loopback)
fcurl() {
    curl --noproxy '*' -sS "$@"
}

kib_field() { # kib_field <pid> VmRSS|VmHWM
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || true
}

mib() {
    if [[ -n ${1:-} ]]; then awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; else echo "n/a"; fi
}

# --- the server --------------------------------------------------------------------------------

# A port below the ephemeral range (so no outgoing connection holds it) that no TCP socket uses.
free_port() {
    local low=10000 high=32767 eph_low port hex
    if read -r eph_low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null && ((eph_low > low + 1000)); then
        high=$((eph_low - 1))
    fi
    for _ in $(seq 1 100); do
        port=$((low + (RANDOM * 32768 + RANDOM) % (high - low + 1)))
        hex=$(printf ':%04X' "$port")
        if ! awk -v h="$hex" 'FNR > 1 && substr($2, length($2) - 4) == h { found = 1 } END { exit !found }' \
            /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free loopback port found"
}

# wait_ready <base>: 0 when GET <base>/metadata answers 2xx, 1 when the server exits, 2 on timeout
wait_ready() {
    for _ in $(seq 1 600); do
        if [[ -n $server_pid ]] && ! kill -0 "$server_pid" 2>/dev/null; then
            return 1
        fi
        if fcurl -o /dev/null --max-time 5 -f -H 'Accept: application/fhir+json' "$1/metadata" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 2
}

rss_pid=
if [[ -n $external_url ]]; then
    base=${external_url%/}
    [[ $base =~ ^http://(localhost|127\.[0-9.]+|\[::1\])(:[0-9]+)?(/.*)?$ ]] ||
        die "SENTINELLA_BENCH_URL must be plain http on loopback, got $external_url"
    backend="external-$backend"
    rss_pid=${SENTINELLA_BENCH_PID:-}
    echo "target: running server at $base${rss_pid:+ (pid $rss_pid)}"
    wait_ready "$base" || die "GET $base/metadata did not answer 2xx within 60 s"
else
    if [[ $backend == sqlite ]]; then
        database="sqlite://$workdir/bench.db"
    else
        pg_db="sentinella_bench_$tag"
        psql "$pg_admin/postgres" -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE \"$pg_db\"" >/dev/null ||
            { pg_db= && die "could not create database sentinella_bench_$tag on $pg_admin"; }
        database="$pg_admin/$pg_db"
    fi
    for attempt in 1 2 3 4 5; do
        port=$(free_port)
        base="http://127.0.0.1:$port/fhir"
        echo "server: $server_bin serve --listen 127.0.0.1:$port --database $database"
        "$server_bin" serve --listen "127.0.0.1:$port" --database "$database" >"$server_log" 2>&1 &
        server_pid=$!
        ready=0
        wait_ready "$base" || ready=$?
        ((ready == 0)) && break
        if ((ready == 1)); then
            rc=0
            wait "$server_pid" || rc=$?
            server_pid=
            # another process took the port between the choice and the bind: choose again
            if ((attempt < 5)) && grep -q 'Address already in use' "$server_log"; then
                echo "port $port was taken: trying another"
                continue
            fi
            tail -n 20 "$server_log" >&2 || true
            die "the server exited during start-up (status $rc)"
        fi
        die "GET $base/metadata did not answer 2xx within 60 s"
    done
    rss_pid=$server_pid
fi
origin=$(sed -E 's#^(http://[^/]+).*#\1#' <<<"$base")
fhir_path=${base#"$origin"}
fhir_path=${fhir_path:-/}

rss_ready=
[[ -n $rss_pid ]] && rss_ready=$(kib_field "$rss_pid" VmRSS)
echo "ready: GET $base/metadata answered; server RSS $(mib "$rss_ready") MiB"

durability="sqlite: WAL, synchronous=FULL (set by the server)"
if [[ -n $pg_db ]]; then
    durability="postgres: $(psql "$pg_admin/$pg_db" -qAt -c "SELECT 'synchronous_commit=' || current_setting('synchronous_commit') || ' fsync=' || current_setting('fsync')" 2>/dev/null || echo 'settings unknown')"
elif [[ -n $external_url ]]; then
    durability="external server: as configured"
fi
echo "durability: $durability"

commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null || true) ]]; then
    commit="$commit+dirty"
fi

# --- the scenario's input ----------------------------------------------------------------------

wrk_env=(SENTINELLA_WRK_PATH="$fhir_path" SENTINELLA_WRK_THREADS="$threads")
if [[ $scenario == notifications ]]; then
    script=$here/bundles.lua
    bundles=${SENTINELLA_BENCH_BUNDLES:-}
    if [[ -n $bundles ]]; then
        [[ -f $bundles/bundle-00000.json ]] || die "$bundles holds no bundle-00000.json"
        echo "workload: Bundles already in $bundles"
    else
        bundles=$workdir/bundles
        gen_env=(SENTINELLA_NOTIF_WRITE_DIR="$bundles" SENTINELLA_NOTIF_N="$bundle_count"
            SENTINELLA_BENCH_SEED="$seed")
        notif_bin=${SENTINELLA_BENCH_NOTIF_BIN:-}
        if [[ -z $notif_bin ]]; then
            notif_bin=$(find "$root/target/release/deps" -maxdepth 1 -type f -name 'notifications-*' \
                ! -name '*.*' -perm -u+x -printf '%T@ %p\n' 2>/dev/null | sort -rn | head -n 1 | cut -d' ' -f2-)
        fi
        echo "workload: D.M. 1990 segnalazioni N=$bundle_count seed=$seed"
        if [[ -n $notif_bin ]]; then
            echo "generating with $notif_bin"
            env -u SENTINELLA_BENCH_DATABASE "${gen_env[@]}" "$notif_bin" | sed 's/^/  /'
        else
            echo "generating with cargo bench --bench notifications (compiles the bench if needed)"
            (cd "$root" && env -u SENTINELLA_BENCH_DATABASE "${gen_env[@]}" \
                cargo bench --bench notifications) | sed 's/^/  /'
        fi
        [[ -f $bundles/bundle-00000.json ]] || die "no Bundle was written to $bundles"
    fi
    [[ -f $bundles/workload.txt ]] && sed 's/^/  /' "$bundles/workload.txt"
    wrk_env+=(SENTINELLA_WRK_BUNDLES="$bundles")
elif [[ $scenario == ingest ]]; then
    script=$here/bundles.lua
    bundles=${SENTINELLA_BENCH_BUNDLES:-}
    if [[ -n $bundles ]]; then
        [[ -f $bundles/bundle-00000.json ]] || die "$bundles holds no bundle-00000.json"
        echo "workload: Bundles already in $bundles"
    else
        bundles=$workdir/bundles
        gen_env=(SENTINELLA_BENCH_WRITE_DIR="$bundles" SENTINELLA_BENCH_N="$bundle_count"
            SENTINELLA_BENCH_CRE_PCT="$cre_pct" SENTINELLA_BENCH_REPEAT_PCT="$repeat_pct"
            SENTINELLA_BENCH_SEED="$seed")
        load_bin=${SENTINELLA_BENCH_LOAD_BIN:-}
        if [[ -z $load_bin ]]; then
            # the newest compiled load bench that knows SENTINELLA_BENCH_WRITE_DIR
            while read -r _ candidate; do
                if grep -q SENTINELLA_BENCH_WRITE_DIR "$candidate"; then
                    load_bin=$candidate
                    break
                fi
            done < <(find "$root/target/release/deps" -maxdepth 1 -type f -name 'load-*' ! -name '*.*' \
                -perm -u+x -printf '%T@ %p\n' 2>/dev/null | sort -rn)
        fi
        echo "workload: N=$bundle_count cre=$cre_pct% repeat=$repeat_pct% seed=$seed"
        if [[ -n $load_bin ]]; then
            echo "generating with $load_bin"
            env -u SENTINELLA_BENCH_URL -u SENTINELLA_BENCH_DATABASE "${gen_env[@]}" "$load_bin" |
                sed 's/^/  /'
        else
            echo "generating with cargo bench --bench load (compiles the bench if needed)"
            (cd "$root" && env -u SENTINELLA_BENCH_URL -u SENTINELLA_BENCH_DATABASE "${gen_env[@]}" \
                cargo bench --bench load) | sed 's/^/  /'
        fi
        [[ -f $bundles/bundle-00000.json ]] || die "no Bundle was written to $bundles"
    fi
    [[ -f $bundles/workload.txt ]] && sed 's/^/  /' "$bundles/workload.txt"
    wrk_env+=(SENTINELLA_WRK_BUNDLES="$bundles")
else
    script=$here/crud.lua
    seeds=$workdir/seeds.tsv
    : >"$seeds"
    batch=250
    echo "seeding $patients Patients (transaction Bundles of $batch) ..."
    seed_start=$(date +%s.%N)
    for ((first = 0; first < patients; first += batch)); do
        last=$((first + batch < patients ? first + batch : patients))
        values=()
        {
            printf '{"resourceType":"Bundle","type":"transaction","entry":['
            for ((i = first; i < last; i++)); do
                value="seed-$tag-$i"
                values+=("$value")
                gender=male
                ((i % 2 == 0)) && gender=female
                ((i > first)) && printf ','
                printf '{"resource":{"resourceType":"Patient","identifier":[{"system":"https://example.org/mrn","value":"%s"}],"name":[{"family":"Seed","given":["P%d"]}],"gender":"%s","birthDate":"19%02d-%02d-%02d"},"request":{"method":"POST","url":"Patient"}}' \
                    "$value" "$i" "$gender" $((30 + i % 70)) $((1 + i % 12)) $((1 + i % 28))
            done
            printf ']}'
        } >"$workdir/seed-bundle.json"
        code=$(fcurl -o "$workdir/seed-response.json" -w '%{http_code}' -X POST \
            -H 'Content-Type: application/fhir+json' -H 'Accept: application/fhir+json' \
            --data-binary "@$workdir/seed-bundle.json" "$base")
        [[ $code == 200 ]] || die "seeding: POST $base answered $code: $(head -c 500 "$workdir/seed-response.json")"
        # the transaction-response entries follow the request entries: Patient/<id>/_history/<v>
        mapfile -t ids < <(grep -oE '"location"[[:space:]]*:[[:space:]]*"[^"]*Patient/[^/"]+' \
            "$workdir/seed-response.json" | sed -E 's#.*Patient/##')
        ((${#ids[@]} == last - first)) ||
            die "seeding: ${#ids[@]} Patient locations in the response, expected $((last - first))"
        for ((k = 0; k < ${#ids[@]}; k++)); do
            printf '%s\t%s\n' "${ids[k]}" "${values[k]}" >>"$seeds"
        done
    done
    seed_secs=$(awk -v s="$seed_start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')
    echo "seeded $(wc -l <"$seeds") Patients in $seed_secs s"
    # one check that the identifier search finds a seeded Patient
    read -r check_id check_value <"$seeds"
    found=$(fcurl -G -H 'Accept: application/fhir+json' --data-urlencode "identifier=https://example.org/mrn|$check_value" \
        "$base/Patient" | grep -oE "\"Patient/$check_id\"|/Patient/$check_id\"" | head -n 1 || true)
    [[ -n $found ]] || die "seeding: GET $base/Patient?identifier=...|$check_value does not find Patient/$check_id"
    wrk_env+=(SENTINELLA_WRK_SEEDS="$seeds" SENTINELLA_WRK_TAG="$tag")
fi

# --- the run ---------------------------------------------------------------------------------

samples=$workdir/rss.samples
if [[ -n $rss_pid ]]; then
    (
        while [[ -r /proc/$rss_pid/status ]]; do
            kib_field "$rss_pid" VmRSS
            sleep 0.2
        done
    ) >"$samples" &
    sampler_pid=$!
fi

echo "wrk -t$threads -c$connections -d$duration --timeout $wrk_timeout --latency -s $script $base"
env "${wrk_env[@]}" wrk -t"$threads" -c"$connections" -d"$duration" --timeout "$wrk_timeout" \
    --latency -s "$script" "$base" | tee "$workdir/wrk.out" || die "wrk failed"

if [[ -n $sampler_pid ]]; then
    kill "$sampler_pid" 2>/dev/null || true
    wait "$sampler_pid" 2>/dev/null || true
    sampler_pid=
fi
peak_kib=
rss_max_kib=
if [[ -n $rss_pid ]]; then
    peak_kib=$(kib_field "$rss_pid" VmHWM)
    rss_max_kib=$(sort -n "$samples" | tail -n 1)
fi

result=$(grep '^wrk-result:' "$workdir/wrk.out" | tail -n 1) || die "wrk printed no wrk-result line"
field() { sed -nE "s/.* $1=([^ ]*).*/\1/p" <<<"$result"; }
errors=$(field errors)
summary=$(printf 'summary: backend=%s scenario=%s req/s=%s p50_ms=%s p99_ms=%s errors=%s peak_rss_mib=%s' \
    "${backend// /_}" "$scenario" "$(field rps)" "$(field p50_ms)" "$(field p99_ms)" "$errors" "$(mib "$peak_kib")")
echo "---"
echo "server RSS MiB: ready $(mib "$rss_ready") | max sampled during wrk $(mib "$rss_max_kib") | peak (VmHWM) $(mib "$peak_kib")"
if [[ $scenario == ingest ]]; then
    awk -v r="$(field rps)" 'BEGIN { printf "ingest: %.1f Bundles/s = %.1f resources/s (11 per Bundle)\n", r, r * 11 }'
elif [[ $scenario == notifications ]]; then
    awk -v r="$(field rps)" 'BEGIN { printf "notifications: %.1f segnalazione Bundles/s\n", r }'
fi
echo "run: commit $commit, wrk -t$threads -c$connections -d$duration, $(nproc) CPUs, $(date -u +%Y-%m-%dT%H:%MZ)"
echo "$summary"
if [[ -n $results_file ]]; then
    echo "$(date -u +%Y-%m-%dT%H:%MZ) commit=$commit threads=$threads connections=$connections duration=$duration ${summary#summary: }" >>"$results_file"
fi

if [[ $errors == 0 ]]; then status=0; else status=1; fi
stop_server
if [[ $scenario == notifications && -z $external_url ]]; then
    # logged by the server when its D.M. 1990 rules are dropped at shutdown
    rules_line=$(grep -a 'D.M. 1990 rules' "$server_log" | sed -E 's/\x1b\[[0-9;]*m//g' | tail -n 1 || true)
    if [[ -n $rules_line ]]; then
        echo "rules (server log): $(sed -E 's/.*(transactions=[^ ]*) (total_ms=[^ ]*) (mean_us=[^ ]*).*/\1 \2 \3/' <<<"$rules_line")"
        mean_us=$(sed -nE 's/.*mean_us=([0-9]+).*/\1/p' <<<"$rules_line")
        if [[ -n $mean_us ]]; then
            awk -v m="$mean_us" -v r="$(field rps)" -v c="$connections" -v p="$(field p50_ms)" 'BEGIN {
                if (r > 0) printf "rules: %d us per write = %.1f%% of wall time per Bundle (%.0f us), %.1f%% of wall time x connections, %.1f%% of p50 latency\n",
                    m, 100 * m / (1e6 / r), 1e6 / r, 100 * m / (1e6 / r * c), 100 * m / (p * 1000) }'
        fi
    else
        echo "rules: the server log has no 'D.M. 1990 rules' line (logged at shutdown when the rules ran)"
    fi
fi
exit "$status"
