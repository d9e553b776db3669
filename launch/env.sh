# Build and run environment for cosine-train. Source it: `source launch/env.sh`.
#
# It finds libtorch in this order:
#   1. LIBTORCH already set (your own PyTorch 2.11 install, see README "Using your own PyTorch");
#   1b. with COSINE_ENV_FOR=BINARY (what launch/mpirun.sh and sbatch.sh set), the libtorch that
#      binary was linked with (its RUNPATH), so that a CUDA build never runs on the CPU libtorch;
#   2. the CUDA install of `COSINE_WITH_CUDA=1 make setup`, when COSINE_WITH_CUDA=1;
#   3. the CPU install of `make setup`, then the CUDA one.
# and exports what cargo (torch-sys) and the binaries need. Nothing else is changed.
_cosine_prefix="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}"
_cosine_cpu="$_cosine_prefix/torch-2.11.0-cpu"
_cosine_cuda="$_cosine_prefix/torch-2.11.0-cuda"
if [ -z "${LIBTORCH:-}" ] && [ -n "${COSINE_ENV_FOR:-}" ] && command -v readelf >/dev/null 2>&1; then
  for _cosine_dir in $(readelf -d "$COSINE_ENV_FOR" 2>/dev/null | sed -n 's/.*R[UN]*PATH.*\[\(.*\)\]/\1/p' | tr ':' ' '); do
    if [ -f "$_cosine_dir/libtorch_cpu.so" ]; then
      LIBTORCH="$(cd "$_cosine_dir/.." && pwd)"
      export LIBTORCH
      break
    fi
  done
  unset _cosine_dir
fi
if [ -z "${LIBTORCH:-}" ]; then
  if [ "${COSINE_WITH_CUDA:-0}" = 1 ] && [ -d "$_cosine_cuda/torch/lib" ]; then
    export LIBTORCH="$_cosine_cuda/torch"
  elif [ -d "$_cosine_cpu/torch/lib" ]; then
    export LIBTORCH="$_cosine_cpu/torch"
  elif [ -d "$_cosine_cuda/torch/lib" ]; then
    export LIBTORCH="$_cosine_cuda/torch"
  else
    echo "launch/env.sh: no libtorch found under $_cosine_prefix; run 'make setup' (or set LIBTORCH)" >&2
  fi
fi
if [ -n "${LIBTORCH:-}" ]; then
  # The PyPI wheels are built with the C++11 ABI.
  export LIBTORCH_CXX11_ABI="${LIBTORCH_CXX11_ABI:-1}"
  _cosine_ld="$LIBTORCH/lib"
  # NCCL from the same wheel set (the binaries also find it there without this).
  if [ -d "$LIBTORCH/../nvidia/nccl/lib" ]; then
    _cosine_ld="$_cosine_ld:$(cd "$LIBTORCH/../nvidia/nccl/lib" && pwd)"
  fi
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$_cosine_ld:"*) ;;
    *) export LD_LIBRARY_PATH="$_cosine_ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  esac
fi
unset _cosine_prefix _cosine_cpu _cosine_cuda _cosine_ld
