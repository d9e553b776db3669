#!/usr/bin/env bash
# Runs every fuzz target of the trainer for a bounded time and prints the executions and any
# crash per target.
#   bash fuzz/run.sh [SECONDS per target, default 60]
# Needs a nightly toolchain, cargo-fuzz (`cargo install cargo-fuzz`) and the build environment
# (`source launch/env.sh`: the targets link libtorch). Crashes are kept under fuzz/artifacts/.
# A real checkpoint's state.json copied to fuzz/corpus/checkpoint_state/ lets the fuzzer start
# from a valid file (coverage about twice that from nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
secs="${1:-60}"
case "$secs" in ''|*[!0-9]*) echo "run.sh: SECONDS must be a number, got '$secs'" >&2; exit 2 ;; esac
command -v cargo-fuzz >/dev/null 2>&1 || { echo "run.sh: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 2; }
status=0
for target in $(cargo +nightly fuzz list); do
  log="$(mktemp)"
  if cargo +nightly fuzz run -s none "$target" -- -max_total_time="$secs" -rss_limit_mb=4096 >"$log" 2>&1; then
    result="no crash"
  else
    result="CRASH (see fuzz/artifacts/$target/)"
    status=1
  fi
  runs="$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 || true)"
  echo "$target: ${runs:-? runs} in ${secs}s: $result"
  rm -f "$log"
done
exit "$status"
