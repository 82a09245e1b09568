"""The real trainer across the nodes of the namespace cluster (tests/multinode/cluster.sh).

Run with `make test-multinode`. Every job trains the tiny n=4 model on a fixed global batch of 12
sequences of 32 tokens (train.global_batch_tokens=384, micro-batches of 1 sequence), so that any
number of ranks trains on the same samples per step: 4 ranks on 2 nodes accumulate 3
micro-batches, 1 process 12. The learning rate is constant after 2 warm-up steps, so a run's
losses up to step s do not depend on train.max_steps, and one single-process reference run serves
every test: each compares its logged losses, every attempt of every step, with the reference's
(within 1e-4: another world size sums in another order). Equal losses mean the same weights and
the same data, step for step: a resume that repeated or skipped a sample would show.

Timings (node failure detection, requeue to first step) are printed; run pytest with -s to see them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_losses, read_metrics, run_inprocess, tiny_overrides, train_records
from multinode_helpers import CLUSTER_SCRIPT, PREFIX, cluster, node_ip, node_name, node_pids
from slurm_helpers import batch_log, job_info, rank_log, submit, wait_for_end, wait_until

pytestmark = pytest.mark.multinode

REF_STEPS = 16
TWO_NODES = ["--nodes", "2", "--ntasks-per-node", "2", "--cpus-per-task", "1", "--time", "10"]
GLOBAL_BATCH = ["train.micro_batch_size=1", "train.global_batch_tokens=384", "optim.schedule=constant",
                "checkpoint.interval=4", "logging.val_interval=0"]


@pytest.fixture(autouse=True)
def _needs_cluster():
    if not os.environ.get("MN_CLUSTER_DIR"):
        pytest.skip("no multi-node test cluster: run `make test-multinode`")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[Path]:
    from mtp_pretrain.data.synthetic import write_random_dataset

    root = tmp_path_factory.mktemp("data")
    for i, name in enumerate(("a", "b")):
        write_random_dataset(root / name, {"train": 60_000, "val": 8_000}, doc_len=300, seed=10 + i)
    return [root / "a", root / "b"]


@pytest.fixture(scope="module")
def overrides(dataset) -> list[str]:
    """The trainer's overrides, one process (the jobs add parallel=fsdp)."""
    return tiny_overrides(dataset) + GLOBAL_BATCH


class Reference:
    """One process accumulating the whole global batch; extended on demand (resumed from its own
    last checkpoint) when a test needs more steps."""

    def __init__(self, overrides: list[str], run_dir: Path):
        self.overrides, self.run_dir, self.steps = overrides, run_dir, 0

    def records(self, steps: int) -> list[dict]:
        if steps > self.steps:
            code, _ = run_inprocess(self.overrides + [f"train.max_steps={steps}"], self.run_dir)
            assert code == 0
            self.steps = steps
        records = read_metrics(self.run_dir)
        assert sorted(train_records(records)) == list(range(1, self.steps + 1))
        return records


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory) -> Reference:
    return Reference(overrides, tmp_path_factory.mktemp("reference") / "run")


def fsdp(overrides: list[str], steps: int) -> list[str]:
    return overrides + ["parallel=fsdp", "parallel.timeout_s=60", f"train.max_steps={steps}"]


def assert_losses_match(run_dir: Path, reference: Reference, steps) -> None:
    steps = list(steps)
    assert_same_losses(read_metrics(run_dir), reference.records(max(steps)), exact=False, tol=1e-4, steps=steps)


def watch_requeue(run_dir: Path, job: str, first_log: str = "rank-0.log", marker: str = "requeueing job",
                  timeout: float = 240) -> float:
    """Seconds from `marker` in the batch log (the batch script requeueing the job) to the
    requeued attempt's first training step (in `first_log`: rank 0's log, or node 0's under the
    torchrun launcher), polled as they happen."""
    batch = run_dir / "slurm" / f"job-{job}.out"   # appears when the job starts
    wait_until(lambda: batch.is_file() and marker in batch.read_text(), timeout, f"'{marker}' in job {job}'s log")
    seen = time.monotonic()
    log = run_dir / "slurm" / f"job-{job}" / "restart-1" / first_log
    wait_until(lambda: log.is_file() and re.search(r"^(\[default0\]:)?step +\d+/", log.read_text(), re.M),
               timeout, "the requeued attempt's first step", poll=0.2)
    return time.monotonic() - seen


