# shellcheck shell=bash
# What the two throw-away SLURM test clusters share: the one-node cluster on localhost
# (tests/slurm/local_cluster.sh) and the multi-node one in network namespaces
# (tests/multinode/cluster.sh). Source it; it defines functions only.
#
#   slurm_wait_for SECONDS CMD...      until CMD succeeds (1 if it did not within SECONDS)
#   slurm_cluster_dirs DIR             DIR/munge (private), DIR/state, DIR/spool, DIR/log
#   slurm_start_munged DIR [PREFIX...] start munged on a fresh key, socket DIR/munge/munge.sock,
#                                      through PREFIX (a wrapper that execs its command, so that
#                                      MUNGED_PID is munged's own PID)
#   slurm_wait_munged DIR              until its socket is there (1, with its logs, if not in 20 s)
#   slurm_conf_common DIR SLURMD_TIMEOUT  the slurm.conf lines both clusters use, on stdout

slurm_wait_for() {
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

slurm_cluster_dirs() {
    mkdir -p "$1/munge" "$1/state" "$1/spool" "$1/log"
    chmod 700 "$1/munge"
}

slurm_start_munged() {
    local dir=$1; shift
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$dir/munge/munge.key"
    "$@" munged --foreground --force \
        --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.sock" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed" > "$dir/log/munged.out" 2>&1 &
    MUNGED_PID=$!
}

slurm_wait_munged() {
    if ! slurm_wait_for 20 test -S "$1/munge/munge.sock"; then
        echo "munged did not start:" >&2
        cat "$1/log/munged.out" "$1/log/munged.log" >&2 2>/dev/null || true
        return 1
    fi
}

slurm_conf_common() {
    local dir=$1 slurmd_timeout=$2
    cat <<EOF
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$dir/munge/munge.sock,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmctldDebug=info
SlurmdDebug=info
# Plain process tracking: the sandbox has no usable cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Frequent scheduling passes so that a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=2,bf_interval=2
# Jobs may requeue themselves (scontrol requeue), which the preemption path relies on.
JobRequeue=1
# Short timeouts so that a dead task or a killed job is noticed quickly in tests; a node whose
# slurmd stops answering is marked DOWN after SlurmdTimeout.
KillWait=10
MessageTimeout=10
SlurmdTimeout=$slurmd_timeout
InactiveLimit=0
MinJobAge=300
ReturnToService=2
EOF
}
