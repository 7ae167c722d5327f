#!/usr/bin/env bash
# Run (as root): tests/slurm/local-cluster.sh start|stop|status|check
#
# A real multi-node SLURM on this one Debian machine: munged, slurmctld and one
# `slurmd -N nodeX` per virtual node, all on 127.0.0.1 (one port per node), so
# `sbatch --nodes=2 --ntasks-per-node=1` gets node[1-2] and srun runs a task on each.
#   start   install Debian's slurmctld slurmd slurm-client munge if missing, write
#           $LOCAL_SLURM_CONF, start the daemons, health-check. Idempotent: ~1 s when
#           already up with the same config; a changed config restarts the daemons.
#           A fresh start wipes the job state, so job ids restart at 1.
#   stop    scancel all jobs, stop the slurmds and slurmctld by PID; munged only if
#           this script started it.
#   status  daemons, sinfo, squeue; exit 1 unless every daemon is up.
#   check   health check: srun on every node + a multi-node sbatch.
# State, spool, logs and pid files: $LOCAL_SLURM_ROOT. Jobs stay visible in
# `scontrol show job` for an hour (no sacct). Adapted from a reference local-SLURM setup (docs/testing.md).
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

LOCAL_SLURM_NODES=${LOCAL_SLURM_NODES:-2}             # virtual nodes node1..nodeN
LOCAL_SLURM_CPUS=${LOCAL_SLURM_CPUS:-4}
LOCAL_SLURM_GPUS=${LOCAL_SLURM_GPUS:-8}               # fake GPUs per node (no real devices)
LOCAL_SLURM_MEM=${LOCAL_SLURM_MEM:-}                  # RealMemory MB per node; empty: RAM/N - 512
LOCAL_SLURM_ROOT=${LOCAL_SLURM_ROOT:-/tmp/local-slurm}
LOCAL_SLURM_CONF=${LOCAL_SLURM_CONF:-/etc/slurm/slurm.conf}  # other paths: clients need SLURM_CONF
LOCAL_SLURM_CTLD_PORT=${LOCAL_SLURM_CTLD_PORT:-6817}
LOCAL_SLURM_NODE_PORT=${LOCAL_SLURM_NODE_PORT:-17001}  # slurmd ports PORT..PORT+N-1

ROOT=$LOCAL_SLURM_ROOT
N=$LOCAL_SLURM_NODES
MUNGE_PIDFILE=/run/munge/munged.pid
MUNGE_MARK=$ROOT/run/munged.started-here
CONF_CHANGED=0
export SLURM_CONF=$LOCAL_SLURM_CONF

