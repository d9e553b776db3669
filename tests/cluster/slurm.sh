#!/usr/bin/env bash
# A one-node Slurm cluster on this machine for the cluster tests (Debian 12, as root, no
# systemd): `slurm.sh install`, `slurm.sh start RUN_DIR`, `slurm.sh stop RUN_DIR`.
# install is idempotent; start writes /etc/slurm/slurm.conf for this node (state and logs in
# RUN_DIR) and waits until the node is idle; stop shuts the daemons down and leaves no process.
# Settings that matter, all observed on this kind of machine (../shared/docs/slurm.md):
#   MpiDefault=pmix (srun --mpi=pmi2 does not work with Debian's Open MPI),
#   AuthInfo=cred_expire=5 + sched_interval=1 (a requeued job restarts in ~6 s, not ~120 s),
#   SlurmdParameters=config_overrides (advertise more CPUs than the VM has),
#   partitions low (default) and high: a high job preempts a low one (USR1 to its batch
#   shell, then requeue after GraceTime); preempt_send_user_signal lives in SlurmctldParameters
#   in Slurm 22.05.
set -euo pipefail
step="${1:?usage: slurm.sh install|start RUN_DIR|stop RUN_DIR}"
run="${2:-/tmp/cosine-slurm}"
host="$(hostname -s)"
cpus="${SLURM_CPUS:-2}"

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
     && command -v munged >/dev/null; then
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start daemons (no systemd, no configuration yet).
  local policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; policy=1
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  [ "$policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  return 0
}

conf() {
  mkdir -p /etc/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=cosine-ci
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
StateSaveLocation=$run/ctld
SlurmdSpoolDir=$run/d
SlurmctldPidFile=$run/slurmctld.pid
SlurmdPidFile=$run/slurmd.pid
SlurmctldLogFile=$run/slurmctld.log
SlurmdLogFile=$run/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=5
InactiveLimit=0
MinJobAge=300
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=low Nodes=$host Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=high Nodes=$host MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
CONF
}

stop() {
  if scontrol ping >/dev/null 2>&1; then
    scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  for f in "$run/slurmctld.pid" "$run/slurmd.pid"; do
    [ -s "$f" ] || continue
    pid="$(cat "$f")"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  pkill -x slurmstepd 2>/dev/null || true
  if [ -s /run/munge/munged.pid ]; then
    pid="$(cat /run/munge/munged.pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
}

start() {
  stop >/dev/null 2>&1 || true
  rm -rf "$run"; mkdir -p "$run/ctld" "$run/d"
  conf
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --force
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  slurmctld -c
  slurmd -c
  for _ in $(seq 1 150); do
    if sinfo -h -n "$host" -o '%T' 2>/dev/null | grep -qx idle; then return 0; fi
    sleep 0.2
  done
  echo "slurm.sh: the node did not become idle" >&2
  tail -n 20 "$run"/*.log >&2 || true
  return 1
}

case "$step" in
  install) install ;;
  start) install; start ;;
  stop) stop ;;
  *) echo "slurm.sh: unknown step $step" >&2; exit 2 ;;
esac
