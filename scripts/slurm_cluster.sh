#!/usr/bin/env bash
# A real one-node SLURM cluster (Debian 12 slurm-wlm 22.05) for trying and testing the slurm
# profile. Run as root; needs no systemd.
#   scripts/slurm_cluster.sh install   apt-get munge, slurm-client, slurmctld, slurmd (idempotent)
#   scripts/slurm_cluster.sh up        start munged (if none answers), slurmctld and slurmd
#   scripts/slurm_cluster.sh status    daemons started here, and sinfo
#   scripts/slurm_cluster.sh down      scontrol shutdown, then stop the daemons `up` started
# State, logs, pids and slurm.conf live in $MODIFF_SLURM_DIR (default /tmp/modiff-slurm).
# /etc/slurm/slurm.conf must be absent (or a link made here): `up` links it to that slurm.conf,
# since snakemake's jobstep plugin drops SLURM_CONF before the srun inside each job.
# Partition: $MODIFF_SLURM_PARTITION (default main, the slurm profile's default).
set -euo pipefail

DIR=${MODIFF_SLURM_DIR:-/tmp/modiff-slurm}
PARTITION=${MODIFF_SLURM_PARTITION:-main}
WAIT_S=${MODIFF_SLURM_WAIT_S:-60}
PACKAGES=(munge slurm-client slurmctld slurmd)
export SLURM_CONF=$DIR/slurm.conf
ETC_CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

die() { echo "slurm_cluster: $*" >&2; exit 1; }
need_root() { [[ $(id -u) == 0 ]] || die "run as root"; }
alive() { [[ -f $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }
munge_ok() { command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install() {
  need_root
  if [[ $(command -v munged slurmctld slurmd sinfo | wc -l) == 4 ]]; then
    echo "SLURM packages already installed"; return
  fi
  # Debian's postinst scripts would start the daemons: a policy-rc.d exiting 101 forbids that.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  { apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" \
    || { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; }
  } || rc=$?
  ((own_policy)) && rm -f "$policy"
  return $rc
}

write_conf() {
  # The node as slurmd detects it, with RealMemory below the detected amount.
  local node mem
  node=$(slurmd -C | head -1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed -e "s/NodeName=[^ ]*/NodeName=$HOST NodeAddr=127.0.0.1/" \
    -e "s/RealMemory=[0-9]*/RealMemory=$((mem * 9 / 10))/" <<<"$node")
  cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm_cluster.sh: a single-node test cluster.
ClusterName=modiff
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pidfile
SlurmdPidFile=$DIR/slurmd.pidfile
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MailProg=/bin/true
ReturnToService=2
MinJobAge=300
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$node State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {  # start NAME CMD...: a foreground daemon in its own session, its pid in $DIR/NAME.pid
  local name=$1; shift
  setsid "$@" </dev/null >>"$DIR/$name.out" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

munge_up() {
  munge_ok && return  # a munged answers already (not ours: `down` leaves it alone)
  local key=/etc/munge/munge.key
  if [[ ! -s $key ]]; then
    dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge "$key" /run/munge /var/lib/munge /var/log/munge
  chmod 400 "$key"
  chmod 755 /run/munge
  start munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
  for _ in $(seq 50); do munge_ok && return; sleep 0.1; done
  die "munged does not answer (see $DIR/munged.out)"
}

up() {
  need_root
  command -v slurmctld >/dev/null || die "SLURM is not installed: run '$0 install'"
  if alive slurmctld && alive slurmd; then echo "already up"; print_env; return; fi
  [[ ! -e $ETC_CONF || -L $ETC_CONF ]] || die "$ETC_CONF exists: a cluster is configured here"
  local other
  other=$(readlink "$ETC_CONF" || true)
  if [[ -n $other && $other != "$SLURM_CONF" ]] && SLURM_CONF=$other timeout 10 sinfo >/dev/null 2>&1
  then die "a cluster of $other is up; stop it: MODIFF_SLURM_DIR=$(dirname "$other") $0 down"; fi
  mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
  write_conf
  ln -sfn "$SLURM_CONF" "$ETC_CONF"
  munge_up
  alive slurmctld || start slurmctld slurmctld -D -i
  alive slurmd || start slurmd slurmd -D -N "$HOST"
  local deadline=$((SECONDS + WAIT_S))
  until [[ $(sinfo -h -N -o %t 2>/dev/null) == idle ]]; do
    if ((SECONDS > deadline)) || ! alive slurmctld || ! alive slurmd; then
      tail -n 5 "$DIR"/slurmctld.log "$DIR"/slurmd.log "$DIR"/*.out >&2 2>/dev/null || true
      die "node not idle after ${WAIT_S}s (logs in $DIR)"
    fi
    sleep 0.5
  done
  echo "SLURM up in ${SECONDS}s: node $HOST, partition $PARTITION"
  print_env
}

print_env() { echo "slurm.conf: $SLURM_CONF (linked from $ETC_CONF)"; }

down() {
  alive slurmctld && { timeout 10 scontrol shutdown >/dev/null 2>&1 || true; }
  local name pid
  for name in slurmd slurmctld munged; do
    [[ -f $DIR/$name.pid ]] || continue
    pid=$(cat "$DIR/$name.pid")
    # stop only the daemon started here (a recycled pid runs another program)
    if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; kill "$pid" 2>/dev/null; sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$DIR/$name.pid"
  done
  [[ $(readlink "$ETC_CONF") == "$SLURM_CONF" ]] && rm -f "$ETC_CONF"
  echo "SLURM down"
}

status() {
  local name rc=0
  for name in munged slurmctld slurmd; do
    if alive "$name"; then echo "$name: running, pid $(cat "$DIR/$name.pid")"
    else echo "$name: not started here"; [[ $name == munged ]] || rc=1; fi
  done
  [[ -f $SLURM_CONF ]] && timeout 10 sinfo || rc=1
  return $rc
}

case ${1:-} in
  install | up | down | status) "$1" ;;
  *) die "usage: $0 install|up|down|status" ;;
esac
