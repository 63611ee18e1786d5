#!/bin/bash
# Runs every fuzz target (or those named) for SECONDS each (default 30) on the stable
# toolchain without a sanitizer (cargo-fuzz `-s none`: coverage-guided, no ASan, which stable
# cannot build), from the committed seeds (fuzz/seeds/<target>) and the local corpus
# (fuzz/corpus/<target>, not committed). Prints, per target, executions, edges covered and
# features, and exits non-zero when a target finds a crash (its input is in
# fuzz/artifacts/<target>/).
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
#   FUZZ_JOBS=2 runs that many targets at once (default 1).
#   FUZZ_RUNS=N stops each target after N executions instead (SECONDS is then the cap).
#   FUZZ_PROFILE=--dev builds without optimisation (with overflow checks; builds in about a
#     third of the time, runs slower: what CI uses); default -O.
#   FUZZ_BUILD_ONLY=1 builds the targets and stops.
set -u
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE/fuzz" || exit 1
SECONDS_EACH=${1:-30}
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  mapfile -t TARGETS < <(cargo fuzz list)
fi
PROFILE=${FUZZ_PROFILE:--O}
cargo fuzz build -s none "$PROFILE" >/dev/null 2>&1 || cargo fuzz build -s none "$PROFILE" || exit 1
[ -n "${FUZZ_BUILD_ONLY:-}" ] && exit 0
LOGS=$(mktemp -d)
run() {
  local t=$1
  mkdir -p "corpus/$t" "seeds/$t"
  local runs=()
  if [ -n "${FUZZ_RUNS:-}" ]; then runs=(-runs="$FUZZ_RUNS"); fi
  local start=$(date +%s)
  cargo fuzz run -s none "$PROFILE" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$SECONDS_EACH" "${runs[@]}" -print_final_stats=1 -rss_limit_mb=2048 >"$LOGS/$t.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - start ))
  local execs cov ft
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$LOGS/$t.log" | grep -o '[0-9]*$')
  cov=$(grep -oE 'cov: [0-9]+' "$LOGS/$t.log" | tail -1 | grep -oE '[0-9]+')
  ft=$(grep -oE 'ft: [0-9]+' "$LOGS/$t.log" | tail -1 | grep -oE '[0-9]+')
  if [ $rc -eq 0 ]; then
    printf '%-26s ok     %12s execs  cov %6s  ft %6s  (%ss)\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$took"
  else
    printf '%-26s FAILED (exit %s): see below\n' "$t" "$rc"
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$LOGS/$t.log" | head -20
    return 1
  fi
}
failed=0
jobs=${FUZZ_JOBS:-1}
pids=()
for t in "${TARGETS[@]}"; do
  run "$t" &
  pids+=($!)
  if [ ${#pids[@]} -ge "$jobs" ]; then
    wait "${pids[0]}" || failed=1
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done
rm -rf "$LOGS"
exit $failed
