#!/usr/bin/env bash
# Run every fuzz target for SECONDS seconds (default 30) over a scratch copy of its committed corpus
# (fuzz/corpus/<target>), so a run never grows the committed files. Exits non-zero when any target
# crashes, times out (10 s for one input) or goes over 2 GB; the input that did it is left in
# fuzz/artifacts/<target>/ and the end of that target's log is printed. See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")"

seconds=${1:-30}
[[ $seconds =~ ^[0-9]+$ ]] || { echo "usage: fuzz/run.sh SECONDS" >&2; exit 2; }
targets=(json_reader xml_reader search_params fhirpath datetime bundle)

# cargo-fuzz passes -Z flags to cargo and rustc: allowed on the stable toolchain with this
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# Optimised (opt-level 1, fuzz/Cargo.toml) with debug assertions and overflow checks, 16 codegen
# units, no AddressSanitizer: cargo-fuzz's defaults (opt-level 3, one codegen unit, ASan) took over
# 30 minutes to build cold on two cores (README.md has the numbers). Built into fuzz/target whatever
# CARGO_TARGET_DIR says, so the main crate's build directory is left alone.
flags=(--sanitizer none --debug-assertions --codegen-units 16 --target-dir "$PWD/target")

start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "fuzz targets built in $((SECONDS - start)) s"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/sentinella-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
# the bundle target's SQLite database
export SENTINELLA_FUZZ_DB_DIR="$scratch"

failed=()
for t in "${targets[@]}"; do
  corpus="$scratch/corpus-$t"
  mkdir -p "$corpus" artifacts/"$t"
  cp corpus/"$t"/* "$corpus"/
  log="$scratch/$t.log"
  echo "== fuzzing $t for $seconds s ($(ls "$corpus" | wc -l) seed inputs)"
  if cargo fuzz run "${flags[@]}" "$t" "$corpus" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      >"$log" 2>&1; then
    grep -E '^(Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    grep -E '^#[0-9]+' "$log" | tail -n 1 || true
  else
    failed+=("$t")
    echo "!! $t failed: the end of its log follows"
    tail -n 60 "$log"
    ls -l artifacts/"$t"/ 2>/dev/null || true
  fi
done

echo "fuzz stage: $((SECONDS - start)) s, ${seconds} s per target"
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if ((${#failed[@]})); then
  echo "fuzz targets that failed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
  exit 1
fi
