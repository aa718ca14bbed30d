#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try `msdn ablate --launcher slurm` (and to test it):
# munged, slurmctld and slurmd, with their config, state, spool, sockets and logs in one scratch
# folder, no accounting database (submitit warns that sacct is unavailable, and still works).
#
#   scripts/slurm-local-cluster.sh start    # idempotent; ~10-30 s; prints the line to export
#   scripts/slurm-local-cluster.sh status   # daemons, node state, queue
#   scripts/slurm-local-cluster.sh env      # the export line (eval "$(... env)")
#   scripts/slurm-local-cluster.sh stop     # cancels its jobs, stops only the daemons it started
#
# Needs Debian/Ubuntu's `slurm-wlm` and `munge` (apt-get install slurm-wlm munge) and root (slurmd
# starts the jobs). The system's /etc/slurm and /etc/munge are not touched: the commands find this
# cluster through SLURM_CONF. Settings: MSDN_SLURM_DIR (scratch folder) [/tmp/msdn-slurm],
# MSDN_SLURM_PORT (slurmctld's port; slurmd takes the next one) [the first free pair from 6817, so
# that two such clusters (a CI run beside a user's) can share a machine]. The config, once written,
# is kept: delete the folder for a fresh cluster.
set -euo pipefail

DIR=${MSDN_SLURM_DIR:-/tmp/msdn-slurm}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge/munge.socket.2
HOST=$(hostname -s)
export SLURM_CONF=$CONF

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

free_port_pair() {  # the first N from 6817 (step 2) where N and N+1 are both free
    local port
    for ((port = 6817; port < 6917; port += 2)); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && ! (exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null; then
            echo "$port"; return
        fi
    done
    echo "slurm-local-cluster: no free port pair in 6817-6916; set MSDN_SLURM_PORT" >&2; exit 1
}

write_config() {
    local user memory PORT
    PORT=${MSDN_SLURM_PORT:-$(free_port_pair)}
    user=$(id -un)
    # slurmd refuses a node that has less memory than configured: 90% of what the kernel reports
    memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR"/{state,spool,log}
    cat >"$CONF" <<EOF
# written by scripts/slurm-local-cluster.sh: a one-node cluster for trying and testing the launcher
ClusterName=msdn-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=$user
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    alive "$DIR/munge/munged.pid" && return
    mkdir -p "$DIR/munge"
    chmod 711 "$DIR/munge"  # the socket must be reachable; the key stays 0600
    [[ -f $DIR/munge/munge.key ]] || { dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none;
                                       chmod 600 "$DIR/munge/munge.key"; }
    munged --force --socket="$SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -1; }

start() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || { echo "slurm-local-cluster: slurmctld/munged not installed (apt-get install slurm-wlm munge)" >&2; exit 1; }
    mkdir -p "$DIR/log"
    [[ -f $CONF ]] || write_config
    start_munge
    alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$DIR/slurmd.pid" || slurmd -f "$CONF"
    local deadline=$((SECONDS + 90)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state)
        case $state in idle* | mixed* | allocated*) break ;; esac
        sleep 1
    done
    case $state in
        idle* | mixed* | allocated*) ;;
        down* | drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
        *) echo "slurm-local-cluster: node not up after 90 s (state '${state:-none}'); logs in $DIR/log" >&2; exit 1 ;;
    esac
    echo "slurm-local-cluster: up (node $HOST, $(nproc) CPUs, partition debug) in $DIR"
    echo "export SLURM_CONF=$CONF"
}

status() {
    local name
    for name in munge/munged slurmctld slurmd; do
        if alive "$DIR/$name.pid"; then echo "${name##*/}: running (pid $(cat "$DIR/$name.pid"))"
        else echo "${name##*/}: not running"; fi
    done
    if alive "$DIR/slurmctld.pid"; then
        sinfo -N -o "%N %P %T %c" 2>&1 || true
        squeue -o "%i %j %T %M %R" 2>&1 || true
        echo "export SLURM_CONF=$CONF"
    fi
}

stop() {
    if alive "$DIR/slurmctld.pid"; then  # the jobs of this cluster, so that no job step outlives it
        scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
        local deadline=$((SECONDS + 15))
        while ((SECONDS < deadline)) && [[ -n $(squeue -h -o %i 2>/dev/null) ]]; do sleep 1; done
    fi
    local name pid
    for name in slurmd slurmctld munge/munged; do
        if alive "$DIR/$name.pid"; then
            pid=$(cat "$DIR/$name.pid")
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        fi
        rm -f "$DIR/$name.pid"
    done
    echo "slurm-local-cluster: stopped ($DIR kept; delete it for a fresh cluster)"
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
