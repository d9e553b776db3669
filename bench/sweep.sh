#!/usr/bin/env bash
# Grid throughput of `cosine-train sweep` on this machine: an 8-cell grid (Fashion-MNIST
# 20/class, resnet8, 2 losses x 4 rates, 12 epochs) run
#   A. as the same 8 runs one after another, each on 2 ranks (what launch/lr-sweep.sh did);
#   B. as one sweep on 2 ranks split into 2 groups of 1 (--ranks-per-run 1), cells handed out
#      as groups come free.
# Prints both wall times, their ratio (A / B; the target is >= 1.3) and how long each group of B
# sat idle at the end while the other finished its last cell.
#   bash bench/sweep.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
cargo build --release -q --workspace
work="${BENCH_DIR:-/tmp/cosine-bench-sweep}"
rm -rf "$work/seq" "$work/grid"; mkdir -p "$work/seq"
bin=target/release/cosine-train
mpi=(mpirun -np 2 --oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
data="$work/fashion-k20"
[ -f "$data/manifest.json" ] || target/release/datasets-prep pack --source fashion-mnist \
  --root /usr/share/datasets/fashion-mnist --out "$data" --per-class 20 --seed 0 >/dev/null
common=(--data "$data" --arch resnet8 --epochs 12 --batch-size 50 --workers 1)
losses="ce cosine"; rates="0.5 0.1 0.05 0.01"

start=$(date +%s.%N)
for loss in $losses; do
  for rate in $rates; do
    "${mpi[@]}" "$bin" train --out "$work/seq/$loss-$rate" "${common[@]}" --loss "$loss" \
      --lr-max "$rate" > "$work/seq/$loss-$rate.log" 2>&1
  done
done
seq_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')

start=$(date +%s.%N)
"${mpi[@]}" "$bin" sweep --out "$work/grid" --ranks-per-run 1 \
  --axis "loss=$(echo $losses | tr ' ' ,)" --axis "lr-max=$(echo $rates | tr ' ' ,)" \
  -- "${common[@]}" > "$work/grid.log" 2>&1
grid_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')

echo "8 cells (resnet8, Fashion-MNIST 20/class, 12 epochs) on $(nproc) cores, $(mpirun --version | head -n 1)"
echo
echo "| schedule | wall time | grid throughput vs one after another |"
echo "| --- | ---: | ---: |"
awk -v s="$seq_s" -v g="$grid_s" 'BEGIN {
  printf "| 8 runs one after another, 2 ranks each | %.1f s | 1.00x |\n", s
  printf "| sweep, 2 groups of 1 rank | %.1f s | %.2fx |\n", g, s / g }'
echo
python3 - "$work/grid/sweep.json" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
end = max(c["ended_at"] for c in cells)
for g in sorted({c["group"] for c in cells}):
    mine = [c for c in cells if c["group"] == g]
    busy = sum(c["ended_at"] - c["started_at"] for c in mine)
    print(f"group {g}: {len(mine)} cells, {busy:.1f} s training, idle at the end {end - max(c['ended_at'] for c in mine):.1f} s")
PY
