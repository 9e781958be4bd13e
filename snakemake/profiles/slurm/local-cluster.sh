#!/usr/bin/env bash
# A real single-node SLURM cluster on this (Debian) machine, to try the SLURM profile and to test it in CI.
#
#   sudo snakemake/profiles/slurm/local-cluster.sh up     # install (if needed), configure, start, wait
#   sudo snakemake/profiles/slurm/local-cluster.sh status
#   sudo snakemake/profiles/slurm/local-cluster.sh down   # cancel its jobs, stop exactly the daemons it started
#
# What `up` does (as root; settings in docs/workflow.md, "A local SLURM cluster"):
# - apt-get installs slurmctld, slurmd, slurm-client and munge when `slurmctld` is missing;
# - generates a munge key unless one exists, starts munged;
# - writes /etc/slurm/slurm.conf (the plugin strips SLURM_* variables inside jobs, so SLURM_CONF cannot point
#   elsewhere) and gres.conf, refusing to overwrite files it did not write itself;
# - one node (this host) with every CPU and the memory minus 1 GiB, in two partitions `cpu` (default) and
#   `gpu` (the names the profile uses); `gres gpu:N` backed by character devices such as /dev/null, so rules
#   asking for GPUs are scheduled on a GPU-less machine (SLURM then sets CUDA_VISIBLE_DEVICES, but there is
#   no GPU: code must not take that variable as proof of one);
# - no accounting database (AccountingStorageType=accounting_storage/none; the profile checks job status
#   with squeue) and MinJobAge=3600, so squeue still shows finished jobs for an hour;
# - starts slurmctld and slurmd in the foreground of their own background processes, records their pids in
#   $STATE_DIR, and waits until `sinfo` shows the node idle and `srun true` runs.
# Environment: FOLDTUNE_SLURM_STATE (default /var/lib/foldtune-slurm), FOLDTUNE_SLURM_CPUS (node CPUs;
# default: nproc; more than the machine has lets more small jobs run at once), FOLDTUNE_SLURM_GPUS (fake GPUs,
# 1-4, default 2: a 2-process DDP job can be scheduled), FOLDTUNE_SLURM_WAIT (seconds, 60).
set -euo pipefail

STATE_DIR=${FOLDTUNE_SLURM_STATE:-/var/lib/foldtune-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARK="# written by foldtune local-cluster.sh"
WAIT=${FOLDTUNE_SLURM_WAIT:-60}
DAEMONS=(munged slurmctld slurmd)

say() { echo "local-cluster: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() {  # alive NAME: the daemon we started is still running
  local pidfile=$STATE_DIR/$1.pid
  [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
    && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are missing and there is no apt-get"
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # --no-install-recommends keeps the install small; the packages' own services are not started in a
  # container without systemd (and would be stopped by `down` only if we started them: we never do).
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null
}

write_if_ours() {  # write_if_ours PATH < content: refuse to replace a file someone else wrote
  local path=$1 tmp
  if [[ -e $path ]] && ! grep -qF "$MARK" "$path"; then
    die "$path exists and was not written by this script; not touching a real cluster's configuration"
  fi
  tmp=$(mktemp "$path.XXXXXX")
  cat >"$tmp"
  chmod 644 "$tmp"
  mv -f "$tmp" "$path"
}

start() {  # start NAME COMMAND...: run a foreground daemon in the background, record its pid
  local name=$1; shift
  if alive "$name"; then say "$name already running (pid $(cat "$STATE_DIR/$name.pid"))"; return 0; fi
  setsid "$@" >>"$STATE_DIR/log/$name.out" 2>&1 </dev/null &
  echo $! >"$STATE_DIR/$name.pid"
}

up() {
  [[ $(id -u) == 0 ]] || die "run as root (it installs packages and starts munged/slurmctld/slurmd)"
  install_packages
  mkdir -p "$STATE_DIR"/{log,ctld,spool} "$CONF_DIR"
  local host cpus mem
  host=$(hostname -s)
  cpus=${FOLDTUNE_SLURM_CPUS:-$(nproc)}
  mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
  local gpus=${FOLDTUNE_SLURM_GPUS:-2} files=(/dev/null /dev/zero /dev/full /dev/urandom) gres_lines="" i
  [[ $gpus =~ ^[1-4]$ ]] || die "FOLDTUNE_SLURM_GPUS=$gpus: expected 1 to 4"
  for (( i = 0; i < gpus; i++ )); do gres_lines+="Name=gpu File=${files[i]}"$'\n'; done

  # munge: a key of our own unless the machine has one; munged runs as its Debian user.
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  start munged setpriv --reuid munge --regid munge --clear-groups munged --foreground

  write_if_ours "$CONF" <<EOF
$MARK (up); removed by \`down\`.
ClusterName=foldtune-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.daemon.pid
SlurmdPidFile=$STATE_DIR/slurmd.daemon.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
# Containers rarely allow cgroups: track job processes by their parent pids, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No accounting database: the profile polls squeue; keep finished jobs visible to it (and to tests) for an hour.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=3600
KillWait=10
# Accept the node's configured CPU count even when it is larger than the machine's (FOLDTUNE_SLURM_CPUS).
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$gpus State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host Default=NO MaxTime=INFINITE State=UP
EOF
  write_if_ours "$CONF_DIR/gres.conf" <<EOF
$MARK (up); removed by \`down\`.
# A GPU-less machine still offers gpu:$gpus (one character device each) so that GPU rules are scheduled.
$gres_lines
EOF

  start slurmctld slurmctld -D -c   # -c: a fresh cluster, no jobs recovered from an earlier `up`
  start slurmd slurmd -D
  local waited=0
  until sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; do
    for name in "${DAEMONS[@]}"; do
      alive "$name" || { tail -n 20 "$STATE_DIR/log/$name.out" "$STATE_DIR"/log/*.log >&2 || true
                         die "$name exited during start-up (logs in $STATE_DIR/log)"; }
    done
    (( waited++ < WAIT )) || die "the node did not come up within ${WAIT}s (logs in $STATE_DIR/log)"
    sleep 1
  done
  timeout 60 srun -N1 -n1 -t 1 true || die "srun does not run a job (logs in $STATE_DIR/log)"
  say "up: node $host, $cpus CPUs, ${mem} MB, gres gpu:$gpus; partitions cpu (default), gpu; state in $STATE_DIR"
}

down() {
  [[ $(id -u) == 0 ]] || die "run as root"
  if alive slurmctld; then
    scancel --quiet --user root 2>/dev/null || true  # our jobs: this cluster is ours
    local n
    for n in $(seq 30); do  # let slurmd end them (SIGTERM, KillWait, SIGKILL) before it stops
      [[ -z $(squeue -h -t RUNNING,COMPLETING,PENDING -o %i 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  local name pid n
  for name in slurmd slurmctld munged; do
    alive "$name" || { rm -f "$STATE_DIR/$name.pid"; continue; }
    pid=$(cat "$STATE_DIR/$name.pid")
    kill -TERM "$pid"
    for n in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then say "$name (pid $pid) ignored SIGTERM: SIGKILL"; kill -KILL "$pid"; fi
    rm -f "$STATE_DIR/$name.pid"
    say "stopped $name (pid $pid)"
  done
  for path in "$CONF" "$CONF_DIR/gres.conf"; do
    if [[ -e $path ]] && grep -qF "$MARK" "$path"; then rm -f "$path"; fi
  done
}

status() {
  local name
  for name in "${DAEMONS[@]}"; do
    if alive "$name"; then echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
  sinfo 2>/dev/null || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
