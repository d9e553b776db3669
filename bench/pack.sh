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
# Warm the page cache for the inputs. Every timed run starts with no earlier output on disk and
# no dirty pages, so that none pays for another's deletions or write-back; the three are taken in
# turn, ROUNDS times, and each figure is the median (this VM's disk and CPUs are noisy).
find "$work/images" -name "*.jpg" -exec cat {} + >/dev/null
clean() { rm -rf "$work/shards" "$work/pillow.raw"; sync; }
rounds="${ROUNDS:-3}"
pillow_rates=() pillow_durable_rates=() ours_rates=()
for _ in $(seq "$rounds"); do
  clean
  pillow_rates+=("$("$py" bench/pack_vs_pillow.py "$work/images" "$work/pillow.raw" 512 "$cores" |
    cut -d' ' -f3)")
  clean
  pillow_durable_rates+=("$("$py" bench/pack_vs_pillow.py "$work/images" "$work/pillow.raw" 512 \
    "$cores" fsync | cut -d' ' -f3)")
  clean
  start=$(date +%s.%N)
  target/release/datasets-prep pack --source folder --root "$work/images" --out "$work/shards" \
    --short-side 512
  end=$(date +%s.%N)
  ours_rates+=("$(echo "$n / ($end - $start)" | bc -l)")
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
pillow_rate=$(median "${pillow_rates[@]}")
pillow_durable_rate=$(median "${pillow_durable_rates[@]}")
ours_rate=$(median "${ours_rates[@]}")
mib=$(du -sm "$work/shards" | cut -f1)
disk=$(dd if=/dev/zero of="$work/dd.test" bs=1M count=256 oflag=direct 2>&1 | tail -1 | sed 's/.*, //')
rm -f "$work/dd.test"
printf 'pack, %d CUB-like JPEGs (~500x375 -> short side 512, %d MiB of raw pixels), %d cores,\n' \
  "$n" "$mib" "$cores"
printf 'median of %d rounds (disk, direct writes: %s)\n' "$rounds" "$disk"
printf '  Pillow + multiprocessing, left in page cache: %8.1f images/s\n' "$pillow_rate"
printf '  Pillow + multiprocessing, fsynced:            %8.1f images/s\n' "$pillow_durable_rate"
printf '  datasets-prep pack (fsyncs before renaming):  %8.1f images/s\n' "$ours_rate"
printf '  ratio, same work (both on disk):              %8.2fx\n' \
  "$(echo "$ours_rate / $pillow_durable_rate" | bc -l)"
printf '  ratio, against Pillow left in page cache:     %8.2fx\n' \
  "$(echo "$ours_rate / $pillow_rate" | bc -l)"
rounded() { printf ' %.1f' "$@"; }
echo "every round, images/s (Pillow page cache | Pillow fsynced | ours):"
echo " $(rounded "${pillow_rates[@]}") |$(rounded "${pillow_durable_rates[@]}") |$(rounded "${ours_rates[@]}")"
echo "random-access reads of the packed train split (raw storage):"
target/release/examples/read_bench "$work/shards" 3 | sed 's/^/  /'
