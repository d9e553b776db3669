#!/usr/bin/env bash
# Pipeline efficiency on one rank: the compute-only training step (`cosine-train bench-step`,
# synthetic batch in memory) divided by the step time of a real run (`cosine-train train`:
# loader threads, host-to-device copy, loss read, optimiser) with the same model, batch and
# threads. 1.0 means data loading and bookkeeping hide completely behind compute.
#   bash bench/pipeline.sh     (THREADS, WORKERS override)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
threads="${THREADS:-$(nproc)}"
workers="${WORKERS:-1}"
work="${BENCH_DIR:-/tmp/cosine-bench-pipeline}"
cargo build --release -q -p cosine-train -p datasets-prep
bin=target/release/cosine-train
data="$work/fashion-k100"
[ -f "$data/manifest.json" ] || target/release/datasets-prep pack --source fashion-mnist \
  --root /usr/share/datasets/fashion-mnist --out "$data" --per-class 100 --seed 0 >/dev/null 2>&1
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"; }
echo "| model | batch | threads | loader workers | real step | compute-only step | efficiency |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for arch in resnet20 resnet56; do
  "$bin" train --data "$data" --out "$work/run-$arch" --force --arch "$arch" --loss ce --epochs 4 \
    --batch-size 100 --eval-every 100 --threads "$threads" --workers "$workers" --dist single >/dev/null 2>&1
  # Epochs 2-4 (the first warms up), 10 steps each; the last epoch's evaluation is not counted.
  real=$(grep '"epoch"' "$work/run-$arch/metrics.jsonl" | tail -n 3 |
    awk '{ match($0, /"train_seconds":[^,}]*/); t += substr($0, RSTART + 16, RLENGTH - 16) } END { print t / 30 }')
  compute=$("$bin" bench-step --arch "$arch" --batch-size 100 --size 28 --channels 1 --threads "$threads" \
    --steps 20 --dist single | field step_seconds_median)
  awk -v m="$arch" -v t="$threads" -v w="$workers" -v r="$real" -v c="$compute" \
    'BEGIN { printf "| %s | 100 | %d | %d | %.1f ms | %.1f ms | %.2f |\n", m, t, w, 1e3 * r, 1e3 * c, c / r }'
done
