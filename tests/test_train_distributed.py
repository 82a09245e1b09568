"""The training job under torchrun (FSDP, gloo on CPU): exact resume of a 2-rank job after
SIGKILL, and a 2-rank checkpoint resumed on 1 and on 4 ranks.

The global batch is fixed (``train.global_batch_tokens=256``: 8 sequences of 32 tokens per step)
so that every world size trains on the same samples per step: 2 ranks accumulate 2
micro-batches of 2, 1 rank 4, 4 ranks 1. Same world size: bitwise equal losses. Another world
size: the same numbers up to reduction order (within 1e-4).

Run these under ``flock /tmp/mtp_heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import json
import os
import signal
import zlib
from pathlib import Path

import pytest

from conftest import (REF_STEPS, assert_same_losses, log_text, read_metrics, run_cli, run_inprocess, start_cli,
                      train_records, wait_for_checkpoint, worker_pids)
from mtp_pretrain.checkpoint_reader import MANIFEST, TRAIN_STATE

pytestmark = pytest.mark.distributed

GLOBAL_BATCH = ["train.micro_batch_size=2", "train.global_batch_tokens=256", f"train.max_steps={REF_STEPS}"]


@pytest.fixture(scope="module")
def fsdp_overrides(train_overrides) -> list[str]:
    return train_overrides + GLOBAL_BATCH + ["parallel=fsdp"]


@pytest.fixture(scope="module")
def fsdp_reference(fsdp_overrides, tmp_path_factory) -> Path:
    """An uninterrupted 2-rank FSDP run of 12 steps with checkpoints at 4, 8, 12."""
    run_dir = tmp_path_factory.mktemp("fsdp_ref") / "run"
    p = run_cli(fsdp_overrides, run_dir, nproc=2)
    assert "world_size=2" in p.stdout and "grad_accum=2" in p.stdout
    assert sorted(train_records(read_metrics(run_dir))) == list(range(1, REF_STEPS + 1))
    Path(f"{run_dir}.log").write_text(p.stdout)  # for log_text
    return run_dir


def test_2_rank_manifest_is_recorded_while_writing(fsdp_reference):
    """Each rank records the files it writes (its shard and RNG state; rank 0 also .metadata) and
    rank 0 gathers them: the 2-rank checkpoint's manifest lists every file with its true size and
    crc32, none of them read back."""
    ckpt = fsdp_reference / "checkpoints" / f"step-{REF_STEPS:08d}"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST, TRAIN_STATE}
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng/rank-00000.pt", "rng/rank-00001.pt"} <= on_disk
    assert set(files) == on_disk
    for name in sorted(on_disk):
        data = (ckpt / name).read_bytes()
        assert files[name] == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
    log = log_text(fsdp_reference)
    assert f"checkpoint step {REF_STEPS} ->" in log and "not seen while writing" not in log


def test_2_ranks_sigkill_then_resume_is_bitwise_identical(fsdp_overrides, fsdp_reference, tmp_path):
    """Both ranks and the agent die by SIGKILL (a lost node) after a checkpoint; the job run
    again resumes from the newest complete checkpoint and logs the reference's exact losses."""
    run_dir = tmp_path / "run"
    agent = start_cli(fsdp_overrides, run_dir, nproc=2)
    try:
        wait_for_checkpoint(run_dir / "checkpoints", 4, agent)
        workers = worker_pids(agent.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        agent.send_signal(signal.SIGKILL)
        agent.wait(timeout=60)
    finally:
        agent.kill()
    assert max(train_records(read_metrics(run_dir))) < REF_STEPS, "the job finished before it was killed"

    p = run_cli(fsdp_overrides, run_dir, nproc=2)
    assert "resumed from" in p.stdout and "saved with world_size=2" in p.stdout
    assert_same_losses(read_metrics(run_dir), read_metrics(fsdp_reference))


def test_2_rank_checkpoint_resumes_on_1_rank(fsdp_reference, train_overrides, tmp_path, capsys):
    """DCP reshards the 2-rank FSDP checkpoint onto one plain process (parallel=none)."""
    ckpt = fsdp_reference / "checkpoints" / "step-00000008"
    code, records = run_inprocess(train_overrides + GLOBAL_BATCH + [f"train.resume={ckpt}"], tmp_path / "run")
    assert code == 0
    out = capsys.readouterr().out
    assert "at step 8 (saved with world_size=2)" in out and "grad_accum=4" in out
    assert_same_losses(records, read_metrics(fsdp_reference), exact=False, tol=1e-4, steps=range(9, REF_STEPS + 1))


def test_2_rank_checkpoint_resumes_on_4_ranks(fsdp_overrides, fsdp_reference, tmp_path):
    ckpt = fsdp_reference / "checkpoints" / "step-00000008"
    p = run_cli(fsdp_overrides + [f"train.resume={ckpt}"], tmp_path / "run", nproc=4)
    assert "at step 8 (saved with world_size=2)" in p.stdout and "world_size=4" in p.stdout
    assert "grad_accum=1" in p.stdout
    records = read_metrics(tmp_path / "run")
    assert_same_losses(records, read_metrics(fsdp_reference), exact=False, tol=1e-4, steps=range(9, REF_STEPS + 1))
    # ... and its own checkpoint, written by 4 ranks: a manifest covering every rank's files, the
    # reference's step-12 weights up to reduction order, and model + optimizer state that continue
    # on 1 rank as the reference's checkpoint does (step 14's loss follows step 13's AdamW update).
    from mtp_pretrain.checkpoint_reader import read_manifest, read_model_config, read_state_dict, verify_checkpoint

    four, ref = tmp_path / "run" / "checkpoints" / "step-00000012", fsdp_reference / "checkpoints" / "step-00000012"
    files = set(read_manifest(four))
    assert {f"rng/rank-{r:05d}.pt" for r in range(4)} | {f"__{r}_0.distcp" for r in range(4)} | {".metadata"} == files
    verify_checkpoint(four, checksums=True)
    got, want = read_state_dict(four, read_model_config(four)), read_state_dict(ref, read_model_config(ref))
    assert got.keys() == want.keys() and any(k.startswith("trunk.") for k in got)
    for k in want:
        assert (got[k] - want[k]).abs().max() <= 1e-4, k
    one_rank = [o for o in fsdp_overrides if o != "parallel=fsdp"] + [f"train.max_steps={REF_STEPS + 2}"]
    code, again = run_inprocess(one_rank + [f"train.resume={four}"], tmp_path / "again")
    assert code == 0
    code, ref_again = run_inprocess(one_rank + [f"train.resume={ref}"], tmp_path / "ref_again")
    assert code == 0
    assert_same_losses(again, ref_again, exact=False, tol=1e-4, steps=[REF_STEPS + 1, REF_STEPS + 2])