# --- 2 nodes, srun and torchrun -----------------------------------------------------------------

@pytest.fixture(scope="module")
def fsdp_2_nodes(tmp_path_factory, overrides) -> tuple[Path, str, dict]:
    """mtp-submit --nodes 2 --ntasks-per-node 2: 4 ranks, 2 per node, 8 steps; (run dir, job, final info)."""
    run_dir = tmp_path_factory.mktemp("fsdp_2_nodes") / "run"
    job = submit(*TWO_NODES, "--job-name", "fsdp2n", "--run-dir", str(run_dir), *fsdp(overrides, 8))
    return run_dir, job, wait_for_end(job, 240)


def test_srun_fsdp_on_2_nodes_matches_one_process(fsdp_2_nodes, reference):
    """The 4 ranks meet at the first node of the allocation (not localhost) and train exactly as
    one process accumulating the same global batch."""
    run_dir, job, info = fsdp_2_nodes
    log = batch_log(run_dir, job)
    assert info["JobState"] == "COMPLETED", (info, log)
    assert info["NodeList"] == f"{PREFIX}-n[1-2]", info
    assert f"rendezvous {node_name(1)}:" in log, log
    rank0 = rank_log(run_dir, job, 0, 0)
    assert "world_size=4" in rank0 and "grad_accum=3" in rank0, rank0
    assert_losses_match(run_dir, reference, range(1, 9))


def test_2_node_checkpoint_resumes_on_1_and_on_3_nodes(fsdp_2_nodes, tmp_path, overrides, reference):
    """DCP reshards the 4-rank checkpoint onto 2 ranks on 1 node and 3 ranks on 3 nodes; the data
    stream continues at the same global sample (its state is in global sample indices)."""
    ckpt = fsdp_2_nodes[0] / "checkpoints" / "step-00000004"
    assert ckpt.is_dir(), "the 2-node run left no step-4 checkpoint"
    layouts = {"1node": ["--nodes", "1", "--ntasks-per-node", "2"], "3nodes": ["--nodes", "3", "--ntasks-per-node", "1"]}
    jobs = {name: submit(*layout, "--cpus-per-task", "1", "--time", "10", "--job-name", name,
                         "--run-dir", str(tmp_path / name), *fsdp(overrides, 8), f"train.resume={ckpt}")
            for name, layout in layouts.items()}   # both fit on the 3 nodes at once
    for name, job in jobs.items():
        run_dir = tmp_path / name
        info = wait_for_end(job, 240)
        assert info["JobState"] == "COMPLETED", (info, batch_log(run_dir, job))
        rank0 = rank_log(run_dir, job, 0, 0)
        assert f"resumed from {ckpt} at step 4 (saved with world_size=4)" in rank0, rank0
        world = 2 if name == "1node" else 3
        assert f"world_size={world}" in rank0 and f"grad_accum={12 // world}" in rank0, rank0
        assert_losses_match(run_dir, reference, range(5, 9))
    assert job_info(jobs["3nodes"])["NodeList"] == f"{PREFIX}-n[1-3]"


def test_every_sample_of_an_epoch_is_read_once_across_2_nodes(tmp_path, dataset):
    """4 ranks on 2 nodes (srun) each record the windows the data pipeline gave them for one epoch
    of one source; together they read exactly the windows one process reads, none twice, and
    that is every window but a tail shorter than one global block."""
    from mtp_pretrain.data.stream import ArrowTokenStream, DataSource

    out, micro = tmp_path / "records", 4
    proc = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=2", "--time=5", sys.executable,
                           str(REPO / "tests" / "multinode" / "read_epoch.py"), str(out), str(micro), str(dataset[0])],
                          capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(4)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(r, 4) for r in range(4)]
    assert {(r["host"], r["node_id"]) for r in ranks} == {(node_name(1), 0), (node_name(2), 1)}
    read = [row for r in ranks for row in r["rows"]]

    one = ArrowTokenStream([DataSource(path=dataset[0], weight=1.0)], window=36, micro_batch_size=micro * 4,
                           seed=7, prefetch=0, infinite=False)
    expected = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for batch in one for row in batch]
    total_windows = sum(ds.num_windows for ds in one.datasets)
    assert total_windows - micro * 4 < len(expected) <= total_windows, (len(expected), total_windows)
    assert len(set(expected)) == len(expected), "windows are not unique: the comparison would be blind"
    assert len(read) == len(set(read)), f"{len(read) - len(set(read))} windows read twice"
    assert set(read) == set(expected), (f"{len(set(expected) - set(read))} windows never read, "
                                        f"{len(set(read) - set(expected))} read that one process does not")
    print(f"epoch of {len(read)} windows ({total_windows} in the data) read once each by 4 ranks on 2 nodes")


