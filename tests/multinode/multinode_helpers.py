"""Helpers of the multi-node tests (run by tests/multinode/run_multinode_test.sh).

The tests run on the head node of the namespace cluster of tests/multinode/cluster.sh: SLURM_CONF
points at its slurm.conf, MN_CLUSTER_DIR at its state, MN_PREFIX names its nodes
(<prefix>-n1..n3, addresses <subnet>.11..13).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# The SLURM helpers (submit, job_info, wait_for_end, ...) are shared with tests/slurm/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slurm"))

CLUSTER_SCRIPT = Path(__file__).resolve().parent / "cluster.sh"
PREFIX = os.environ.get("MN_PREFIX", "mtpmn")
SUBNET = os.environ.get("MN_SUBNET", "10.213.47")


def node_name(i: int) -> str:
    return f"{PREFIX}-n{i}"


def node_ip(i: int) -> str:
    return f"{SUBNET}.{10 + i}"


def cluster(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run tests/multinode/cluster.sh (exec on a node, link up/down, node-start)."""
    return subprocess.run([str(CLUSTER_SCRIPT), *args], check=True, **kwargs)


def node_pids(i: int) -> list[int]:
    """Every process of node i: all processes in its network namespace."""
    out = subprocess.run(["ip", "netns", "pids", node_name(i)], capture_output=True, text=True, check=True).stdout
    return [int(p) for p in out.split()]

