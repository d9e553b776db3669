#!/usr/bin/env bash
# The reference's learning-rate search for one dataset and loss, as a `cosine-train sweep` over
# one axis (the maximum learning rate; by default the paper's 8 rates, 2.5 down to 0.001),
# then the sweep's report: the test top-1 at the best rate (chosen on validation when the runs
# hold one out with --val-per-class, else on test as the paper did).
#
#   launch/lr-sweep.sh --out runs/sweep-cub-cosine -- --data data/cub --preset paper-cub-cosine --device cuda
#   launch/lr-sweep.sh --np 4 --out runs/sweep -- --data data/cifar100 --preset paper-cifar100-ce
#   launch/lr-sweep.sh --rates "0.5 0.1" --out runs/quick -- --data data/fmnist --arch resnet8 --epochs 12
#
# Options (before `--`; everything after `--` is given to every run, as for `cosine-train train`):
#   --out DIR       the sweep directory: DIR/sweep.json, one run DIR/lr-max-<rate> per rate (required)
#   --rates "R..."  the grid [default: the paper's 2.5 1.0 0.5 0.1 0.05 0.01 0.005 0.001]
#   -n, --np N      ranks per run: launched with launch/mpirun.sh; inside a Slurm allocation
#                   (SLURM_JOB_ID set) with srun --mpi=pmix instead [default: 1, no launcher];
#                   COSINE_MPIRUN_ARGS adds mpirun flags (e.g. "--oversubscribe")
# Calling it again continues the sweep: finished runs are kept, interrupted ones resume, and a
# run made with other settings is refused with the difference. The report goes to stdout and
# DIR/sweep.md. For grids of more than one axis, or several runs at once, use
# `cosine-train sweep` itself (README, "Grids of runs").
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
  case "$a" in --out|--out=*|--lr-max|--lr-max=*|--lr|--lr=*) echo "lr-sweep.sh: do not pass $a after -- (the sweep sets it)" >&2; exit 2 ;; esac
done
# shellcheck source=launch/env.sh
source "$repo/launch/env.sh"
bin="${COSINE_TRAIN:-$repo/target/release/cosine-train}"
[ -x "$bin" ] || { echo "lr-sweep.sh: $bin is missing; run 'make build' (or set COSINE_TRAIN)" >&2; exit 1; }

args=(sweep --out "$out" --axis "lr-max=$(echo $rates | tr ' ' ',')" -- "$@")
if [ "$np" = 1 ]; then
  cmd=("$bin" "${args[@]}")
elif [ -n "${SLURM_JOB_ID:-}" ]; then
  cmd=(srun --mpi=pmix --kill-on-bad-exit=1 -n "$np" "$bin" "${args[@]}")
else
  cmd=(env COSINE_TRAIN="$bin" "$repo/launch/mpirun.sh" -n "$np" ${COSINE_MPIRUN_ARGS:-} -- "${args[@]}")
fi
status=0
"${cmd[@]}" || status=$?
# A stopped sweep (75) is continued by the same command; say so and keep its status.
[ "$status" = 75 ] && echo "lr-sweep: stopped; run the same command again to continue" >&2
if [ -f "$out/sweep.json" ]; then
  "$bin" report "$out" > "$out/sweep.md.tmp" && mv "$out/sweep.md.tmp" "$out/sweep.md"
  cat "$out/sweep.md"
fi
exit "$status"
