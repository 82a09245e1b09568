#!/usr/bin/env bash
# `make test-slurm`: the SLURM integration tests against real daemons on this machine.
#
# Installs Debian's slurm-wlm and munge if missing, starts munged, slurmctld and slurmd on
# localhost (tests/slurm/local_cluster.sh: one node with 2 CPUs, all state in a temp dir), runs
# the pytest tests marked `slurm` in tests/slurm/, and on exit, success or not, stops every daemon
# it started by PID. Needs root (slurmd starts jobs as root here). Logs of a failed run are kept
# in the temp dir it prints.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$PWD/.venv/bin/python}

if [[ $(id -u) != 0 ]]; then
    echo "run_slurm_test.sh: needs root (slurmd, munged)" >&2
    exit 1
fi

# shellcheck source=tests/slurm/install_slurm.sh
source tests/slurm/install_slurm.sh
ensure_slurm

WORK=$(mktemp -d /tmp/mtp-slurm-test.XXXXXX)
# shellcheck source=tests/slurm/local_cluster.sh
source tests/slurm/local_cluster.sh
finish() {
    local rc=$?
    cluster_stop
    if ((rc == 0)); then rm -rf "$WORK"; else echo "slurm test failed; cluster and job logs in $WORK" >&2; fi
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM   # run the EXIT trap on interruption too

START=$SECONDS
cluster_start "$WORK/cluster"
# addopts deselects `slurm`; the -m given here replaces it.
timeout 900 "$PY" -m pytest -q -m slurm -p no:cacheprovider --basetemp "$WORK/pytest" tests/slurm "$@"
echo "slurm tests passed in $((SECONDS - START))s" >&2
