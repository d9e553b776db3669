#!/usr/bin/env bash
# Pack throughput of `datasets-prep pack` against a Pillow script doing the same decode + resize +
# store on the same cores, as a ratio; then random-access read throughput of the reader.
#   bash bench/pack.sh [N_IMAGES]        (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
n="${1:-600}"
cores="$(nproc)"
work="${BENCH_DIR:-/tmp/cosine-bench-pack}"
venv="${COSINE_LIBTORCH_PREFIX:-/opt/cosine-train}/bench-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check pillow numpy
fi
py="$venv/bin/python"
cargo build --release -q -p datasets-prep --bin datasets-prep --example read_bench
mkdir -p "$work"
if [ ! -f "$work/images/.done-$n" ]; then
  rm -rf "$work/images"
  "$py" bench/make_cub_like.py "$work/images" "$n"
  touch "$work/images/.done-$n"
fi
# Warm the page cache for both.
find "$work/images" -name "*.jpg" -exec cat {} + >/dev/null

pillow=$("$py" bench/pack_vs_pillow.py "$work/images" "$work/pillow.raw" 512 "$cores")
start=$(date +%s.%N)
target/release/datasets-prep pack --source folder --root "$work/images" --out "$work/shards" \
  --short-side 512 --force
end=$(date +%s.%N)
ours_secs=$(echo "$end - $start" | bc -l)
pillow_rate=$(echo "$pillow" | cut -d' ' -f3)
ours_rate=$(echo "$n / $ours_secs" | bc -l)
printf 'pack, %d CUB-like JPEGs (~500x375 -> short side 512), %d cores\n' "$n" "$cores"
printf '  Pillow + multiprocessing: %8.1f images/s\n' "$pillow_rate"
printf '  datasets-prep pack:       %8.1f images/s\n' "$ours_rate"
printf '  ratio:                    %8.2fx\n' "$(echo "$ours_rate / $pillow_rate" | bc -l)"
echo "random-access reads of the packed train split (raw storage):"
target/release/examples/read_bench "$work/shards" 3 | sed 's/^/  /'
