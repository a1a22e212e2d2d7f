#!/bin/bash
# The two-node SLURM cluster the SLURM integration tests (marker `slurm`) submit real jobs to, on one
# machine: slurmctld in the host's network namespace; compute nodes n1 and n2 each in a network + UTS
# namespace of their own (hostname n1/n2, interface eth0), joined to the host by a bridge. Every node
# sees this machine's filesystem, as nodes of a real cluster see a shared one.
#
#   tests/slurm/cluster.sh up        # as root; installs munge + SLURM from Debian when missing
#   tests/slurm/cluster.sh down      # cancels jobs, stops the daemons, removes namespaces and bridge
#   tests/slurm/cluster.sh status
#
# Why namespaces: srun/sbatch must place ranks on two hosts with their own addresses, so that the
# rendezvous (MASTER_ADDR=n1, gloo over eth0) crosses a real network, like on a cluster.
# Node sizes match what the tests ask for: 1 CPU each, so a 2-rank job spans both nodes.
set -euo pipefail

STATE=${INFOPROMPT_SLURM_DIR:-/var/tmp/infoprompt-slurm}   # slurmctld state, spools, logs, pid files
NET=10.79.0                                                # the bridge is .1, node i is .1i
BRIDGE=ipslurm0
NODES=(n1 n2)

die() { echo "cluster.sh: $*" >&2; exit 1; }
running() { local pid; pid=$(cat "$1" 2>/dev/null) || return 1; [[ -n $pid && -d /proc/$pid ]] &&
  ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null; }
stop_pidfile() {  # TERM the daemon of a pid file, wait up to 10 s for it to go
  running "$1" || { rm -f "$1"; return 0; }
  kill "$(cat "$1")" 2>/dev/null || true
  for _ in $(seq 40); do running "$1" || break; sleep 0.25; done
  rm -f "$1"
}

install_packages() {
  local missing=()
  for cmd in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${cmd%%:*}" >/dev/null || missing+=("${cmd#*:}")
  done
  ((${#missing[@]} == 0)) && return
  echo "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {  # one munge key and daemon for every node (they share this machine's /run/munge socket)
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [[ -s /etc/munge/munge.key ]] || head -c 1024 /dev/urandom > /etc/munge/munge.key
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged
    touch "$STATE/munged.started-here"   # `down` stops only a munged that `up` started
  fi
}

make_network() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || {
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
  }
  local i node
  for i in "${!NODES[@]}"; do
    node=${NODES[i]}
    [[ -e /var/run/netns/ip-$node ]] && continue
    ip netns add "ip-$node"
    ip link add "ipv-$node" type veth peer name eth0 netns "ip-$node"
    ip link set "ipv-$node" master "$BRIDGE" up
    ip -n "ip-$node" addr add "$NET.1$((i + 1))/24" dev eth0
    ip -n "ip-$node" link set eth0 up
    ip -n "ip-$node" link set lo up
  done
  # node names resolve the same everywhere (the namespaces share /etc/hosts)
  for i in "${!NODES[@]}"; do
    grep -qE "^$NET\.1$((i + 1))[[:space:]]+${NODES[i]}\$" /etc/hosts || echo "$NET.1$((i + 1)) ${NODES[i]}" >> /etc/hosts
  done
}

write_config() {
  mkdir -p /etc/slurm "$STATE"/{state,log,spool}
  local nodes=""
  for i in "${!NODES[@]}"; do
    nodes+="NodeName=${NODES[i]} NodeAddr=$NET.1$((i + 1)) CPUs=1 RealMemory=4000 State=UNKNOWN"$'\n'
  done
  # proctrack/linuxproc + task/none: no cgroups needed (containers rarely delegate them);
  # ReturnToService=2: a node that restarts rejoins without an admin `scontrol update`.
  cat > "$STATE/slurm.conf" <<EOF
ClusterName=infoprompt-test
SlurmctldHost=$(hostname)($NET.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
${nodes}PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
  # a different config needs the daemons restarted to take effect
  if ! cmp -s "$STATE/slurm.conf" /etc/slurm/slurm.conf; then
    stop_daemons
    cp "$STATE/slurm.conf" /etc/slurm/slurm.conf
  fi
}

stop_daemons() {
  local node
  for node in "${NODES[@]}"; do stop_pidfile "$STATE/slurmd-$node.pid"; done
  stop_pidfile "$STATE/slurmctld.pid"
}

node_state() { scontrol show node "$1" 2>/dev/null | sed -n 's/.*State=\([A-Z+_]*\).*/\1/p' | head -1; }

up() {
  [[ $(id -u) == 0 ]] || die "needs root (network namespaces, daemons)"
  install_packages
  mkdir -p "$STATE"
  start_munge
  make_network
  write_config
  running "$STATE/slurmctld.pid" || slurmctld
  local node started=()
  for node in "${NODES[@]}"; do
    running "$STATE/slurmd-$node.pid" && continue
    mkdir -p "$STATE/spool/$node"
    # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup fs slurmd probes.
    # Its own UTS namespace so that `hostname` (and SLURMD_NODENAME) is the node's name inside jobs.
    nsenter --net="/var/run/netns/ip-$node" unshare --uts sh -c "hostname $node && exec slurmd -N $node" ||
      die "slurmd of $node did not start (log: $STATE/log/slurmd-$node.log)"
    started+=("$node")
  done
  # ready once every node is IDLE/MIXED/ALLOCATED (not DOWN, DRAIN or not responding: a '*' in sinfo)
  for _ in $(seq 120); do
    local ok=1
    for node in "${NODES[@]}"; do [[ $(node_state "$node") =~ ^(IDLE|MIXED|ALLOCATED)$ ]] || ok=0; done
    sinfo -h -N -o "%N %t" | grep -q '\*' && ok=0
    ((ok)) && { sinfo -N; return 0; }
    sleep 0.5
  done
  sinfo -N || true
  tail -n 5 "$STATE"/log/*.log >&2 || true
  die "nodes ${NODES[*]} did not come up (logs: $STATE/log)"
}

down() {
  # Cancel jobs first: slurmctld saves its state, and a job left RUNNING would hold the nodes after the next up.
  if running "$STATE/slurmctld.pid"; then
    scancel --full --user=root 2>/dev/null || true
    for _ in $(seq 30); do [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break; sleep 0.5; done
  fi
  stop_daemons
  local node pids
  for node in "${NODES[@]}"; do
    [[ -e /var/run/netns/ip-$node ]] || continue
    # left-over job steps inside the node: TERM, then KILL, by pid
    pids=$(ip netns pids "ip-$node")
    if [[ -n $pids ]]; then kill $pids 2>/dev/null || true; sleep 1; pids=$(ip netns pids "ip-$node"); fi
    [[ -z $pids ]] || kill -9 $pids 2>/dev/null || true
    ip netns delete "ip-$node"
  done
  ip link delete "$BRIDGE" 2>/dev/null || true
  if [[ -e $STATE/munged.started-here ]]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$STATE/munged.started-here"
  fi
}

status() {
  local f
  for f in "$STATE/slurmctld.pid" "${NODES[@]/#/$STATE/slurmd-}"; do
    f=${f%.pid}.pid
    if running "$f"; then echo "$(basename "$f" .pid): running"; else echo "$(basename "$f" .pid): stopped"; fi
  done
  ip netns list | grep -E '^ip-' || echo "no node namespaces"
  sinfo -N 2>/dev/null || true
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
