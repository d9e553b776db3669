#!/usr/bin/env bash
# GPU check: one script, two halves, so that a GPU machine without Rust (or MPI, or internet) can
# run what this machine builds.
#
#   bash bench/gpu-check.sh build   here, with Rust: builds cosine-train with --features cuda
#                                   against the torch 2.11.0 CUDA wheel set and gathers it with
#                                   the shared libraries it needs besides libtorch/CUDA and the
#                                   C++ runtime (Open MPI's, and Open MPI's launcher with its
#                                   plugins) into target/gpu-check/ (about 40 MiB)
#   bash bench/gpu-check.sh run     on the GPU machine, from the repository root, with
#                                   target/gpu-check/ copied along and Python's torch 2.11 (CUDA)
#                                   installed: runs the checks below against that libtorch
#   bash bench/gpu-check.sh mpi-rehearsal
#                                   here, as root: the bundled launcher without the system's
#                                   Open MPI (see mpi_rehearsal)
#   bash bench/gpu-check.sh         both, on a machine that has everything
#
# The run (about 2 minutes on one H200; every step is bounded by `timeout`):
#   1. `cosine-train doctor`: CUDA seen by tch, its device count, cuDNN, NCCL loadable;
#   2. `cosine-train check-dist --dist nccl --device cuda`: a one-rank NCCL all-reduce, broadcast
#      and barrier (a lone process makes its NCCL communicator without MPI);
#   3. ResNet-50 at 448 px, batch BATCH, STEPS timed steps: ours (`bench-step`) and the same step
#      in PyTorch eager (bench/train_step_pytorch.py), bf16 autocast and fp32, each with
#      channels-last and without; a table of images/s and the ratio ours / PyTorch; then the
#      same for ResNet-110-wfc at 32 px, batch CIFAR_BATCH (100): many small kernels per step,
#      where launch overhead (the multi-tensor optimiser) shows; after each, where the time goes:
#      each phase alone (ours and PyTorch's), the share of time our host waited for the GPU,
#      and the operators our step dispatches (beside the update written one per parameter);
#   3b. the same step under `mpirun -np 1` with NCCL bootstrapped over MPI: the machine's mpirun,
#      else the bundle's (Open MPI's launcher, plugins and help texts, relocated with OPAL_* and
#      PMIX_* variables; `bash bench/gpu-check.sh mpi-rehearsal` checks that relocation here, as
#      root, with the system's Open MPI hidden in a private mount namespace);
#   4. sweep grid throughput on one GPU (needs `mpirun` on the machine; skipped without): the
#      8-cell grid of bench/sweep.sh (resnet20, Fashion-MNIST 20/class packed into the bundle,
#      2 losses x 4 rates, SWEEP_EPOCHS epochs) as 8 runs one after another, then as one
#      `sweep --ranks-per-run 1 --runs-per-gpu R` on R ranks for R = 1, 2, 4: wall times and
#      the ratio to one after another (small models cannot fill an H200; R > 1 is what should
#      gain). `bash bench/gpu-check.sh sweep` runs this step alone (COSINE_TRAIN, GPU_CHECK_DEVICE).
# The table also goes to $OUT/gpu-check.md when OUT is set (the device tool's output folder).
# Settings: BATCH (32), CIFAR_BATCH (100), STEPS (30), WARMUP (5), SWEEP_EPOCHS (6), PYTHON (python3),
# GPU_CHECK_DEVICE (cuda; `cpu`
# rehearses the run half on a machine without a GPU, with a small batch and image).
set -euo pipefail
cd "$(dirname "$0")/.."
bundle=target/gpu-check

