#!/bin/bash
# One rank of the training step under `srun --kill-on-bad-exit=1` (srun launcher).
#
# usage: run_rank.sh MARKER_DIR COMMAND...
#
# The trainer exits with 75 after it checkpointed on a preemption signal. srun counts any
# non-zero exit as a bad one and, with --kill-on-bad-exit, would kill the ranks that have not yet
# exited, so the first rank out could cut the others short and replace their 75 by "Terminated".
# This wrapper turns 75 into exit 0 plus a marker file, <MARKER_DIR>/preempted.rank<N>, from
# which the batch script learns that the step was preempted. Other exit codes pass through, so a
# rank that really fails still brings the whole step down at once.
set -u
MARKER_DIR=$1
shift
EXIT_PREEMPTED=75   # = mtp_pretrain.train.EXIT_PREEMPTED

# SLURM signals every process of the step, this shell included, so this shell must survive
# USR1 and TERM. USR1 is ignored, and the trainer inherits that until it installs its own handler:
# a USR1 that comes while a rank is still starting is lost for that rank instead of killing it,
# and the ranks agree on stopping as soon as one of them has seen the signal. TERM gets a no-op
# trap, so the trainer starts with the default TERM (a cancel during start-up ends it).
trap '' USR1
trap ':' TERM
"$@"
RC=$?
if ((RC == EXIT_PREEMPTED)); then
    touch "$MARKER_DIR/preempted.rank$SLURM_PROCID"
    exit 0
fi
exit "$RC"
