#!/usr/bin/env bash
# Slurm batch template: one cosine-train rank per GPU, on as many nodes as you ask for.
#
#   sbatch launch/sbatch.sh train --data data/cub --out runs/cub-cosine --preset paper-cub-cosine --device cuda
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 launch/sbatch.sh train ...
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 launch/sbatch.sh train ... --device cpu   # CPU nodes
#   sbatch --nodes=2 launch/sbatch.sh sweep --out runs/t2-cub --ranks-per-run 4 \
#     --axis loss=ce,cosine --axis lr-max=paper -- --data data/cub --preset paper-cub-ce --device cuda
#   sbatch --nodes=4 launch/sbatch.sh sweep --out runs/table2 --grid paper-table2 --data-root data \
#     --ranks-per-run 4 -- --device cuda          # the paper's whole Table 2 (192 cells)
#
# Submit from the checkout (the job finds the binary and launch/env.sh through
# SLURM_SUBMIT_DIR), or set COSINE_REPO / COSINE_TRAIN. Edit the #SBATCH lines below for your
# cluster (partition, account, time), or override them on the sbatch command line as above;
# keep ntasks-per-node equal to gpus-per-node on GPU nodes. The arguments after the script name
# are cosine-train's; launching changes no option: rank, world size and local rank (= GPU)
# come from MPI through srun's PMIx.
#
# Preemption and time limits: Slurm signals the batch shell (USR1, 120 s before the limit, or
# on `scancel --signal=USR1 --batch`; TERM on preemption); this script passes it to every rank
# as USR1, cosine-train finishes its step, writes a checkpoint and exits with 75, and the job
# requeues itself. Pass `--resume auto` in the arguments so that the requeued job continues the
# run (it starts fresh when there is no checkpoint yet). A requeued sweep continues its grid by
# itself: every running cell checkpointed, and the same command resumes them.
#
#SBATCH --job-name=cosine-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -euo pipefail
case "${1:-}" in
  -h|--help) sed -n '2,/^#SBATCH/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
esac
if [ -z "${SLURM_JOB_ID:-}" ] || ! command -v srun >/dev/null 2>&1; then
  echo "sbatch.sh: not inside a Slurm job; submit it: sbatch launch/sbatch.sh train --data DIR --out DIR ..." >&2
  echo "  (for one machine without Slurm use launch/mpirun.sh -n N -- train ...)" >&2
  exit 2
fi
repo="${COSINE_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
bin="${COSINE_TRAIN:-$repo/target/release/cosine-train}"
# The environment of this binary: the libtorch it was linked with, not the first one found.
export COSINE_ENV_FOR="$bin"
# shellcheck source=launch/env.sh
source "$repo/launch/env.sh"
if [ ! -x "$bin" ]; then
  echo "sbatch.sh: $bin is missing; build with 'make build' in $repo or set COSINE_TRAIN" >&2
  exit 1
fi
if [ $# -eq 0 ]; then
  echo "sbatch.sh: no cosine-train arguments given (e.g. train --data DIR --out DIR ...)" >&2
  exit 2
fi
# srun passes the whole environment to the ranks. Each rank sees the GPUs of its node and takes
# the one numbered by its local rank, so no per-task GPU binding is wanted here; where the
# cluster binds tasks to their --cpus-per-task CPUs, cosine-train sizes its threads to them.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
# Since Slurm 22.05 srun no longer inherits the batch job's --cpus-per-task: without this each
# task of a CPU-binding cluster gets one CPU, and its loader threads and libtorch share it.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
fi
echo "sbatch.sh: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} ranks: $bin $*"
# --kill-on-bad-exit: a rank that exits non-zero ends the step (cosine-train also aborts the
# whole job itself on any rank's error, and bounds every collective by --collective-timeout).
srun --mpi=pmix --kill-on-bad-exit=1 "$bin" "$@" &
step=$!
forward() {
  echo "sbatch.sh: $1 received: asking the ranks to checkpoint and stop"
  # srun passes USR1 on to every task; a TERM would make srun end the step itself.
  kill -USR1 "$step" 2>/dev/null || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives; wait again for the step itself.
status=0
while true; do
  wait "$step" && status=0 || status=$?
  kill -0 "$step" 2>/dev/null || break
done
trap - USR1 TERM
if [ "$status" = 75 ]; then
  echo "sbatch.sh: the run checkpointed and stopped (exit 75); requeueing job ${SLURM_JOB_ID:-?}"
  if [ -n "${SLURM_JOB_ID:-}" ] && scontrol requeue "$SLURM_JOB_ID"; then
    exit 0
  fi
fi
exit "$status"