build() {
  torch_cuda="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}/torch-2.11.0-cuda"
  [ -d "$torch_cuda/torch/lib" ] || COSINE_WITH_CUDA=1 bash launch/setup.sh
  (
    export LIBTORCH="$torch_cuda/torch"
    # shellcheck source=/dev/null
    source launch/env.sh
    # Its own target directory: a CUDA libtorch would otherwise rebuild the CPU one's crates.
    CARGO_TARGET_DIR=target/cuda cargo build --release -q -p cosine-train --features cuda
    rm -rf "$bundle.partial"
    mkdir -p "$bundle.partial/bin" "$bundle.partial/lib"
    cp target/cuda/release/cosine-train "$bundle.partial/bin/"
    pack_sweep_data "$bundle.partial/data/fashion-k20"
    strip "$bundle.partial/bin/cosine-train"
    # Every library the binary loads except libtorch and CUDA (the GPU machine's torch package
    # has those) and glibc's own (never copied: they must match the machine's loader).
    ldd "$bundle.partial/bin/cosine-train" | awk '/=> \// { print $3 }' | while read -r lib; do
      case "$lib" in
        "$torch_cuda"/*) continue ;;
      esac
      case "$(basename "$lib")" in
        # glibc's own, and the C++ runtime (the machine's must be new enough for its torch).
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|libutil.so.*|ld-linux*|libresolv.so.*) continue ;;
        libstdc++.so.*|libgcc_s.so.*) continue ;;
      esac
      cp -L "$lib" "$bundle.partial/lib/"
    done
    # Open MPI's launcher, for the one-rank MPI step on a machine without Open MPI.
    bundle_mpi "$bundle.partial"
    # The newest glibc any file needs, checked first by `run`.
    objdump -T "$bundle.partial"/bin/cosine-train "$bundle.partial"/lib/* "$bundle.partial"/mpi/bin/* \
      "$bundle.partial"/mpi/lib/*/*.so 2>/dev/null |
      grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1 > "$bundle.partial/glibc"
    rm -rf "$bundle"
    mv "$bundle.partial" "$bundle"
  )
  echo "gpu-check: bundle in $bundle ($(du -sh "$bundle" | cut -f1)); needs glibc >= $(cat "$bundle/glibc")"
}

