#!/usr/bin/env bash
# `make test-multinode`: the multi-node tests, against a 3-node SLURM cluster of network
# namespaces on this machine (tests/multinode/cluster.sh), with the real trainer.
#
# Needs root and network/UTS namespaces; without them it prints one line saying it skipped and
# why, and exits 0 without running anything (a skip, not a pass). Installs slurm-wlm and munge if
# missing. On exit, success or not, the cluster is torn down by name and PID; the logs of a failed
# run are kept in the temp dir it prints. Extra arguments go to pytest (e.g. -s -k node_dies).
# MN_TESTS selects by marker: default "multinode and not slow" (what CI runs); MN_TESTS=multinode
# adds the slow ones (a node cut off the network).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$PWD/.venv/bin/python}
CLUSTER=$PWD/tests/multinode/cluster.sh
export MN_PREFIX=${MN_PREFIX:-mtpmn}

skip() { echo "test-multinode: SKIPPED, not run: $*" >&2; exit 0; }
[[ $(id -u) == 0 ]] || skip "needs root (network namespaces, slurmd)"
unshare --net --uts true 2>/dev/null || skip "this kernel or container does not allow network/UTS namespaces"
command -v ip >/dev/null && command -v nsenter >/dev/null || skip "needs iproute2 (ip) and util-linux (nsenter)"

# shellcheck source=tests/slurm/install_slurm.sh
source tests/slurm/install_slurm.sh
ensure_slurm

WORK=$(mktemp -d "/tmp/$MN_PREFIX-test.XXXXXX")
finish() {
    local rc=$?
    "$CLUSTER" down "$WORK/cluster" || true
    if ((rc == 0)); then rm -rf "$WORK"; else echo "multi-node tests failed; cluster and job logs in $WORK" >&2; fi
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM   # run the EXIT trap on interruption too

# A cluster left behind by a killed earlier run would block this one.
"$CLUSTER" down 2>/dev/null || true
START=$SECONDS
"$CLUSTER" up "$WORK/cluster" 3
echo "cluster up in $((SECONDS - START))s" >&2
# pytest runs on the head node (where sbatch is run on a real cluster); addopts deselects
# `multinode`, the -m given here replaces it.
MARKERS=${MN_TESTS:-multinode and not slow}
timeout 900 "$CLUSTER" exec head env SLURM_CONF="$WORK/cluster/slurm.conf" MN_CLUSTER_DIR="$WORK/cluster" \
    OMP_NUM_THREADS=1 "$PY" -m pytest -q -m "$MARKERS" -p no:cacheprovider --basetemp "$WORK/pytest" \
    tests/multinode "$@"
echo "multi-node tests passed in $((SECONDS - START))s" >&2
