#!/usr/bin/env bash
# A single-node Slurm (munge, slurmctld, slurmd, two fake GPUs) in a private directory, for
# testing the Slurm profile on this machine. It uses its own ports, key, sockets and state, and
# touches nothing under /etc, so it can run beside a real Slurm or munge.
#
#   tests/slurm/minicluster.sh install        apt-get install Debian's slurm-wlm and munge (root)
#   tests/slurm/minicluster.sh start DIR      start the daemons; prints the environment to use
#   tests/slurm/minicluster.sh stop DIR       stop exactly the daemons that `start DIR` started
#
# Use the cluster with the lines `start` prints (SLURM_CONF and PATH): PATH puts an `srun`
# wrapper first, because Snakemake's jobstep plugin strips every SLURM_* variable (SLURM_CONF
# too) before its nested `srun` (profiles/slurm/README.md, "Jobs inside the job").
set -euo pipefail

die() { echo "minicluster: $*" >&2; exit 1; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
            && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "Slurm is not installed and installing it needs root"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
    local dir
    dir=$(mkdir -p "$1" && cd "$1" && pwd)
    mkdir -p "$dir"/{etc,bin,munge,state,spool,log}
    chmod 700 "$dir/munge"
    # munge: a private key and socket (munged insists on owner-only permissions).
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/seed"

    local ctld_port slurmd_port cpus mem
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
    cat > "$dir/etc/slurm.conf" <<EOF
ClusterName=effllm-ci
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=7200
MailProg=/bin/true
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost MaxTime=INFINITE State=UP
EOF
    # Two fake GPUs: the GRES is scheduled and CUDA_VISIBLE_DEVICES set, but there is no device.
    printf 'NodeName=localhost Name=gpu File=/dev/null\nNodeName=localhost Name=gpu File=/dev/zero\n' \
        > "$dir/etc/gres.conf"
    cat > "$dir/bin/srun" <<EOF
#!/bin/sh
SLURM_CONF=$dir/etc/slurm.conf exec /usr/bin/srun "\$@"
EOF
    chmod +x "$dir/bin/srun"

    export SLURM_CONF="$dir/etc/slurm.conf"
    slurmctld
    slurmd -N localhost
    local i
    for i in $(seq 1 60); do
        if sinfo -h -o '%t' 2>/dev/null | grep -qx idle; then
            echo "export SLURM_CONF=$dir/etc/slurm.conf"
            echo "export PATH=$dir/bin:\$PATH"
            return 0
        fi
        sleep 0.5
    done
    sinfo >&2 || true
    tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
    stop "$dir"
    die "the node did not become idle in 30 s (logs above)"
}

stop() {
    local dir=$1 pidfile pid
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

case "${1:-}" in
    install) install ;;
    start) [ -n "${2:-}" ] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [ -n "${2:-}" ] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