# --- preemption from SLURM ------------------------------------------------------------------------

def test_time_limit_signal_checkpoints_requeues_and_resumes_under_the_torchrun_launcher(tmp_path, overrides, reference):
    """One torchrun per node (c10d rendezvous at the first node), `--time 2 --signal-seconds 60`:
    slurmd sends USR1 to the job step on both nodes when at most 60 s are left (slurmctld checks
    every 30 s: 60-90 s into the job, after the ranks started). Attempt 0 checkpoints and
    requeues; attempt 1 resumes, and at its first step `scancel --signal=USR1` (slurmd signals
    the step again) stops it at the restart limit with exit code 75 instead of waiting for its
    own time limit. The losses of both attempts are the uninterrupted reference's."""
    run_dir = tmp_path / "run"
    job = submit("--nodes", "2", "--ntasks-per-node", "2", "--time", "2", "--signal-seconds", "60",
                 "--max-restarts", "1", "--launcher", "torchrun", "--job-name", "timelimit",
                 "--run-dir", str(run_dir), *fsdp(overrides, 100_000))
    requeue_to_step = watch_requeue(run_dir, job, "node-0.log")
    attempt = run_dir / "slurm" / f"job-{job}"
    saved = re.search(r"checkpoint saved at step (\d+)", (attempt / "restart-0" / "node-0.log").read_text())
    assert saved, (attempt / "restart-0" / "node-0.log").read_text()
    k = int(saved.group(1))
    # At the requeued attempt's first step; its own time-limit USR1 may come about as soon.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    info = wait_for_end(job, 180)
    log = batch_log(run_dir, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0" and info["Restarts"] == "1", (info, log)
    assert "received SIGUSR1" not in log   # slurmd signalled the job step, not the batch shell
    # One torchrun per node: both nodes' ranks checkpointed and exited 75, each time.
    assert "preempted (2 of 2 tasks exited 75 after a checkpoint; step exit 0): checkpoint saved; requeueing" in log
    assert "preempted (2 of 2 tasks exited 75 after a checkpoint; step exit 0), but restart count 1 reached the maximum 1: not requeueing" in log, log
    node0 = (attempt / "restart-1" / "node-0.log").read_text()
    assert re.search(rf"resumed from .*step-0*{k} at step {k}\b", node0), node0
    again = re.search(r"checkpoint saved at step (\d+)", node0)
    assert again and int(again.group(1)) > k, node0
    last = int(again.group(1))
    assert max(train_records(read_metrics(run_dir))) == last
    assert_losses_match(run_dir, reference, range(1, last + 1))
    print(f"time limit (torchrun launcher): USR1 -> checkpoint at step {k}; requeue to first step "
          f"{requeue_to_step:.1f}s; second attempt stopped by scancel --signal=USR1 at step {last}; "
          f"losses equal the reference")


# --- a node dies ----------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["killed", pytest.param("cut_off", marks=pytest.mark.slow)])
def test_node_dies_the_step_fails_fast_and_the_requeued_job_resumes(how, tmp_path, overrides, reference):
    """Node 2 dies after a checkpoint. `killed`: every process of it (slurmd, slurmstepd, its 2
    ranks) gets SIGKILL, as when a machine loses power; the ranks on node 1 see their peers'
    sockets reset and fail at once. `cut_off`: its link to the bridge goes down, so every socket
    to it stays half-open and nobody on it is told. Either way slurmctld declares node 2 dead
    after SlurmdTimeout (30 s) and ends the step (no 10-minute collective timeout), and since the
    job is requeueable SLURM requeues it onto the nodes left (1 and 3), where it resumes from the
    last checkpoint, which the failure left intact."""
    run_dir = tmp_path / "run"
    job = submit(*TWO_NODES, "--job-name", "nodedies", "--run-dir", str(run_dir), *fsdp(overrides, REF_STEPS))
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 240, "the first checkpoint")
    if how == "killed":
        victims = node_pids(2)
        assert len(victims) >= 4, victims   # slurmd, slurmstepd, 2 ranks (and their wrappers)
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
    else:
        cluster("link", "down", "2")
    gone = time.monotonic()
    saved_before = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])

    rank0 = run_dir / "slurm" / f"job-{job}" / "restart-0" / "rank-0.log"
    if how == "killed":
        # gloo reports a killed peer as "reset" or "closed", depending on which side's socket
        # call sees the dead connection first (both seen in CI runs)
        wait_until(lambda: re.search(r"Connection (reset|closed) by peer", rank0.read_text()), 60,
                   "rank 0 to see node 2 go", poll=0.1)
        ranks_failed = f"the ranks on node 1 failed after {time.monotonic() - gone:.1f}s, "
    else:
        ranks_failed = ""
    # slurmstepd's line in the batch log when slurmctld has declared the node dead and ends the job.
    failed_to_step = watch_requeue(run_dir, job, marker="DUE TO NODE FAILURE")
    step_failed = time.monotonic() - gone - failed_to_step
    if how == "cut_off":
        cluster("link", "up", "2")   # its slurmd registers again; SLURM ends the job's leftovers there
    info = wait_for_end(job, 300)
    log = batch_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert info["NodeList"] == f"{PREFIX}-n[1,3]", info   # node 2 was DOWN
    assert step_failed < 60, f"the training step took {step_failed:.0f}s to end after node 2 died"
    resumed = re.search(r"resumed from (\S+) at step (\d+)", rank_log(run_dir, job, 1, 0))
    assert resumed and int(resumed.group(2)) >= saved_before, rank_log(run_dir, job, 1, 0)
    assert f"checkpoint step {resumed.group(2)} -> {resumed.group(1)}" in rank0.read_text()   # attempt 0's
    assert_losses_match(run_dir, reference, range(1, REF_STEPS + 1))
    print(f"node 2 {how}: {ranks_failed}the step ended after {step_failed:.1f}s; SLURM requeued the job "
          f"onto nodes 1 and 3, whose first step came {failed_to_step:.1f}s after that; resumed at step "
          f"{resumed.group(2)}")

    if how == "killed":   # the node comes back: its slurmd restarts and it returns to service
        cluster("node-start", os.environ["MN_CLUSTER_DIR"], "2")


