#!/usr/bin/env bash
# Start / stop a real single-node SLURM cluster with accounting, for the tests.
#
#   tests/slurm_cluster.sh start DIR   write configs into DIR, start munged, mariadbd, slurmdbd,
#                                      slurmctld, slurmd, wait for an idle node; prints
#                                      "SLURM_CONF=DIR/etc/slurm.conf" on its last line
#   tests/slurm_cluster.sh stop DIR    stop every daemon of DIR by its pidfile, newest first
#
# Everything (configs, state, spool, database, logs, pidfiles) lives under DIR, on free TCP ports,
# so a cluster never touches /etc/slurm or the system's MariaDB, and two clusters (two CI jobs on
# one host) do not collide. munge is the exception: SLURM 22.05 clients only use munge's default
# socket, so a munged already answering there is reused (and then not stopped by this DIR's stop).
# The node has the machine's real CPU count and 80% of its memory. Needs root (slurmd launches jobs as the submitting user) and the Debian packages
# slurm-wlm slurmdbd munge mariadb-server libpmix-dev (scripts/setup.sh --test installs them).
# Daemons are stopped by pidfile, never by name: other clusters may run on the same host.
set -euo pipefail

cmd=${1:-}
DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)   # start order; stop is the reverse

log() { echo "[slurm_cluster] $*" >&2; }

stop() {
  local i name pidfile pid
  for ((i=${#DAEMONS[@]}-1; i>=0; i--)); do
    name=${DAEMONS[$i]}
    pidfile="$DIR/run/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        log "$name ($pid) ignored SIGTERM for 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    fi
    rm -f "$pidfile"
  done
}

free_port() {
  python3 - <<'EOF'
import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  for _ in $(seq 1 $((secs * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "timed out after ${secs}s waiting for $what; logs in $DIR/log:"
  tail -n 20 "$DIR"/log/*.log >&2 || true
  stop
  exit 1
}

start() {
  for b in munged mariadbd mariadb-install-db slurmdbd slurmctld slurmd sacctmgr sinfo; do
    command -v "$b" >/dev/null || { log "missing $b: apt-get install slurm-wlm slurmdbd munge mariadb-server"; exit 3; }
  done
  [ "$(id -u)" = 0 ] || { log "must run as root (slurmd)"; exit 3; }
  trap 'log "start failed: stopping what was started"; stop' ERR
  mkdir -p "$DIR"/{etc,run,log,state,spool,munge,db}
  DIR=$(cd "$DIR" && pwd)
  local host cpus mem_mb ctld_port slurmd_port dbd_port db_port
  host=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS: the node's CPUs, not a thread cap
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
  ctld_port=$(free_port); slurmd_port=$(free_port); dbd_port=$(free_port); db_port=$(free_port)

  # munge: SLURM 22.05 clients ignore AuthInfo=socket, so munge must be on its default socket.
  # Reuse a munged that already answers there (the system's, or another cluster's); else start one
  # (it is then ours, stopped by our pidfile).
  if ! (munge -n </dev/null | unmunge >/dev/null) 2>/dev/null; then
    mkdir -p /run/munge /etc/munge
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; chmod 400 /etc/munge/munge.key; }
    munged --force --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    wait_for 10 munged bash -c "munge -n </dev/null | unmunge"
  fi

  # MariaDB: private datadir, TCP on 127.0.0.1 only, no grant tables (throw-away test database)
  mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --auth-root-authentication-method=normal \
    --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 --port="$db_port" \
    --socket="$DIR/run/mysqld.sock" --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadbd.log" \
    --skip-grant-tables --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  wait_for 30 mariadbd test -S "$DIR/run/mysqld.sock"

  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$dbd_port
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"

  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=spectrolens-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=300
KillWait=5
InactiveLimit=0
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
AccountingStorageEnforce=associations
JobCompType=jobcomp/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  echo "" >"$DIR/etc/cgroup.conf"
  export SLURM_CONF="$DIR/etc/slurm.conf"

  slurmdbd   # reads slurmdbd.conf next to $SLURM_CONF
  wait_for 30 slurmdbd bash -c "test -s '$DIR/run/slurmdbd.pid' && grep -q 'slurmdbd version' '$DIR/log/slurmdbd.log'"
  # register cluster, account and user before slurmctld so associations exist from the start
  wait_for 30 "sacctmgr (cluster)" sacctmgr -i add cluster spectrolens-test
  sacctmgr -i add account tests Description=tests Organization=spectrolens >/dev/null 2>&1 || true
  sacctmgr -i add user root DefaultAccount=tests >/dev/null 2>&1 || true

  slurmctld -f "$DIR/etc/slurm.conf"
  wait_for 30 slurmctld bash -c "sinfo -h >/dev/null"
  slurmd -f "$DIR/etc/slurm.conf"
  wait_for 60 "an idle node" bash -c "sinfo -h -N -o '%t' | grep -qx idle"
  trap - ERR
  log "cluster up in $DIR (node $host, $cpus CPUs, ${mem_mb} MB)"
  echo "SLURM_CONF=$SLURM_CONF"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
