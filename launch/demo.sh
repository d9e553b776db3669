#!/usr/bin/env bash
# The main job. Until the trainer lands (issues 4, 5 and 8), it shows what is built: the
# environment report, a collective self-test on 2 MPI ranks, and the command line.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/cosine-train
[ -x "$bin" ] || { echo "demo: $bin is missing; run 'make demo' (it builds first)" >&2; exit 1; }
ranks="${RANKS:-2}"
mpi_root_flags=()
if [ "$(id -u)" = 0 ]; then mpi_root_flags=(--allow-run-as-root); fi

echo "== environment (cosine-train doctor)"
"$bin" doctor
echo
echo "== collectives on $ranks MPI ranks (cosine-train check-dist)"
mpirun "${mpi_root_flags[@]}" --oversubscribe -np "$ranks" "$bin" check-dist --dist mpi --elements 4194304
echo
echo "== command line"
"$bin" --help
echo
echo "demo: training is not implemented yet; this demo will train the four objectives on"
echo "      Fashion-MNIST once the trainer lands (see README, Status)."
