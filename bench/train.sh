#!/usr/bin/env bash
# Training-step throughput, ours against PyTorch on the same cores: `cosine-train bench-step`
# and bench/train_step_pytorch.py run the same model, objective, optimiser step, batch and thread
# count on a synthetic batch in memory (no data loading), REPEATS times alternately; the table
# gives median images/s and the ratio ours / PyTorch. Then the same on 2 ranks of one thread
# each: ours under mpirun (fused all-reduce over MPI) against torchrun with
# DistributedDataParallel over gloo, whole steps including the gradient synchronisation. Both use the same libtorch 2.11.0 (the
# PyPI wheel `make setup` installs, imported as the torch Python package).
#   bash bench/train.sh            (THREADS, REPEATS, STEPS override the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
threads="${THREADS:-$(nproc)}"
repeats="${REPEATS:-3}"
steps="${STEPS:-10}"
venv="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}/bench-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# The torch package of the libtorch install has no dependencies installed (--no-deps).
"$venv/bin/python" -c "import typing_extensions, sympy, networkx, jinja2, fsspec, filelock" 2>/dev/null ||
  "$venv/bin/pip" install -q --disable-pip-version-check typing_extensions sympy networkx jinja2 fsspec filelock
# PyTorch itself: the torch package of the PyPI wheel set (`COSINE_WITH_CUDA=1 make setup`, 3.8 GB;
# its Python extension needs the CUDA libraries even on a CPU). Its libtorch_cpu is the same
# file our binary runs on, from the same torch 2.11.0 wheel.
torch_py="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}/torch-2.11.0-cuda"
[ -d "$torch_py/torch" ] || COSINE_WITH_CUDA=1 bash launch/setup.sh
export PYTHONPATH="$torch_py${PYTHONPATH:+:$PYTHONPATH}"
cargo build --release -q -p cosine-train
bin=target/release/cosine-train
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "training step, synthetic batch in memory, $threads thread(s), median of $repeats runs of $steps steps"
echo "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), torch $(env -u LD_LIBRARY_PATH "$venv/bin/python" -c 'import torch; print(torch.__version__)'))"
echo
echo "| model | batch | image | ours images/s | PyTorch images/s | ours / PyTorch |"
echo "| --- | ---: | --- | ---: | ---: | ---: |"
for spec in "resnet20 100 32 3 10" "resnet110-wfc 100 32 3 100" "resnet50 8 224 3 200"; do
  read -r arch batch size channels classes <<< "$spec"
  common=(--arch "$arch" --batch-size "$batch" --size "$size" --channels "$channels" \
    --classes "$classes" --steps "$steps" --warmup 2 --threads "$threads")
  ours=(); theirs=()
  for _ in $(seq 1 "$repeats"); do
    ours+=("$("$bin" bench-step "${common[@]}" --dist single | field images_per_sec)")
    theirs+=("$(env -u LD_LIBRARY_PATH "$venv/bin/python" bench/train_step_pytorch.py "${common[@]}" | field images_per_sec)")
  done
  o=$(printf '%s\n' "${ours[@]}" | median)
  t=$(printf '%s\n' "${theirs[@]}" | median)
  awk -v m="$arch" -v b="$batch" -v s="${channels}x${size}x${size}" -v o="$o" -v t="$t" \
    'BEGIN { printf "| %s | %d | %s | %.1f | %.1f | %.3f |\n", m, b, s, o, t, o / t }'
done

echo
echo "2 ranks x 1 thread, each stepping on half the batch; whole steps, gradient sync included"
echo
echo "| model | global batch | ours (mpirun) images/s | PyTorch DDP (torchrun, gloo) images/s | ours / PyTorch |"
echo "| --- | ---: | ---: | ---: | ---: |"
mpi=(mpirun -np 2 --oversubscribe --bind-to none -x OMPI_MCA_mpi_yield_when_idle=1)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
# (resnet110-wfc is left out here: on one thread per rank it takes 10 minutes for both sides.)
for spec in "resnet20 100 32 3 10" "resnet56 100 32 3 10"; do
  read -r arch batch size channels classes <<< "$spec"
  common=(--arch "$arch" --batch-size $(( batch / 2 )) --size "$size" --channels "$channels" \
    --classes "$classes" --steps "$steps" --warmup 2 --threads 1)
  ours=(); theirs=()
  for _ in $(seq 1 "$repeats"); do
    ours+=("$("${mpi[@]}" "$bin" bench-step "${common[@]}" --dist mpi --whole-step | field images_per_sec)")
    theirs+=("$(env -u LD_LIBRARY_PATH OMP_NUM_THREADS=1 "$venv/bin/python" -m torch.distributed.run \
      --standalone --nproc-per-node 2 bench/train_step_pytorch.py "${common[@]}" --ddp 2>/dev/null |
      field images_per_sec)")
  done
  o=$(printf '%s\n' "${ours[@]}" | median)
  t=$(printf '%s\n' "${theirs[@]}" | median)
  awk -v m="$arch" -v b="$batch" -v o="$o" -v t="$t" \
    'BEGIN { printf "| %s | %d | %.1f | %.1f | %.3f |\n", m, b, o, t, o / t }'
done
