#!/usr/bin/env bash
# Launch cosine-train on N ranks with mpirun, with the flags multi-rank jobs need:
#
#   launch/mpirun.sh -n 4 -- train --data data/cub --out runs/cub-cosine --preset paper-cub-cosine --device cuda
#   launch/mpirun.sh -n 8 --hosts node1:4,node2:4 --iface ib0 -- train ...
#   launch/mpirun.sh -n 2 --per-socket -- train ...     # CPU cluster node: one rank per socket
#   launch/mpirun.sh --dry-run -n 2 -- train ...        # print the command, run nothing
#
# What it adds to mpirun (each can be overridden by passing the mpirun flag yourself before `--`):
#   * the run environment (`launch/env.sh`) and LD_LIBRARY_PATH, PATH, COSINE_*, NCCL_*, OMP_*
#     and CUDA_VISIBLE_DEVICES exported to every rank (-x);
#   * placement: ranks filled slot by slot, not bound (`--map-by slot --bind-to none`; each rank
#     then uses its share of the node's cores), or with --per-socket one rank per socket bound to
#     it;
#   * failure detection: TCP keepalive on Open MPI's control connections (~20 s), so a dead node
#     or a cut link ends the job instead of hanging it (cosine-train's --collective-timeout
#     covers ranks that hang with their links up);
#   * --iface IF: the network interface for MPI traffic, Open MPI's control channel and NCCL
#     (btl_tcp_if_include, oob_tcp_if_include, NCCL_SOCKET_IFNAME); pick the one your nodes
#     reach each other on (e.g. ib0, eth1), not docker0 or lo;
#   * --allow-run-as-root when run as root (containers).
# Anything before `--` that is not an option of this script goes to mpirun unchanged; everything
# after `--` goes to cosine-train. COSINE_TRAIN selects the binary (default: this checkout's
# target/release/cosine-train).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# usage [STATUS]: the header above; on stdout with status 0 (--help), else on stderr.
usage() {
  local status="${1:-2}"
  if [ "$status" -eq 0 ]; then
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  else
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  fi
  exit "$status"
}

np=""; hosts=""; hostfile=""; iface="${COSINE_IFACE:-}"; per_socket=0; dry=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|-np|--np) np="${2:?$1 needs a number}"; shift 2 ;;
    --hosts) hosts="${2:?--hosts needs host:slots,...}"; shift 2 ;;
    --hostfile) hostfile="${2:?--hostfile needs a file}"; shift 2 ;;
    --iface) iface="${2:?--iface needs an interface name}"; shift 2 ;;
    --per-socket) per_socket=1; shift ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) extra+=("$1"); shift ;;
  esac
done
[ $# -gt 0 ] || { echo "launch/mpirun.sh: nothing to run; put cosine-train's arguments after --" >&2; usage; }
case "$np" in
  ''|*[!0-9]*|0) echo "launch/mpirun.sh: -n N: expected a positive number of ranks, got '${np}'" >&2; exit 2 ;;
esac

bin="${COSINE_TRAIN:-$repo/target/release/cosine-train}"
# The environment of this binary: the libtorch it was linked with, not the first one found.
export COSINE_ENV_FOR="$bin"
# shellcheck source=launch/env.sh
source "$repo/launch/env.sh"
if [ "$dry" = 0 ] && [ ! -x "$bin" ]; then
  echo "launch/mpirun.sh: $bin is missing; run 'make build' (or set COSINE_TRAIN)" >&2
  exit 1
fi

cmd=(mpirun -np "$np")
[ -n "$hosts" ] && cmd+=(--host "$hosts")
[ -n "$hostfile" ] && cmd+=(--hostfile "$hostfile")
if [ "$per_socket" = 1 ]; then
  cmd+=(--map-by socket --bind-to socket)
else
  cmd+=(--map-by slot --bind-to none)
fi
cmd+=(--mca oob_tcp_keepalive_time 10 --mca oob_tcp_keepalive_intvl 2 --mca oob_tcp_keepalive_probes 4)
if [ -n "$iface" ]; then
  cmd+=(--mca btl_tcp_if_include "$iface" --mca oob_tcp_if_include "$iface")
  export NCCL_SOCKET_IFNAME="$iface"
fi
[ "$(id -u)" = 0 ] && cmd+=(--allow-run-as-root)
for var in LD_LIBRARY_PATH PATH CUDA_VISIBLE_DEVICES $(compgen -e | grep -E '^(COSINE_|NCCL_|OMP_)' || true); do
  [ -n "${!var+x}" ] && cmd+=(-x "$var")
done
cmd+=("${extra[@]}" "$bin" "$@")

if [ "$dry" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