# Open MPI's launcher, its plugins, help texts and configuration, relocated under "$1/mpi"
# (libraries into "$1/lib" beside the binary's), so that `mpirun -np 1` runs on a machine
# without Open MPI: `mpi_env` points Open MPI and PMIx there. The fast-network transports
# (UCX, libfabric, verbs, PSM) are left out: one node needs only shared memory and TCP.
bundle_mpi() {
  local dest="$1" orterun plugins=/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3
  local pmix=/usr/lib/x86_64-linux-gnu/pmix2
  orterun=$(readlink -f "$(command -v mpirun)")
  mkdir -p "$dest/mpi/bin" "$dest/mpi/lib/openmpi3" "$dest/mpi/lib/pmix" "$dest/mpi/share" "$dest/mpi/etc" "$dest/lib"
  cp -L "$orterun" "$dest/mpi/bin/mpirun"
  local p
  for p in "$plugins"/*.so; do
    case "$(basename "$p")" in
      *ucx*|*ofi*|*psm*|*openib*|*verbs*|*usnic*|*uct*|*portals*|*java*) continue ;;
    esac
    cp -L "$p" "$dest/mpi/lib/openmpi3/"
  done
  cp -L "$pmix"/lib/pmix/*.so "$dest/mpi/lib/pmix/"
  cp -rL /usr/share/openmpi "$dest/mpi/share/openmpi"
  [ -d "$pmix/share/pmix" ] && cp -rL "$pmix/share/pmix" "$dest/mpi/share/pmix"
  cp -L /etc/openmpi/openmpi-mca-params.conf "$dest/mpi/etc/"
  ldd "$dest/mpi/bin/mpirun" "$dest"/mpi/lib/openmpi3/*.so "$dest"/mpi/lib/pmix/*.so |
    awk '/=> \// { print $3 }' | sort -u | while read -r lib; do
      case "$(basename "$lib")" in
        libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|libutil.so.*|ld-linux*|libresolv.so.*) continue ;;
        libstdc++.so.*|libgcc_s.so.*) continue ;;
      esac
      [ -e "$dest/lib/$(basename "$lib")" ] || cp -L "$lib" "$dest/lib/"
    done
}

# The environment that makes the bundled Open MPI find itself under "$1/mpi".
mpi_env() {
  local b="$1/mpi"
  export OPAL_PREFIX="$b" OPAL_EXEC_PREFIX="$b" OPAL_BINDIR="$b/bin" OPAL_LIBDIR="$1/lib"
  export OPAL_PKGLIBDIR="$b/lib/openmpi3" OPAL_DATADIR="$b/share" OPAL_DATAROOTDIR="$b/share"
  export OPAL_PKGDATADIR="$b/share/openmpi" OPAL_SYSCONFDIR="$b/etc"
  export PMIX_PREFIX="$b" PMIX_LIBDIR="$1/lib" PMIX_PKGLIBDIR="$b/lib/pmix"
  export PMIX_PKGDATADIR="$b/share/pmix" PMIX_DATADIR="$b/share" PMIX_SYSCONFDIR="$b/etc"
  export PATH="$b/bin:$PATH" LD_LIBRARY_PATH="$1/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# Rehearses the bundled mpirun here: bundles it with this machine's CPU binary ($COSINE_TRAIN,
# else a release build), hides the
# system's Open MPI and PMIx in a private mount namespace (root), and runs a one-rank
# check-dist and bench-step under the bundled mpirun.
mpi_rehearsal() {
  local work bin="${COSINE_TRAIN:-}"
  if [ -z "$bin" ]; then
    cargo build --release -q -p cosine-train
    bin=target/release/cosine-train
  fi
  work=$(mktemp -d)
  mkdir -p "$work/bin"
  cp "$bin" "$work/bin/cosine-train"
  ldd "$bin" | awk '/=> \// { print $3 }' | grep -E 'libmpi|libopen-|libpmix|libhwloc|libevent' |
    while read -r lib; do mkdir -p "$work/lib" && cp -L "$lib" "$work/lib/"; done
  bundle_mpi "$work"
  echo "gpu-check: Open MPI bundle $(du -sh "$work/mpi" | cut -f1), libraries $(du -sh "$work/lib" | cut -f1)"
  local torch_lib
  torch_lib=$(dirname "$(ldd "$bin" | awk '/libtorch_cpu/ { print $3 }')")
  export -f mpi_env
  WORK="$work" TORCH_LIB="$torch_lib" unshare -m bash -c '
    set -euo pipefail
    for d in /usr/lib/x86_64-linux-gnu/openmpi /usr/lib/x86_64-linux-gnu/pmix2 /usr/share/openmpi /etc/openmpi; do
      mount -t tmpfs none "$d"
    done
    for f in /usr/bin/orterun /usr/lib/x86_64-linux-gnu/lib{mpi,open-pal,open-rte}.so.*; do
      [ -f "$f" ] && mount --bind /dev/null "$f"
    done
    ! command -v ompi_info >/dev/null || ! ompi_info >/dev/null 2>&1 || { echo "the system Open MPI is still visible" >&2; exit 1; }
    mpi_env "$WORK"
    export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$TORCH_LIB"
    allow=(); [ "$(id -u)" = 0 ] && allow=(--allow-run-as-root)
    mpirun -np 1 "${allow[@]}" --bind-to none "$WORK/bin/cosine-train" check-dist --dist mpi
    mpirun -np 2 "${allow[@]}" --oversubscribe --bind-to none "$WORK/bin/cosine-train" bench-step \
      --arch resnet8 --batch-size 4 --size 16 --steps 2 --warmup 1 --threads 1 | tail -n 1
  '
  rm -rf "$work"
  echo "gpu-check: the bundled mpirun ran without the system Open MPI"
}

# The sweep step's data (Fashion-MNIST, 20 training images per class, the whole test split).
pack_sweep_data() {
  [ -f "$1/manifest.json" ] && return 0
  cargo build --release -q -p datasets-prep
  target/release/datasets-prep pack --source fashion-mnist --root /usr/share/datasets/fashion-mnist \
    --out "$1" --per-class 20 --seed 0 >/dev/null
}

# Step 4: `sweep_step BIN DEVICE DATA REPORT`.
sweep_step() {
  local bin="$1" device="$2" data="$3" report="$4" epochs="${SWEEP_EPOCHS:-6}"
  local work mpi=(mpirun --oversubscribe --bind-to none)
  say() { echo "$@" | tee -a "$report"; }
  say
  if ! command -v mpirun >/dev/null; then
    say "Sweep on one GPU: skipped (no mpirun on this machine)"
    return 0
  fi
  [ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
  work=$(mktemp -d)
  local common=(--data "$data" --arch resnet20 --epochs "$epochs" --batch-size 50 --workers 2
    --device "$device" --threads 2)
  local axes=(--axis loss=ce,cosine --axis lr-max=0.5,0.1,0.05,0.01)
  say "Sweep on one $device: 8 cells (resnet20, Fashion-MNIST 20/class, $epochs epochs)"
  say
  say "| schedule | wall time | grid throughput vs one after another |"
  say "| --- | ---: | ---: |"
  local start seq_s t
  start=$(date +%s.%N)
  for loss in ce cosine; do
    for rate in 0.5 0.1 0.05 0.01; do
      timeout 600 "$bin" train --out "$work/seq-$loss-$rate" "${common[@]}" --loss "$loss" \
        --lr-max "$rate" >"$work/seq.log" 2>&1 || { say "FAILED: train $loss $rate: $(tail -n 3 "$work/seq.log")"; rm -rf "$work"; return 0; }
    done
  done
  seq_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
  say "$(awk -v s="$seq_s" 'BEGIN { printf "| 8 runs one after another, 1 process each | %.1f s | 1.00x |", s }')"
  for r in 1 2 4; do
    start=$(date +%s.%N)
    if timeout 600 "${mpi[@]}" -np "$r" "$bin" sweep --out "$work/grid-$r" --ranks-per-run 1 \
      --runs-per-gpu "$r" "${axes[@]}" -- "${common[@]}" >"$work/grid-$r.log" 2>&1; then
      t=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
      say "$(awk -v s="$seq_s" -v g="$t" -v r="$r" 'BEGIN {
        printf "| sweep, %d group(s) of 1 rank, --runs-per-gpu %d | %.1f s | %.2fx |", r, r, g, s / g }')"
    else
      say "| sweep, --runs-per-gpu $r | failed: $(tail -n 2 "$work/grid-$r.log" | tr '\n|' ' /') | |"
    fi
  done
  rm -rf "$work"
}

# One table: our training step (`bench-step`) against PyTorch eager's, per precision and
# channels-last setting, then where each step's time goes (each phase timed alone, the device
# waited for after it) and how many operators our step dispatches. Uses bin, py, device, steps,
# warmup, report and say from `run`.
step_table() {
  local arch="$1" size="$2" batch="$3" classes="$4" layouts="$5"
  local breakdown
  breakdown=$(mktemp)
  say
  say "$arch training step, ${size}x${size}, batch $batch, $steps steps after $warmup, device $device"
  say
  say "| precision | channels-last | ours images/s | PyTorch images/s | ours / PyTorch |"
  say "| --- | --- | ---: | ---: | ---: |"
  local common=(--arch "$arch" --batch-size "$batch" --size "$size" --channels 3 --classes "$classes"
    --steps "$steps" --warmup "$warmup" --device "$device")
  for precision in bf16 fp32; do
    for cl in $layouts; do
      local ours theirs py_cl=()
      [ "$cl" = on ] && py_cl=(--channels-last)
      ours=$(timeout 300 "$bin" bench-step "${common[@]}" --precision "$precision" \
        --channels-last "$cl" --dist single | tail -n 1) || ours='{}'
      theirs=$(env -u LD_LIBRARY_PATH timeout 300 "$py" bench/train_step_pytorch.py "${common[@]}" \
        --precision "$precision" "${py_cl[@]}" | tail -n 1) || theirs='{}'
      OURS="$ours" THEIRS="$theirs" "$py" - "$precision" "$cl" "$breakdown" <<'PY' | tee -a "$report"
import json, os, sys
precision, cl, breakdown = sys.argv[1:4]
def load(name):
    try:
        return json.loads(os.environ[name] or "{}")
    except ValueError:
        return {}
o, t = load("OURS"), load("THEIRS")
oi, ti = o.get("images_per_sec", 0), t.get("images_per_sec", 0)
ratio = f"{oi / ti:.3f}" if oi and ti else "failed"
print(f"| {precision} | {cl} | {oi:.1f} | {ti:.1f} | {ratio} |")
ms = lambda d, k: f"{1e3 * d[k]:.2f}" if isinstance(d.get(k), (int, float)) else "-"
op, tp, ops = o.get("phase_seconds_median", {}), t.get("phase_seconds_median", {}), o.get("ops_per_step", {})
with open(breakdown, "a") as f:
    f.write(f"| {precision} | {cl} | {ms(o, 'step_seconds_median')} | {ms(op, 'forward_backward')} | "
            f"{ms(op, 'update')} | {o.get('host_wait_fraction', float('nan')):.2f} | "
            f"{ops.get('forward_backward', '-')} + {ops.get('gradient_sync', '-')} + {ops.get('update', '-')} "
            f"(per-tensor update: {ops.get('update_one_op_per_tensor', '-')}) | "
            f"{ms(t, 'step_seconds_median')} | {ms(tp, 'forward_backward')} | {ms(tp, 'update')} |\n")
PY
    done
  done
  say
  say "Where the time goes (ms per step; a phase alone is timed with the device waited for after it;"
  say "host wait: the share of queued steps' time the host waited for the device, near 1 when the GPU"
  say "is the bottleneck; operators: forward+backward + totals + update):"
  say
  say "| precision | channels-last | ours step | ours fwd+bwd | ours update | ours host wait | ours operators | PyTorch step | PyTorch fwd+bwd | PyTorch update |"
  say "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"
  tee -a "$report" <"$breakdown"
  rm -f "$breakdown"
}

# The training step on one GPU under `mpirun -np 1` (NCCL bootstrapped over MPI, as a cluster
# job runs), when the machine has mpirun; the bundle does not carry Open MPI's launcher.
mpi_step() {
  say
  local launcher="the machine's mpirun"
  if ! command -v mpirun >/dev/null; then
    if [ ! -x "$bundle/mpi/bin/mpirun" ]; then
      say "One-rank MPI + NCCL step: skipped (no mpirun on this machine or in the bundle)"
      return 0
    fi
    mpi_env "$PWD/$bundle"
    launcher="the bundled mpirun"
  fi
  local mpi=(mpirun -np 1 --bind-to none) out
  [ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)
  if out=$(timeout 300 "${mpi[@]}" -x LD_LIBRARY_PATH "$bin" bench-step --arch resnet110-wfc --size 32 \
    --batch-size "$cifar_batch" --classes 100 --steps "$steps" --warmup "$warmup" --device "$device" \
    --dist nccl --whole-step 2>&1); then
    say "One-rank MPI + NCCL step under $launcher (resnet110-wfc, batch $cifar_batch): $(echo "$out" | tail -n 1 | field images_per_sec) images/s"
  else
    say "FAILED: one-rank MPI + NCCL step: $(echo "$out" | tail -n 3 | tr '\n' ' ')"
  fi
}

run() {
  local device="${GPU_CHECK_DEVICE:-cuda}" py="${PYTHON:-python3}"
  local batch="${BATCH:-32}" steps="${STEPS:-30}" warmup="${WARMUP:-5}" size=448
  local cifar_batch="${CIFAR_BATCH:-100}"
  if [ "$device" = cpu ]; then
    batch="${BATCH:-4}" steps="${STEPS:-2}" warmup="${WARMUP:-1}" size=64 cifar_batch="${CIFAR_BATCH:-8}"
  fi
  [ -x "$bundle/bin/cosine-train" ] || { echo "gpu-check: no $bundle; run 'bash bench/gpu-check.sh build' first" >&2; exit 1; }
  local need have
  need=$(cat "$bundle/glibc" 2>/dev/null || echo 0)
  have=$(getconf GNU_LIBC_VERSION | awk '{ print $2 }')
  if [ "$(printf '%s\n' "$need" "$have" | sort -V | head -n 1)" != "$need" ]; then
    echo "gpu-check: this machine's glibc $have is older than the $need the bundle was built for" \
      "(build it on a machine with glibc <= $have)" >&2
    exit 1
  fi
  local torch_lib nccl_lib
  torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))') || {
    echo "gpu-check: $py cannot import torch (set PYTHON to a Python with torch 2.11)" >&2; exit 1; }
  # The bundle links against torch 2.11's symbols: another version fails with undefined symbols.
  local torch_version
  torch_version=$("$py" -c 'import torch; print(torch.__version__)')
  case "$torch_version" in
    2.11.*) ;;
    *) echo "gpu-check: $py has torch $torch_version; the bundle needs torch 2.11 (set PYTHON)" >&2; exit 1 ;;
  esac
  nccl_lib=$("$py" -c 'import os, nvidia.nccl as n; print(os.path.join(list(n.__path__)[0], "lib"))' 2>/dev/null || true)
  # libnccl.so.2 is opened by name (libtorch_cuda has usually loaded it already).
  export LD_LIBRARY_PATH="$PWD/$bundle/lib:$torch_lib${nccl_lib:+:$nccl_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local bin="$bundle/bin/cosine-train" report
  report=$(mktemp)
  field() { sed -n "s/.*\"$1\": *\([^,}]*\).*/\1/p"; }
  say() { echo "$@" | tee -a "$report"; }

  say "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  say
  say "- machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || echo "no nvidia-smi"), $(nproc) cores"
  say "- PyTorch: $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
  local doctor
  doctor=$(timeout 120 "$bin" doctor --json)
  echo "$doctor"
  say "- cosine-train doctor: libtorch $(echo "$doctor" | field libtorch_version | tr -d '"'), cuda_available $(echo "$doctor" | field cuda_available), devices $(echo "$doctor" | field cuda_device_count), cuDNN $(echo "$doctor" | field cudnn_version), NCCL $(echo "$doctor" | field nccl_version | tr -d '"')"
  if [ "$device" = cuda ]; then
    if [ "$(echo "$doctor" | field cuda_available)" != true ]; then
      say "FAILED: tch does not see CUDA: $(echo "$doctor" | field cuda_unavailable_reason)"
      exit 1
    fi
    local dist
    dist=$(timeout 180 "$bin" check-dist --dist nccl --device cuda --elements 16777216 2>&1) || {
      say "FAILED: one-rank NCCL check: $dist"; exit 1; }
    echo "$dist"
    say "- one-rank NCCL all-reduce of 16M floats, broadcast, barrier: passed"
  fi
  step_table resnet50 "$size" "$batch" 200 "on off"
  # The CIFAR ResNets are launch-bound on a large GPU: many small kernels per step.
  step_table resnet110-wfc 32 "$cifar_batch" 100 "off"
  [ "$device" = cuda ] && mpi_step
  sweep_step "$bin" "$device" "$bundle/data/fashion-k20" "$report"
  if [ -n "${OUT:-}" ]; then
    cp "$report" "$OUT/gpu-check.md"
  fi
  rm -f "$report"
}

case "${1:-all}" in
  mpi-rehearsal) mpi_rehearsal ;;
  build) build ;;
  run) run ;;
  all) build && run ;;
  sweep)
    data=target/gpu-check-sweep/fashion-k20
    pack_sweep_data "$data"
    report=$(mktemp)
    sweep_step "${COSINE_TRAIN:-$bundle/bin/cosine-train}" "${GPU_CHECK_DEVICE:-cuda}" "$data" "$report"
    rm -f "$report" ;;
  *) echo "usage: bash bench/gpu-check.sh [build|run|sweep|mpi-rehearsal]" >&2; exit 2 ;;
esac
