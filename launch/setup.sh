#!/usr/bin/env bash
# Installs what building, testing and running cosine-train needs on Debian 12 (run as root).
# Idempotent: every step checks first, so a second run installs nothing and takes seconds.
#
#   bash launch/setup.sh                 # CPU: OpenMPI, libclang, libtorch 2.11.0 (CPU use)
#   COSINE_WITH_CUDA=1 bash launch/setup.sh   # GPU machine: also CUDA libraries and NCCL
#
# Also installed: the real image data the demo and tests use:
# Fashion-MNIST from Debian (/usr/share/datasets/fashion-mnist) and the foolbox sample photos
# (CIFAR/ImageNet PNG and JPEG files) into $PREFIX/data/foolbox.
#
# libtorch comes from the PyPI torch==2.11.0 wheel (a CUDA 13.0 build; its libtorch_cpu.so
# itself needs libcudart and libcupti, hence the two small nvidia wheels even for CPU use).
# Everything pip installs goes into one --target directory; a second pip call into the same
# directory would skip the shared nvidia/ tree, so it is always a single call.
set -euo pipefail

TORCH_VERSION=2.11.0
WITH_CUDA="${COSINE_WITH_CUDA:-0}"
if [ "$WITH_CUDA" = 1 ]; then flavour=cuda; else flavour=cpu; fi
PREFIX="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}"
TORCH_DIR="$PREFIX/torch-$TORCH_VERSION-$flavour"

say() { printf 'setup: %s\n' "$*"; }
installed_anything=0

# 1. Debian packages: OpenMPI (runtime + headers), libclang (bindgen in mpi-sys), Fashion-MNIST
#    (the demo's data) and DejaVu fonts (the text of `report` plots).
APT_PKGS=(libopenmpi-dev openmpi-bin libclang-dev dataset-fashion-mnist fonts-dejavu-core)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    say "missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  installed_anything=1
fi

# 2. libtorch from the PyPI wheel set, pinned to what torch 2.11.0's metadata asks for.
PIP_PKGS=("torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85)
if [ "$WITH_CUDA" = 1 ]; then
  PIP_PKGS+=(nvidia-cublas==13.1.0.3 nvidia-cufft==12.0.0.61 nvidia-cufile==1.15.1.6
    nvidia-curand==10.4.0.35 nvidia-cusolver==12.0.4.66 nvidia-cusparse==12.6.3.3
    nvidia-nvjitlink==13.0.88 nvidia-cuda-nvrtc==13.0.88 nvidia-nvtx==13.0.85
    nvidia-cudnn-cu13==9.19.0.56 nvidia-cusparselt-cu13==0.8.0 nvidia-nccl-cu13==2.28.9
    nvidia-nvshmem-cu13==3.4.5)
fi
stamp="$TORCH_DIR/.installed"
want="${PIP_PKGS[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  PY="${PYTHON:-python3}"
  if ! "$PY" -m pip --version >/dev/null 2>&1; then
    say "no pip for $PY; installing python3-pip"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
    PY=/usr/bin/python3
  fi
  say "installing libtorch $TORCH_VERSION ($flavour) into $TORCH_DIR"
  tmp="$TORCH_DIR.partial"
  rm -rf "$tmp"
  mkdir -p "$PREFIX"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q --no-deps --no-compile \
    --break-system-packages --target "$tmp" "${PIP_PKGS[@]}" 2>/dev/null ||
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install -q --no-deps --no-compile \
      --target "$tmp" "${PIP_PKGS[@]}"
  printf '%s' "$want" >"$tmp/.installed"
  rm -rf "$TORCH_DIR"
  mv "$tmp" "$TORCH_DIR"
  installed_anything=1
fi

# 3. Real sample photos (20 CIFAR-10, 20 CIFAR-100 PNGs, 20 ImageNet JPEGs) from the foolbox wheel.
PHOTOS="$PREFIX/data/foolbox"
if [ ! -f "$PHOTOS/.installed" ]; then
  say "installing sample photos into $PHOTOS"
  tmp="$PHOTOS.partial"
  rm -rf "$tmp" && mkdir -p "$tmp/wheel"
  PIP_DISABLE_PIP_VERSION_CHECK=1 "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: \
    foolbox==3.3.4 -d "$tmp/wheel"
  "${PYTHON:-python3}" - "$tmp" <<'PY'
import glob, os, sys, zipfile
out = sys.argv[1]
with zipfile.ZipFile(glob.glob(os.path.join(out, "wheel", "*.whl"))[0]) as z:
    for name in z.namelist():
        if name.startswith("foolbox/data/") and not name.endswith("/"):
            with open(os.path.join(out, os.path.basename(name)), "wb") as f:
                f.write(z.read(name))
PY
  rm -rf "$tmp/wheel"
  touch "$tmp/.installed"
  rm -rf "$PHOTOS" && mv "$tmp" "$PHOTOS"
  installed_anything=1
fi

if [ "$installed_anything" = 0 ]; then
  say "everything present ($TORCH_DIR); nothing installed"
else
  say "done; libtorch in $TORCH_DIR ($(du -sh "$TORCH_DIR" | cut -f1))"
fi