# --- torchrun across namespaces, no SLURM -----------------------------------------------------------

def test_torchrun_nnodes_2_c10d_without_slurm(tmp_path, overrides, reference):
    """`torchrun --nnodes=2 --rdzv-backend=c10d --rdzv-endpoint=<node 1>` started by hand on nodes 1
    and 2, as `make train` would be on two machines."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # MN_EXEC: cluster.sh execs down to torchrun, so that killing the Popen kills torchrun.
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MN_EXEC="exec")
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint={node_ip(1)}:29400", "--rdzv-id=mn-torchrun", "--max-restarts=0",
           "-m", "mtp_pretrain.train", *fsdp(overrides, 8), f"hydra.run.dir={run_dir}"]
    logs = [open(tmp_path / f"node{i}.log", "w") for i in (1, 2)]
    procs = [subprocess.Popen([str(CLUSTER_SCRIPT), "exec", f"n{i}", *cmd], cwd=REPO, env=env,
                              stdout=logs[i - 1], stderr=subprocess.STDOUT) for i in (1, 2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    out = (tmp_path / "node1.log").read_text()
    assert codes == [0, 0], out[-3000:] + (tmp_path / "node2.log").read_text()[-3000:]
    assert "world_size=2" in out and "grad_accum=6" in out, out
    assert_losses_match(run_dir, reference, range(1, 9))
