#!/usr/bin/env bash
# Two "hosts" on this machine for the cluster tests: network namespaces PREFIXn1 and PREFIXn2
# (eth0 = 10.77.0.1 and 10.77.0.2), joined by a bridge in PREFIXsw, so that MPI ranks on them
# talk TCP only, and a link can be cut at the "switch". Needs root.
#   netns.sh up DIR PREFIX        create them; DIR gets the ssh stand-in and session files
#   netns.sh run DIR PREFIX CMD.. run CMD in host 1 with what mpirun needs to reach host 2
#   netns.sh down DIR PREFIX      kill everything in them, delete them and DIR's session files
# Facts this relies on (../shared/docs/netns-mpi.md): mpirun starts host 2's daemon through
# `plm_rsh_agent` (here a script entering the namespace instead of ssh); ranks must not be bound
# (each daemon would bind its rank to the same core); Open MPI's session directories go to a
# per-test directory (they are left behind when a host is killed); `ip netns del` does not kill
# processes, so they are killed first.
set -euo pipefail
step="${1:?usage: netns.sh up|run|down DIR PREFIX [CMD...]}"
dir="${2:?DIR}"
p="${3:?PREFIX}"
shift 3
net=10.77.0

up() {
  if ! command -v ip >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null
  fi
  mkdir -p "$dir/sess"
  ip netns add "${p}sw"
  ip -n "${p}sw" link set lo up
  ip -n "${p}sw" link add br0 type bridge
  ip -n "${p}sw" link set br0 up
  for k in 1 2; do
    ip netns add "${p}n$k"
    ip -n "${p}n$k" link set lo up
    ip -n "${p}n$k" link add eth0 type veth peer name "port$k"
    ip -n "${p}n$k" link set "port$k" netns "${p}sw"
    ip -n "${p}sw" link set "port$k" master br0
    ip -n "${p}sw" link set "port$k" up
    ip -n "${p}n$k" addr add "$net.$k/24" dev eth0
    ip -n "${p}n$k" link set eth0 up
  done
  # The ssh stand-in: `agent [options] HOST COMMAND...` runs COMMAND in HOST's namespace, with
  # the host's own name (so that Open MPI sees two nodes).
  cat > "$dir/agent" <<AGENT
#!/usr/bin/env bash
while [[ "\${1:-}" == -* ]]; do shift; done
host="\$1"; shift
case "\$host" in
  $net.*) k="\${host##*.}" ;;
  node*) k="\${host#node}" ;;
  *) echo "agent: unknown host \$host" >&2; exit 255 ;;
esac
exec ip netns exec "${p}n\$k" unshare --uts /bin/sh -c 'hostname "\$0"; exec /bin/sh -c "\$1"' "node\$k" "\$*"
AGENT
  chmod +x "$dir/agent"
}

run() {
  export OMPI_MCA_plm_rsh_agent="$dir/agent"
  export OMPI_MCA_btl=tcp,self
  export OMPI_MCA_orte_tmpdir_base="$dir/sess"
  export OMPI_MCA_hwloc_base_binding_policy=none
  export OMPI_MCA_mpi_yield_when_idle=1
  exec ip netns exec "${p}n1" unshare --uts /bin/sh -c 'hostname node1; exec "$@"' sh "$@"
}

down() {
  for ns in "${p}n1" "${p}n2" "${p}sw"; do
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  done
  sleep 0.2
  for ns in "${p}n1" "${p}n2" "${p}sw"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$dir/sess"
}

case "$step" in
  up) up ;;
  run) run "$@" ;;
  down) down ;;
  *) echo "netns.sh: unknown step $step" >&2; exit 2 ;;
esac
