"""End-to-end SLURM tests: real daemons, real sbatch/srun, jobs submitted with mtp-submit.

Run with `make test-slurm` (tests/slurm/run_slurm_test.sh starts a one-node, 2-CPU cluster and
exports SLURM_CONF). The node has 2 CPUs, so jobs run one at a time: 2 ranks x 1 CPU each.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from slurm_helpers import (REPO_ROOT, batch_log, metrics, rank_log, submit, task_pids, wait_for_end,
                           wait_until)

pytestmark = pytest.mark.slurm

TWO_RANKS = ["--ntasks-per-node", "2", "--cpus-per-task", "1", "--time", "10"]


@pytest.fixture(autouse=True)
def _needs_cluster():
    if not os.environ.get("SLURM_CONF"):
        pytest.skip("no test cluster: run `make test-slurm`")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from mtp_pretrain.data.synthetic import write_random_dataset

    path = tmp_path_factory.mktemp("data") / "random"
    write_random_dataset(path, {"train": 200_000, "val": 5_000}, doc_len=64, seed=0)
    return path


def tiny_overrides(dataset, max_steps: int) -> list[str]:
    """The tiny model, 2 DDP ranks on CPU, a few hundred tokens per step: ~0.2 s per step."""
    return ["model=tiny", "parallel=ddp", "logging=quiet", f"data.sources=[{{path:{dataset},weight:1.0}}]",
            "data.seq_len=32", "train.micro_batch_size=2", "checkpoint.interval=5", f"train.max_steps={max_steps}"]


STEPS = 20


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, dataset):
    """An uninterrupted 2-rank run of STEPS steps (srun launcher): its run dir."""
    base_dir = tmp_path_factory.mktemp("baseline") / "run"
    base = submit(*TWO_RANKS, "--job-name", "baseline", "--run-dir", str(base_dir), *tiny_overrides(dataset, STEPS))
    assert wait_for_end(base, 240)["JobState"] == "COMPLETED", batch_log(base_dir, base)
    return base_dir


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(tmp_path, dataset, baseline):
    steps, base_dir, pre_dir = STEPS, baseline, tmp_path / "preempted"
    pre = submit(*TWO_RANKS, "--job-name", "preempt", "--run-dir", str(pre_dir), *tiny_overrides(dataset, steps))

    # Preempt it after its first checkpoint, the way `scancel --signal=USR1 --batch` or a SIGTERM
    # to the batch shell does.
    wait_until(lambda: (pre_dir / "checkpoints" / "latest").exists(), 240, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", pre], check=True)
    info = wait_for_end(pre, 180)
    log = batch_log(pre_dir, pre)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "received SIGUSR1" in log
    assert "preempted (2 of 2 tasks exited 75 after a checkpoint; step exit 0): checkpoint saved; requeueing job" in log
    assert f"job {pre} restart 1] start:" in log and "training finished" in log

    # Saved at step k on the signal, resumed at step k after the requeue.
    saved = re.search(r"checkpoint saved at step (\d+)", rank_log(pre_dir, pre, 0, 0))
    assert saved, rank_log(pre_dir, pre, 0, 0)
    k = int(saved.group(1))
    assert 5 <= k < steps
    resumed = rank_log(pre_dir, pre, 1, 0)
    assert re.search(rf"resumed from .*step-0*{k} at step {k}\b", resumed), resumed
    env = (pre_dir / "slurm" / f"job-{pre}" / "restart-1" / "env.txt").read_text()
    assert "SLURM_RESTART_COUNT=1" in env.splitlines()

    # Same losses, step for step, as the run that was never interrupted.
    base_losses, pre_losses = metrics(base_dir), metrics(pre_dir)
    assert sorted(base_losses) == list(range(1, steps + 1)) and sorted(pre_losses) == list(range(1, steps + 1))
    diffs = {s: (base_losses[s], pre_losses[s]) for s in base_losses if base_losses[s] != pytest.approx(pre_losses[s], rel=1e-6, abs=1e-6)}
    assert not diffs, f"losses differ after resume at step {k}: {diffs}"
    print(f"resumed at step {k}; largest loss difference {max(abs(base_losses[s] - pre_losses[s]) for s in base_losses)}")


def test_dead_rank_fails_fast_and_resubmission_resumes(tmp_path, dataset):
    from mtp_pretrain.checkpoint_reader import find_latest

    run_dir = tmp_path / "run"
    job = submit(*TWO_RANKS, "--job-name", "deadrank", "--run-dir", str(run_dir), *tiny_overrides(dataset, 30))
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 240, "the first checkpoint")
    rank1 = wait_until(lambda: task_pids(job, "python").get(1), 30, "rank 1's trainer process")

    os.kill(rank1, signal.SIGKILL)
    t0 = time.monotonic()
    info = wait_for_end(job, 120)
    elapsed = time.monotonic() - t0
    print(f"job {job} ended {elapsed:.1f}s after rank 1 was killed")
    log = batch_log(run_dir, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert elapsed < 90, f"the job took {elapsed:.0f}s to fail after a rank died"
    assert "training step failed with exit code" in log

    # The next attempt (the same batch script, submitted again) resumes from the last good checkpoint.
    last_good = find_latest(run_dir / "checkpoints")
    assert last_good is not None
    out = subprocess.run(["sbatch", "--parsable", str(run_dir / "slurm" / "train.sbatch")],
                         capture_output=True, text=True, check=True).stdout
    again = out.strip().split(";")[0]
    assert wait_for_end(again, 180)["JobState"] == "COMPLETED", batch_log(run_dir, again)
    assert f"resumed from {last_good} at step" in rank_log(run_dir, again, 0, 0)
    assert max(metrics(run_dir)) == 30


def test_torchrun_launcher_preempts_and_resumes(tmp_path, dataset, baseline):
    """The real trainer under `--launcher torchrun` (one torchrun per node, c10d rendezvous):
    preempted after its first checkpoint, requeued, and the resumed attempt logs the losses of
    an uninterrupted srun run of the same 2 ranks."""
    steps, base_dir, run_dir = STEPS, baseline, tmp_path / "run"
    job = submit(*TWO_RANKS, "--launcher", "torchrun", "--job-name", "torchrun", "--run-dir", str(run_dir),
                 *tiny_overrides(dataset, steps))
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 240, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    info = wait_for_end(job, 180)
    log = batch_log(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, log)
    assert "preempted (1 of 1 tasks exited 75" in log   # one torchrun per node
    node_log = (run_dir / "slurm" / f"job-{job}" / "restart-0" / "node-0.log").read_text()
    saved = re.search(r"checkpoint saved at step (\d+)", node_log)
    assert saved, node_log
    k = int(saved.group(1))
    assert k < steps, "the job finished before the signal"
    resumed = (run_dir / "slurm" / f"job-{job}" / "restart-1" / "node-0.log").read_text()
    assert re.search(rf"resumed from .*step-0*{k} at step {k}\b", resumed), resumed
    base_losses, losses = metrics(base_dir), metrics(run_dir)
    assert sorted(base_losses) == list(range(1, steps + 1)) and sorted(losses) == list(range(1, steps + 1))
    diffs = {s: (base_losses[s], losses[s]) for s in base_losses
             if base_losses[s] != pytest.approx(losses[s], rel=1e-6, abs=1e-6)}
    assert not diffs, f"losses differ after the resume at step {k}: {diffs}"


def test_multirun_sweep_through_the_submitit_launcher(tmp_path, dataset):
    """`mtp-submit --multirun`: one 2-rank job per point, through mtp_pretrain/conf/hydra/launcher/slurm.yaml."""
    sweep_dir = tmp_path / "sweep"
    overrides = [o for o in tiny_overrides(dataset, 3) if not o.startswith("checkpoint.")]
    proc = subprocess.run([sys.executable, "-m", "mtp_pretrain.launch.submit", "--multirun", *TWO_RANKS,
                           "--run-dir", str(sweep_dir), *overrides, "model.n_future=1,2"],
                          capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for point, n_future in [(0, 1), (1, 2)]:
        # Rank 0's output, kept by submitit as .submitit/<array job>_<point>/<...>_0_log.out
        rank0_log = next((sweep_dir / ".submitit").glob(f"*_{point}/*_0_log.out")).read_text()
        assert "world_size=2" in rank0_log and f"n_future={n_future}" in rank0_log, rank0_log
        assert sorted(metrics(sweep_dir / str(point))) == [1, 2, 3]
