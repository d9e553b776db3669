#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and prints the executions and any crash per target.
#   bash datasets-prep/fuzz/run.sh [SECONDS per target, default 60]
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Crashes are kept under
# artifacts/<target>/ of the fuzz crate. FUZZ_DIR names another fuzz crate (default: this one)
# and FUZZ_SANITIZER the sanitizer (default: cargo-fuzz's, address); `fuzz/run.sh` uses both.
set -euo pipefail
cd "${FUZZ_DIR:-$(dirname "${BASH_SOURCE[0]}")}"
secs="${1:-60}"
case "$secs" in ''|*[!0-9]*) echo "run.sh: SECONDS must be a number, got '$secs'" >&2; exit 2 ;; esac
command -v cargo-fuzz >/dev/null 2>&1 || { echo "run.sh: cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 2; }
sanitizer=()
[ -n "${FUZZ_SANITIZER:-}" ] && sanitizer=(--sanitizer "$FUZZ_SANITIZER")
status=0
for target in $(cargo +nightly fuzz list); do
  log="$(mktemp)"
  if cargo +nightly fuzz run "${sanitizer[@]}" "$target" -- -max_total_time="$secs" -rss_limit_mb=4096 >"$log" 2>&1; then
    result="no crash"
  else
    result="CRASH (see $PWD/artifacts/$target/)"
    status=1
  fi
  runs="$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 || true)"
  echo "$target: ${runs:-? runs} in ${secs}s: $result"
  rm -f "$log"
done
exit "$status"
