#!/usr/bin/env bash
# Data pipeline: ready training batches per second (448 crops, flips, random erasing,
# normalised, batches of 32) from CUB-like images, with the same number of workers:
#   ours      `cosine-train bench-loader` over a shard directory (pre-resized raw pixels)
#   PyTorch   a DataLoader over the JPEG files (Pillow decode + resize + the same transforms)
#   PyTorch   a DataLoader over a numpy memmap of pre-resized 512x512 pixels
#   bash bench/loader.sh [N_IMAGES]     (default 300; WORKERS, EPOCHS override)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env.sh
n="${1:-300}"
workers="${WORKERS:-$(nproc)}"
epochs="${EPOCHS:-2}"
work="${BENCH_DIR:-/tmp/cosine-bench-loader}"
venv="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}/bench-venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c "import PIL, numpy, typing_extensions, sympy, networkx, jinja2, fsspec, filelock" 2>/dev/null ||
  "$venv/bin/pip" install -q --disable-pip-version-check pillow numpy typing_extensions sympy networkx jinja2 fsspec filelock
# PyTorch itself: the torch package of the PyPI wheel set (`COSINE_WITH_CUDA=1 make setup`, 3.8 GB;
# its Python extension needs the CUDA libraries even on a CPU). Its libtorch_cpu is the same
# file our binary runs on, from the same torch 2.11.0 wheel.
torch_py="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}/torch-2.11.0-cuda"
[ -d "$torch_py/torch" ] || COSINE_WITH_CUDA=1 bash launch/setup.sh
export PYTHONPATH="$torch_py${PYTHONPATH:+:$PYTHONPATH}"
py() { env -u LD_LIBRARY_PATH "$venv/bin/python" "$@"; }
cargo build --release -q -p cosine-train -p datasets-prep
mkdir -p "$work"
if [ ! -f "$work/images/.done-$n" ]; then
  rm -rf "$work/images" "$work/shards" "$work/pixels.npy"
  py bench/make_cub_like.py "$work/images" "$n"
  touch "$work/images/.done-$n"
fi
[ -f "$work/shards/manifest.json" ] || target/release/datasets-prep pack --source folder \
  --root "$work/images" --out "$work/shards" --short-side 512 --force >/dev/null 2>&1
[ -f "$work/pixels.npy" ] || py bench/loader_pytorch.py make-memmap "$work/images/train" "$work/pixels.npy"
field() { sed -n "s/.*\"$1\":\([^,}]*\).*/\1/p"; }
ours=$(target/release/cosine-train bench-loader --data "$work/shards" --workers "$workers" \
  --batch-size 32 --epochs "$epochs" | field images_per_sec)
jpeg=$(py bench/loader_pytorch.py jpeg "$work/images/train" "$workers" 32 "$epochs" | field images_per_sec)
memmap=$(py bench/loader_pytorch.py memmap "$work/pixels.npy" "$workers" 32 "$epochs" | field images_per_sec)
echo "ready training batches (32 x 3x448x448, crop + flip + erasing + normalise), $workers worker(s), $(( n * 9 / 10 )) training images"
echo
echo "| pipeline | images/s | images/s per worker | ours / it |"
echo "| --- | ---: | ---: | ---: |"
awk -v o="$ours" -v j="$jpeg" -v m="$memmap" -v w="$workers" 'BEGIN {
  printf "| ours: shard directory | %.1f | %.1f | 1.00 |\n", o, o / w
  printf "| PyTorch DataLoader: JPEG files | %.1f | %.1f | %.2f |\n", j, j / w, o / j
  printf "| PyTorch DataLoader: numpy memmap | %.1f | %.1f | %.2f |\n", m, m / w, o / m }'
