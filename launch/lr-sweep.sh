#!/usr/bin/env bash
# The reference's learning-rate search for one dataset and loss: one run per maximum learning
# rate of the paper's grid (8 rates, 2.5 down to 0.001), then a table of best and last test
# top-1 per rate.
#
#   launch/lr-sweep.sh --out runs/sweep-cub-cosine -- --data data/cub --preset paper-cub-cosine --device cuda
#   launch/lr-sweep.sh --np 4 --out runs/sweep -- --data data/cifar100 --preset paper-cifar100-ce
#   launch/lr-sweep.sh --rates "0.5 0.1" --out runs/quick -- --data data/fmnist --arch resnet8 --epochs 12
#
# Options (before `--`; everything after `--` is passed to `cosine-train train`):
#   --out DIR       parent of the run directories DIR/lr-<rate> (required)
#   --rates "R..."  the grid [default: the paper's 2.5 1.0 0.5 0.1 0.05 0.01 0.005 0.001]
#   -n, --np N      ranks per run: launched with launch/mpirun.sh; inside a Slurm allocation
#                   (SLURM_JOB_ID set) with srun --mpi=pmix instead [default: 1, no launcher];
#                   COSINE_MPIRUN_ARGS adds mpirun flags (e.g. "--oversubscribe")
# A rate whose run directory already holds a finished run is not trained again, so an
# interrupted sweep continues where it stopped. A failed run is reported in the table and the
# sweep goes on. Progress goes to stderr, the table to stdout and DIR/sweep.md. The run directories are ordinary runs: `cosine-train report DIR/lr-*` reads them.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
rates="2.5 1.0 0.5 0.1 0.05 0.01 0.005 0.001"
out=""; np=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --rates) rates="${2:?--rates needs a list}"; shift 2 ;;
    -n|-np|--np) np="${2:?$1 needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) echo "lr-sweep.sh: unknown option '$1' (cosine-train's options go after --)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "lr-sweep.sh: --out DIR is required" >&2; exit 2; }
case "$np" in ''|*[!0-9]*|0) echo "lr-sweep.sh: --np: expected a positive number, got '$np'" >&2; exit 2 ;; esac
for r in $rates; do
  case "$r" in ''|*[!0-9.e-]*) echo "lr-sweep.sh: --rates: '$r' is not a number" >&2; exit 2 ;; esac
done
for a in "$@"; do
  case "$a" in --out|--out=*|--lr-max|--lr-max=*) echo "lr-sweep.sh: do not pass $a after -- (the sweep sets it)" >&2; exit 2 ;; esac
done
# shellcheck source=launch/env.sh
source "$repo/launch/env.sh"
bin="${COSINE_TRAIN:-$repo/target/release/cosine-train}"
[ -x "$bin" ] || { echo "lr-sweep.sh: $bin is missing; run 'make build' (or set COSINE_TRAIN)" >&2; exit 1; }
mkdir -p "$out"

finished() { [ -f "$1/metrics.jsonl" ] && grep -q '"summary":true' "$1/metrics.jsonl"; }
field() { sed -n "s/.*\"$2\":\([^,}]*\).*/\1/p" "$1" | tail -n 1; }

for rate in $rates; do
  dir="$out/lr-$rate"
  if finished "$dir"; then
    echo "lr-sweep: lr $rate already done ($dir)" >&2
    continue
  fi
  echo "lr-sweep: lr $rate -> $dir" >&2
  args=(train --out "$dir" --force --lr-max "$rate" "$@")
  if [ "$np" = 1 ]; then
    cmd=("$bin" "${args[@]}")
  elif [ -n "${SLURM_JOB_ID:-}" ]; then
    cmd=(srun --mpi=pmix --kill-on-bad-exit=1 -n "$np" "$bin" "${args[@]}")
  else
    cmd=(env COSINE_TRAIN="$bin" "$repo/launch/mpirun.sh" -n "$np" ${COSINE_MPIRUN_ARGS:-} -- "${args[@]}")
  fi
  "${cmd[@]}" > "$out/lr-$rate.log" 2>&1 ||
    echo "lr-sweep: lr $rate failed (exit status $?); see $out/lr-$rate.log" >&2
done

table="$out/sweep.md"
{
  echo "| max lr | best top-1 | best epoch | last top-1 | run |"
  echo "| ---: | ---: | ---: | ---: | --- |"
  for rate in $rates; do
    dir="$out/lr-$rate"
    if finished "$dir"; then
      summary="$(grep '"summary":true' "$dir/metrics.jsonl" | tail -n 1)"
      tmp="$(mktemp)"; echo "$summary" > "$tmp"
      awk -v r="$rate" -v b="$(field "$tmp" best_top1)" -v e="$(field "$tmp" best_epoch)" \
          -v l="$(field "$tmp" last_top1)" -v d="$dir" \
          'BEGIN { printf "| %s | %.2f%% | %s | %.2f%% | %s |\n", r, 100 * b, e, 100 * l, d }'
      rm -f "$tmp"
    else
      echo "| $rate | failed | - | - | $out/lr-$rate.log |"
    fi
  done
} > "$table.tmp"
mv "$table.tmp" "$table"
cat "$table"
