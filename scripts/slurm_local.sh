#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm` and for trying hydra/launcher=slurm:
#
#   bash scripts/slurm_local.sh start     # install (apt: slurm-wlm + munge, once), write the config, start, wait
#   bash scripts/slurm_local.sh status    # exit 0 when sinfo answers and the node takes jobs
#   bash scripts/slurm_local.sh stop      # stop slurmctld, slurmd and munged (the packages stay installed)
#
# It writes only a slurm.conf it recognises as its own (first line "# Written by outlierlab scripts/slurm_local.sh"):
# an existing one without that line (a real cluster's, on a head node) is refused, naming the file, and nothing is
# started. SLURM_LOCAL_CONF=/path/slurm.conf uses another file (the daemons and sinfo are pointed at it). A daemon
# that does not start is named with the fatal/error lines it logged this time and its log file.
#
# Needs root and Debian/Ubuntu apt. Runs slurmctld and slurmd as root: ProctrackType=proctrack/linuxproc,
# TaskPlugin=task/none (no cgroups needed, so it works in containers), SelectType=select/cons_tres with
# CR_Core_Memory, JobAcctGatherType=jobacct_gather/none and no accounting daemon (sacct does not work). The node
# offers this machine's real core count and most of its memory. Idempotent: `start` when running returns at once.
set -euo pipefail

CONF=${SLURM_LOCAL_CONF:-/etc/slurm/slurm.conf}
CONF_DIR=$(dirname "$CONF")
MARK="# Written by outlierlab scripts/slurm_local.sh"
[[ $CONF == /etc/slurm/slurm.conf ]] || export SLURM_CONF=$CONF  # sinfo, scontrol: the same file
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=${SLURM_LOCAL_LOGS:-/var/log/slurm}
RUN=/run/slurm
NODE=$(hostname -s)

log() { echo "slurm_local: $*" >&2; }

answers() {  # the controller answers and the node is up (idle, mixed or allocated)
  command -v sinfo >/dev/null 2>&1 || return 1
  local state
  state=$(timeout 10 sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -1) || return 1
  [[ $state =~ ^(idle|mix|alloc|comp) ]]
}

install() {
  command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 \
    && return 0
  [[ $(id -u) == 0 ]] || { log "needs root to apt-get install slurm-wlm munge"; exit 1; }
  log "installing slurm-wlm and munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_config() {
  local cpus mem_mb
  cpus=$(nproc --all)
  # Leave a tenth of the memory (at least 1 GiB) to the system; RealMemory above what slurmd sees drains the node.
  mem_mb=$(awk '/MemTotal/ {m = int($2 / 1024); r = int(m / 10); if (r < 1024) r = 1024; print m - r}' /proc/meminfo)
  mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS" "$RUN"
  cat >"$CONF.new" <<EOF
$MARK: a one-node cluster on $NODE, daemons as root, no accounting.
ClusterName=outlierlab
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
DefMemPerCPU=1024
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
  if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
    mv "$CONF.new" "$CONF"
    echo changed
  else
    rm -f "$CONF.new"
  fi
}

running() { pgrep -x "$1" >/dev/null 2>&1; }

ours() { [[ ! -e $CONF ]] || [[ $(head -c ${#MARK} "$CONF") == "$MARK" ]]; }

refuse_foreign_config() {
  ours && return 0
  log "refusing to replace $CONF: this script did not write it (its first line is not '$MARK');" \
    "move it away, or use another file: SLURM_LOCAL_CONF=/path/slurm.conf bash $0 start"
  exit 2
}

log_size() { stat -c %s "$LOGS/$1.log" 2>/dev/null || echo 0; }

say_why_not() {  # NAME OFFSET: say why NAME is not running, from what its log got after byte OFFSET
  local name=$1 offset=$2 logfile=$LOGS/$1.log reason
  reason=$(tail -c +"$((offset + 1))" "$logfile" 2>/dev/null | grep -iE 'fatal|error' | tail -3 | tr '\n' ' ' || true)
  log "$name did not start: ${reason:-it logged no error} (log: $logfile)"
}

start_daemon() {  # NAME: start it unless running; if it exits (before or right after daemonizing), say why
  local name=$1 offset
  running "$name" && return 0
  offset=$(log_size "$name")
  "$name" -f "$CONF" >/dev/null 2>&1 || { say_why_not "$name" "$offset"; exit 1; }
  sleep 1
  running "$name" || { say_why_not "$name" "$offset"; exit 1; }
}

start_munge() {
  if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null; else
      dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  running munged || runuser -u munge -- munged 2>/dev/null || munged --force
}

stop_daemons() {
  local name pid
  for name in slurmctld slurmd; do
    for pid in $(pgrep -x "$name" || true); do kill "$pid" 2>/dev/null || true; done
  done
  for _ in $(seq 50); do running slurmctld || running slurmd || return 0; sleep 0.2; done
  for name in slurmctld slurmd; do
    for pid in $(pgrep -x "$name" || true); do kill -9 "$pid" 2>/dev/null || true; done
  done
}

start() {
  refuse_foreign_config
  if answers && [[ -f $CONF ]]; then
    log "running ($NODE)"; return 0
  fi
  install
  local changed ctld_offset slurmd_offset
  changed=$(write_config)
  [[ -n $changed ]] && stop_daemons
  start_munge
  ctld_offset=$(log_size slurmctld) slurmd_offset=$(log_size slurmd)
  start_daemon slurmctld
  start_daemon slurmd
  for _ in $(seq 60); do
    if answers; then log "running ($NODE: $(sinfo -h -N -o '%c CPUs, %m MB'))"; return 0; fi
    # A daemon that started and then stopped (slurmctld's fatal "CLUSTER NAME MISMATCH" on a state directory left
    # by another cluster configuration) is named with its reason, not waited for.
    running slurmctld || { say_why_not slurmctld "$ctld_offset"; exit 1; }
    running slurmd || { say_why_not slurmd "$slurmd_offset"; exit 1; }
    # A node left down or drained by an earlier run (e.g. its memory changed) is brought back.
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  log "the cluster did not come up; see $LOGS/slurmctld.log and $LOGS/slurmd.log"
  sinfo -N -l >&2 || true
  exit 1
}

stop() {
  stop_daemons
  for pid in $(pgrep -x munged || true); do kill "$pid" 2>/dev/null || true; done
  log "stopped"
}

[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0  # sourced (tests): the functions only

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then sinfo; else log "not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
