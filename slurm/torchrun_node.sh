#!/bin/bash
# One SLURM task per node runs this: torchrun starts the node's ranks and rendezvouses with the
# other nodes at MASTER_ADDR:MASTER_PORT (exported by the batch script).
#
# usage: torchrun_node.sh PYTHON PROCS_PER_NODE LOG_DIR PYTHON_ARGS...   (PYTHON_ARGS: -m module overrides...)
#
# Preemption: SLURM delivers USR1 to every process of the step. torchrun itself would die of it
# (it only handles TERM/INT/HUP/QUIT), so it is started with USR1 ignored; the workers inherit
# that, and the trainer installs its own USR1 handler over it. torchrun turns the workers' exit
# code 75 into its own failure code, so when this wrapper saw the signal and torchrun failed, it
# reports the preemption the way slurm/run_rank.sh does: a marker file in LOG_DIR and exit 0
# (a non-zero exit would make `srun --kill-on-bad-exit` kill the other nodes mid-checkpoint).
set -uo pipefail
PYTHON=$1 PROCS_PER_NODE=$2 LOG_DIR=$3
shift 3

trap '' USR1        # inherited by torchrun (and its workers, until they set a handler)
"$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc-per-node="$PROCS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$SLURM_JOB_ID-${SLURM_RESTART_COUNT:-0}" --max-restarts=0 \
    --log-dir="$LOG_DIR/torchrun-node$SLURM_NODEID" --tee=3 \
    "$@" &
CHILD=$!
PREEMPTED=""
trap 'PREEMPTED=1' USR1 TERM   # for this shell only; the torchrun child keeps "ignore"
while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; done
wait "$CHILD"
RC=$?
if ((RC != 0)) && [[ -n $PREEMPTED ]]; then
    touch "$LOG_DIR/preempted.node$SLURM_NODEID"
    exit 0
fi
exit "$RC"