log() { printf '[local-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; tail_logs; exit 1; }
tail_logs() {
  local f
  for f in "$ROOT"/log/*.log; do
    if [[ -s $f ]]; then echo "----- tail $f" >&2; tail -n 20 "$f" >&2; fi
  done
}
usage() { echo "usage: $0 start|stop|status|check   (start/stop as root)" >&2; exit 2; }
nodes() { seq -f 'node%g' 1 "$N"; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
# wait_for SECONDS CMD...: run CMD every 0.1 s until it succeeds; 1 on timeout
wait_for() {
  local end=$((SECONDS + $1)); shift
  until "$@"; do ((SECONDS < end)) || return 1; sleep 0.1; done
}

# ---------------------------------------------------------------- processes
pid_of() { if [[ -s $1 ]]; then tr -dc 0-9 <"$1"; fi; }
# is_proc PID COMM: PID is a live (not zombie) process whose comm is COMM, read from
# /proc/PID/stat ("PID (COMM) STATE ..."), so a stale pid file never hits another program
is_proc() {
  local stat
  [[ -n $1 ]] && stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  [[ $stat == "$1 ($2) "[!Z]* ]]
}
none_alive() {  # none_alive COMM PID...
  local comm=$1 p; shift
  for p in "$@"; do if is_proc "$p" "$comm"; then return 1; fi; done
}
stop_pids() {  # stop_pids COMM PID...: SIGTERM the PIDs that are COMM, 10 s later SIGKILL
  local comm=$1 p live=(); shift
  for p in "$@"; do if is_proc "$p" "$comm"; then live+=("$p"); fi; done
  ((${#live[@]})) || return 0
  log "stopping $comm (pid ${live[*]})"
  kill -TERM "${live[@]}" 2>/dev/null || true
  wait_for 10 none_alive "$comm" "${live[@]}" && return 0
  log "$comm ${live[*]} ignored SIGTERM; SIGKILL"
  kill -KILL "${live[@]}" 2>/dev/null || true
}

# ---------------------------------------------------------------- packages
have_pkgs() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
    >>"$ROOT/log/apt.log" 2>&1
}
install_pkgs() {
  have_pkgs && return 0
  local pkgs=(slurmctld slurmd slurm-client munge) policy=/usr/sbin/policy-rc.d added=0 rc=0
  log "installing ${pkgs[*]} (log: $ROOT/log/apt.log)"
  if [[ ! -e $policy ]]; then  # keep the maintainer scripts from starting any daemon
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added=1
  fi
  apt_install "${pkgs[@]}" ||
    { log "apt-get install failed; apt-get update and retry"
      apt-get update -q >>"$ROOT/log/apt.log" 2>&1 && apt_install "${pkgs[@]}"; } || rc=$?
  if ((added)); then rm -f "$policy"; fi
  ((rc == 0)) || die "apt-get install ${pkgs[*]} failed"
}

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
start_munge() {
  munge_ok && return 0  # running already (ours or the system's): reuse it
  log "starting munged"
  install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
  install -d -o munge -g munge -m 0711 /var/lib/munge
  install -d -o munge -g munge -m 0755 /run/munge
  [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged 9>&- || die "munged failed to start"
  touch "$MUNGE_MARK"
  wait_for 5 munge_ok || die "munge -n | unmunge fails"
}
stop_munge() {
  [[ -e $MUNGE_MARK ]] || { log "munged not started by this script: left alone"; return 0; }
  stop_pids munged "$(pid_of "$MUNGE_PIDFILE")"
  rm -f "$MUNGE_MARK"
}

# ---------------------------------------------------------------- slurm.conf
conf_text() {
  local host mem names=node1 ports=$LOCAL_SLURM_NODE_PORT
  host=$(uname -n)
  host=${host%%.*}
  mem=${LOCAL_SLURM_MEM:-$(awk -v n="$N" '/^MemTotal:/ { m = int($2 / 1024 / n) - 512; print (m > 256 ? m : 256) }' /proc/meminfo)}
  if ((N > 1)); then names="node[1-$N]" ports="$ports-$((ports + N - 1))"; fi
  cat <<EOF
# Written by tests/slurm/local-cluster.sh: $N virtual nodes on this host, one slurmd each.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$LOCAL_SLURM_CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credential lifetime (min 5). A requeued job may start again cred_expire + 1 s after
# the requeue (default 120 s); with sched_interval=2 below it restarts after ~12 s.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# batch_sched_delay=0: a job whose dependency is satisfied starts at once (default 3 s);
# sched_interval=2: full scheduling pass every 2 s (default 60), for requeued jobs.
SchedulerParameters=batch_sched_delay=0,sched_interval=2
# Batch jobs may be requeued (scontrol requeue, or by the job itself on a signal).
JobRequeue=1
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No sacct: finished jobs stay in 'scontrol show job' for an hour (default 300 s).
MinJobAge=3600
# SIGTERM -> SIGKILL grace on scancel and time limit (default 30 s).
KillWait=10
ReturnToService=2
# Reject at submit jobs beyond the partition (e.g. -N3 on 2 nodes) instead of PENDING forever.
EnforcePartLimits=ALL
# Trust CPUs/RealMemory below although the slurmds share one smaller machine.
SlurmdParameters=config_overrides
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.%n.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Fake GPUs (gres.conf beside this file names /dev/null-like device files), so job scripts
# written for GPU nodes (--gpus-per-node=8) are accepted unchanged.
GresTypes=gpu
NodeName=$names NodeHostname=$host NodeAddr=127.0.0.1 Port=$ports CPUs=$LOCAL_SLURM_CPUS RealMemory=$mem Gres=gpu:$LOCAL_SLURM_GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}
fake_gpu_devices() {  # slurmd counts GPUs by device file: character devices like /dev/null
  local i
  mkdir -p "$ROOT/dev"
  for ((i = 0; i < LOCAL_SLURM_GPUS; i++)); do
    [[ -c $ROOT/dev/gpu$i ]] || mknod "$ROOT/dev/gpu$i" c 1 3
  done
}
write_conf() {  # sets CONF_CHANGED=1 when the file had to be (re)written
  local tmp
  tmp=$(mktemp)
  conf_text >"$tmp"
  fake_gpu_devices
  echo "Name=gpu File=$ROOT/dev/gpu[0-$((LOCAL_SLURM_GPUS - 1))]" >"$tmp.gres"
  CONF_CHANGED=0
  if ! cmp -s "$tmp.gres" "$(dirname "$LOCAL_SLURM_CONF")/gres.conf"; then
    mkdir -p "$(dirname "$LOCAL_SLURM_CONF")"
    install -m 0644 "$tmp.gres" "$(dirname "$LOCAL_SLURM_CONF")/gres.conf"
    CONF_CHANGED=1
  fi
  rm -f "$tmp.gres"
  if ! cmp -s "$tmp" "$LOCAL_SLURM_CONF"; then
    mkdir -p "$(dirname "$LOCAL_SLURM_CONF")"
    install -m 0644 "$tmp" "$LOCAL_SLURM_CONF"
    log "wrote $LOCAL_SLURM_CONF"
    CONF_CHANGED=1
  fi
  rm -f "$tmp"
}

# ---------------------------------------------------------------- slurm daemons
ctld_pid() { pid_of "$ROOT/run/slurmctld.pid"; }
ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
all_running() {  # slurmctld + exactly the N slurmds of this config
  is_proc "$(ctld_pid)" slurmctld || return 1
  local n pidfiles=("$ROOT"/run/slurmd.*.pid)
  for n in $(nodes); do is_proc "$(pid_of "$ROOT/run/slurmd.$n.pid")" slurmd || return 1; done
  ((${#pidfiles[@]} == N))
}
node_states() { sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }
nodes_up() {  # all N nodes idle/mix/alloc/comp; resumes responding down/drained nodes
  local states
  states=$(node_states) || return 1
  (($(awk '$2 ~ /^(idle|mix|alloc|comp)$/' <<<"$states" | wc -l) == N)) && return 0
  awk '$2 ~ /^(down|drain|drng|fail)$/ { print $1 }' <<<"$states" |
    xargs -r -I{} scontrol update NodeName={} State=RESUME >/dev/null 2>&1 || true
  return 1
}
all_idle() { [[ $(node_states | awk '{ print $2 }' | sort -u) == idle ]]; }
queue_empty() { [[ -z $(squeue -h -o %A 2>/dev/null) ]]; }
cancel_jobs() {
  local jobs=()
  mapfile -t jobs < <(squeue -h -o %A 2>/dev/null)
  ((${#jobs[@]})) || return 0
  log "cancelling jobs ${jobs[*]}"
  scancel "${jobs[@]}" 2>/dev/null || true
  wait_for 20 queue_empty || log "jobs still listed after 20 s: $(squeue -h -o %A | paste -sd' ')"
}
stop_slurm() {
  local f pids=()
  if is_proc "$(ctld_pid)" slurmctld; then cancel_jobs; fi
  for f in "$ROOT"/run/slurmd.*.pid; do [[ -e $f ]] && pids+=("$(pid_of "$f")"); done
  stop_pids slurmd "${pids[@]}"
  stop_pids slurmctld "$(ctld_pid)"
  rm -f "$ROOT"/run/slurmctld.pid "$ROOT"/run/slurmd.*.pid
}
start_slurm() {  # fresh state; the caller stopped any leftovers
  local n
  rm -rf "${ROOT:?}/state" "${ROOT:?}/spool"
  mkdir -p "$ROOT"/{state,spool,log,run}
  log "starting slurmctld"
  slurmctld 9>&- || die "slurmctld failed to start"
  wait_for 10 ctld_up || die "slurmctld does not answer 'scontrol ping'"
  for n in $(nodes); do
    mkdir -p "$ROOT/spool/$n"
    slurmd -N "$n" 9>&- || die "slurmd -N $n failed to start"
  done
  log "started slurmd on $(nodes | paste -sd' ')"
  wait_for 60 nodes_up || { sinfo -N >&2 || true; die "nodes not up after 60 s"; }
}

# ---------------------------------------------------------------- health check
job_state() { scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' || true; }
job_done() { case $(job_state "$1") in '' | PENDING | CONFIGURING | RUNNING | COMPLETING) return 1 ;; esac; }
# shellcheck disable=SC2016  # $SLURM_* expand in the job, not here
health_check() {
  local t0=$EPOCHREALTIME want got dir jid state
  want=$(nodes | sort | paste -sd' ')
  got=$(timeout 60 srun -N "$N" -n "$N" --time=1 bash -c 'echo "$SLURMD_NODENAME"' </dev/null |
        sort -u | paste -sd' ') || die "srun -N $N failed"
  [[ $got == "$want" ]] || die "srun ran on '$got', expected '$want'"
  dir=$(mktemp -d /tmp/local-cluster-check.XXXXXX)
  chmod 755 "$dir"
  # poll scontrol: 'sbatch --wait' polls at 2, 4, 8 s and is slow
  jid=$(sbatch --parsable -N "$N" --ntasks-per-node=1 --time=1 -D "$dir" -o "$dir/%j.out" \
        --wrap 'echo "NNODES=$SLURM_NNODES NODELIST=$SLURM_JOB_NODELIST"') || die "sbatch failed"
  wait_for 60 job_done "$jid" || die "check job $jid not done after 60 s: $(scontrol show job "$jid")"
  state=$(job_state "$jid")
  [[ $state == COMPLETED ]] || die "check job $jid ended $state: $(cat "$dir/$jid.out")"
  grep -q "NNODES=$N " "$dir/$jid.out" || die "check job $jid output: $(cat "$dir/$jid.out")"
  rm -rf "$dir"
  log "health check OK in $(elapsed "$t0") s: srun on $got, $N-node sbatch job $jid"
}

# ---------------------------------------------------------------- verbs
do_start() {
  local t0=$EPOCHREALTIME
  install_pkgs
  start_munge
  write_conf
  if ((CONF_CHANGED == 0)) && all_running; then
    wait_for 30 nodes_up || die "slurm runs but nodes are not up: $(node_states | paste -sd' ')"
    if all_idle; then health_check; else log "nodes busy with jobs: skipping the job check"; fi
  else
    stop_slurm  # leftovers of a partial or differently configured cluster
    start_slurm
    health_check
  fi
  log "cluster up ($N nodes, $LOCAL_SLURM_CPUS CPUs each) in $(elapsed "$t0") s; stop: $0 stop"
}
proc_line() {  # proc_line COMM PIDFILE LABEL
  local p
  p=$(pid_of "$2")
  if is_proc "$p" "$1"; then echo "$3: up (pid $p)"; else echo "$3: DOWN"; return 1; fi
}
status() {
  local rc=0 n
  if munge_ok; then echo "munged: up"; else echo "munged: DOWN"; rc=1; fi
  proc_line slurmctld "$ROOT/run/slurmctld.pid" slurmctld || rc=1
  for n in $(nodes); do proc_line slurmd "$ROOT/run/slurmd.$n.pid" "slurmd $n" || rc=1; done
  if ctld_up; then sinfo; squeue; fi
  return "$rc"
}
lock() {  # one start/stop at a time; daemons are started with 9>&- so they don't hold it
  mkdir -p "$ROOT"/{log,run}
  exec 9>"$ROOT/run/lock"
  flock -w 600 9 || die "another local-cluster.sh holds $ROOT/run/lock"
}

main() {
  (($# == 1)) || usage
  case $1 in
    start | stop)
      [[ $(id -u) == 0 ]] || { echo "$0 $1: must run as root" >&2; exit 1; }
      lock ;;
    status | check) ;;
    *) usage ;;
  esac
  case $1 in
    start) do_start ;;
    stop) stop_slurm; stop_munge; log "stopped" ;;
    status) status ;;
    check) health_check ;;
  esac
}
main "$@"
