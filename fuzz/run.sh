#!/usr/bin/env bash
# Build every fuzz target once, run each for SECONDS (default 60), one after
# the other, and print one line per target:
#   fuzz <target>: <execs> execs, <execs/s> execs/s, <crashes> crashes
# Exits non-zero when any target crashed (or failed to run). Corpora grow in
# fuzz/corpus/<target>, crash inputs land in fuzz/artifacts/<target>/, full
# libFuzzer logs in fuzz/logs/<target>.log.
#
# Usage: fuzz/run.sh [SECONDS] [TARGET...]   (default: every target)
# Needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -uo pipefail
cd "$(dirname "$0")"

secs="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

t0=$(date +%s)
cargo +nightly fuzz build >/dev/null 2>logs.build || {
  cat logs.build >&2; rm -f logs.build
  echo "fuzz: build failed" >&2; exit 1
}
rm -f logs.build
echo "fuzz: build: $(( $(date +%s) - t0 )) s"

bin_dir=target/x86_64-unknown-linux-gnu/release
mkdir -p logs
failed=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  before=$(ls "artifacts/$t" | wc -l)
  "$bin_dir/$t" "corpus/$t" \
    -max_total_time="$secs" -print_final_stats=1 -timeout=10 \
    -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1
  rc=$?
  after=$(ls "artifacts/$t" | wc -l)
  crashes=$(( after - before ))
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi
  execs=$(awk '/stat::number_of_executed_units:/ { print $2 }' "logs/$t.log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec:/ { print $2 }' "logs/$t.log" | tail -1)
  echo "fuzz $t: ${execs:-?} execs, ${rate:-?} execs/s, $crashes crashes"
  if [ "$crashes" -ne 0 ]; then
    failed=1
    grep -m1 -E "panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)" "logs/$t.log" | sed 's/^/  /'
    ls "artifacts/$t" | sed "s|^|  artifact: fuzz/artifacts/$t/|" | tail -n "$crashes"
  fi
done
exit "$failed"
