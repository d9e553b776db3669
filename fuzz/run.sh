#!/usr/bin/env bash
# Runs every fuzz target of the trainer for a bounded time and prints the executions and any
# crash per target.
#   bash fuzz/run.sh [SECONDS per target, default 60]
# Needs a nightly toolchain, cargo-fuzz (`cargo install cargo-fuzz`) and the build environment
# (`source launch/env.sh`: the targets link libtorch, so they run without a sanitizer; only the
# Rust code is instrumented). Crashes are kept under fuzz/artifacts/. A real checkpoint's
# state.json copied to fuzz/corpus/checkpoint_state/ lets the fuzzer start from a valid file
# (coverage about twice that from nothing).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FUZZ_DIR="$here" FUZZ_SANITIZER=none exec bash "$here/../datasets-prep/fuzz/run.sh" "$@"
