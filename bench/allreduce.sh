#!/usr/bin/env bash
# Data-parallel overhead on 2 ranks of this machine, as ratios:
#  1. gradient synchronisation: our fused all-reduce inside a training step (bench-step under
#     mpirun, timed after a barrier) against a raw MPI_Allreduce of the same float count (a C
#     program, in place, with 64 MiB of other memory written between calls), for a small
#     (resnet20, 1 MB) and a large model (resnet50, 96 MB);
#  2. step time of a real 2-rank training run (data loading, sync, everything; resnet20 on
#     Fashion-MNIST, global batch 100) against the 1-rank compute-only step on its 50-image share.
#   bash bench/allreduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
cargo build --release -q --workspace
work="${BENCH_DIR:-/tmp/cosine-bench-allreduce}"
mkdir -p "$work"
bin=target/release/cosine-train
mpi=(mpirun -np 2 --oversubscribe --bind-to none)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
mpicc -O2 -o "$work/raw_allreduce" bench/raw_allreduce.c
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"; }

echo "2 ranks on $(nproc) cores, $(mpirun --version | head -n 1)"
echo
echo "| model | floats | ours: all-reduce call | ours: whole sync | raw MPI_Allreduce | ratio (whole sync / raw) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for spec in "resnet20 50 28 1 10 20" "resnet50 2 64 3 200 5"; do
  read -r arch batch size channels classes steps <<< "$spec"
  ours=$("${mpi[@]}" "$bin" bench-step --arch "$arch" --batch-size "$batch" --size "$size" \
    --channels "$channels" --classes "$classes" --threads 1 --steps "$steps" --warmup 2)
  floats=$(echo "$ours" | field sync_floats)
  call=$(echo "$ours" | field allreduce_call_seconds_median)
  whole=$(echo "$ours" | field sync_seconds_median)
  raw=$("${mpi[@]}" "$work/raw_allreduce" "$floats" 20 64)
  awk -v a="$arch" -v f="$floats" -v c="$call" -v w="$whole" -v r="$raw" \
    'BEGIN { printf "| %s | %d | %.3f ms | %.3f ms | %.3f ms | %.2f |\n", a, f, 1e3*c, 1e3*w, 1e3*r, w/r }'
done

data="$work/fashion-k100"
[ -f "$data/manifest.json" ] || target/release/datasets-prep pack --source fashion-mnist \
  --root /usr/share/datasets/fashion-mnist --out "$data" --per-class 100 --seed 0 >/dev/null
"${mpi[@]}" "$bin" train --data "$data" --out "$work/run2" --force --arch resnet20 --loss ce \
  --epochs 4 --batch-size 100 --eval-every 100 --threads 1 --workers 1 >/dev/null 2>&1
# Epochs 2-4 (the first warms up): seconds per step, and the share of it in the all-reduce.
read -r train_secs sync_secs <<< "$(grep '"epoch"' "$work/run2/metrics.jsonl" | tail -n 3 |
  awk '{ match($0, /"train_seconds":[^,}]*/); t += substr($0, RSTART + 16, RLENGTH - 16);
         match($0, /"sync_seconds":[^,}]*/); s += substr($0, RSTART + 15, RLENGTH - 15) }
       END { print t, s }')"
steps=$(( 3 * 10 ))
compute=$("$bin" bench-step --arch resnet20 --batch-size 50 --size 28 --channels 1 --threads 1 \
  --steps 20 --dist single | field step_seconds_median)
echo
echo "| 2-rank training step (resnet20, global batch 100) | 1-rank compute-only step (batch 50) | ratio | in all-reduce |"
echo "| ---: | ---: | ---: | ---: |"
awk -v t="$train_secs" -v s="$sync_secs" -v n="$steps" -v c="$compute" \
  'BEGIN { printf "| %.1f ms | %.1f ms | %.2f | %.1f%% |\n", 1e3*t/n, 1e3*c, (t/n)/c, 100*s/t }'
