#!/usr/bin/env bash
# A real, single-node Slurm on this machine, for madloop's Slurm test and benchmark (`make slurm`; docs/scale-out.md).
#
#   tools/slurm.sh up      install slurm-wlm and munge with apt-get when missing (needs root), write
#                          /etc/slurm/slurm.conf when there is none (one node: this machine's CPUs and memory, as
#                          `slurmd -C` reports them), start munged, slurmctld and slurmd, wait until a job runs.
#                          Last line: "slurm: started" or "slurm: already up" (then nothing was changed).
#   tools/slurm.sh down    stop the daemons that `up` started (and only those).
#
# A Slurm that already answers (a cluster's login node, a second `up`) is used as it is. A slurm.conf that this
# script did not write is never overwritten: start that Slurm yourself.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by madloop's tools/slurm.sh"
STARTED=/run/madloop-slurm.started   # the daemons `up` started, one name a line: what `down` stops
PARTITION=local

say() { echo "slurm: $*"; }
fail() { echo "slurm: $*" >&2; exit 1; }

answers() { timeout 10 sinfo -h -o %P >/dev/null 2>&1; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out waiting for $what (logs: /var/log/slurm/)"
        sleep 0.5
    done
}

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null && return
    [[ $(id -u) == 0 ]] || fail "slurm-wlm and munge are not installed and this is not root: apt-get install -y slurm-wlm munge"
    command -v apt-get >/dev/null || fail "slurm-wlm and munge are not installed and there is no apt-get here"
    say "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || fail "apt-get update failed"
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null || fail "apt-get install slurm-wlm munge failed"
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        fail "$CONF was not written by madloop and its Slurm does not answer: start that Slurm yourself"
    fi
    local node host
    host=$(hostname -s)
    node=$(slurmd -C | head -1)   # NodeName=<host> CPUs=.. Boards=.. SocketsPerBoard=.. ... RealMemory=..
    [[ $node == NodeName=* ]] || fail "slurmd -C did not describe this node: $node"
    mkdir -p /etc/slurm /var/log/slurm /var/lib/slurm/slurmctld /var/lib/slurm/slurmd
    cat >"$CONF" <<EOF
$MARK: a single-node Slurm for tests and benchmarks.
ClusterName=madloop
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups here (containers, CI): processes are tracked through /proc, resources are not fenced.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
# CPUs and memory are what jobs are packed by (a job's --mem counts against the node's RealMemory).
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1000
GresTypes=gpu
SchedulerType=sched/backfill
ReturnToService=2
# scancel and time limits send SIGTERM, then SIGKILL this many seconds later.
KillWait=10
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=1-00:00:00 State=UP
EOF
    say "wrote $CONF: $node, partition $PARTITION"
}

up() {
    if answers; then
        say "already up"
        return
    fi
    install
    write_conf
    : >"$STARTED"
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /run/munge /var/log/munge /var/lib/munge
        chown munge:munge /run/munge /var/log/munge /var/lib/munge
        [[ -f /etc/munge/munge.key ]] || runuser -u munge -- mungekey --create >/dev/null
        runuser -u munge -- munged
        echo munged >>"$STARTED"
    fi
    wait_for 20 "munged" bash -c "munge -n | unmunge"
    if ! pgrep -x slurmctld >/dev/null; then
        slurmctld -c   # -c: no job state from an earlier start of this test Slurm
        echo slurmctld >>"$STARTED"
    fi
    wait_for 60 "slurmctld" scontrol ping
    if ! pgrep -x slurmd >/dev/null; then
        slurmd
        echo slurmd >>"$STARTED"
    fi
    wait_for 60 "the node to be idle" bash -c "sinfo -h -N -o %t | grep -qx idle"
    wait_for 60 "a job to run" timeout 30 srun -N1 -t 1 hostname
    say "started"
}

down() {
    [[ -f $STARTED ]] || { say "nothing started by tools/slurm.sh up"; return; }
    if grep -qx slurmctld "$STARTED" || grep -qx slurmd "$STARTED"; then
        scancel --user="$(id -un)" >/dev/null 2>&1 || true
        for daemon in slurmd slurmctld; do
            grep -qx $daemon "$STARTED" || continue
            pid=$(cat /run/$daemon.pid 2>/dev/null || pgrep -x $daemon || true)
            [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
        done
        wait_for 30 "slurmd and slurmctld to stop" bash -c "! pgrep -x slurmctld && ! pgrep -x slurmd"
    fi
    if grep -qx munged "$STARTED"; then
        pid=$(cat /run/munge/munged.pid 2>/dev/null || pgrep -x munged || true)
        [[ -n $pid ]] && kill "$pid" 2>/dev/null || true
    fi
    rm -f "$STARTED"
    say "stopped"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
