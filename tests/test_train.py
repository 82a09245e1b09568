"""The training job on one process: metrics, exact resume after SIGTERM / SIGKILL, non-finite
losses, wandb offline, and mtp-plot.

Equality tests compare every logged ``loss`` and ``loss/head_i`` (``logging.interval=1``) of an
interrupted-and-resumed run with those of the uninterrupted ``reference_run`` (conftest.py):
bitwise, as the same process count on CPU is deterministic.
"""

from __future__ import annotations

import math
import signal

import pytest
import torch

from conftest import (N_FUTURE, REF_STEPS, assert_same_losses, latest_step, log_text, loss_keys, read_metrics,
                      run_cli, run_inprocess, start_cli, train_records, wait_for_checkpoint, wandb_history)

TOKENS_PER_STEP = 4 * 32  # train_overrides: micro_batch_size 4 x seq_len 32, one process
TRAIN_KEYS = ["step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_rank", "peak_mem_mb",
              "tokens_seen", "nonfinite_skipped"] + [f"loss/head_{i}" for i in range(1, N_FUTURE + 1)]


# --- metrics -------------------------------------------------------------------------------------
def test_metrics_jsonl_has_every_field(reference_run):
    records = read_metrics(reference_run)
    train = train_records(records)
    assert sorted(train) == list(range(1, REF_STEPS + 1)) and all(len(v) == 1 for v in train.values())
    for step, (r,) in train.items():
        missing = [k for k in TRAIN_KEYS if k not in r]
        assert not missing, f"step {step} lacks {missing}"
        assert r["tokens_seen"] == step * TOKENS_PER_STEP
        assert all(math.isfinite(r[k]) for k in TRAIN_KEYS)
        assert r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 and r["grad_norm"] > 0 and r["lr"] > 0
        assert r["nonfinite_skipped"] == 0
        assert r["loss"] == pytest.approx(sum(r[f"loss/head_{i}"] for i in range(1, N_FUTURE + 1)), rel=1e-9)
        # Random byte ids: every head's cross-entropy is near ln(256) + a little.
        assert all(5.0 < r[f"loss/head_{i}"] < 6.5 for i in range(1, N_FUTURE + 1))
    # Warmup of 2 steps then cosine decay: lr rises, then falls.
    lrs = [train[s][0]["lr"] for s in range(1, REF_STEPS + 1)]
    assert lrs[0] < lrs[1] and all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [4, 8, 12]
    for r in val:
        assert all(5.0 < r[f"val/loss/head_{i}"] < 6.5 for i in range(1, N_FUTURE + 1))
        assert r["val/loss"] == r["val/loss/head_1"]


# --- exact resume ----------------------------------------------------------------------------------
def test_sigterm_checkpoint_exit_75_then_resume_is_bitwise_identical(train_overrides, reference_run, tmp_path, capsys):
    """SIGTERM after the first checkpoint: the job finishes its step, saves, exits 75; rerunning
    it (resume=auto) reproduces the uninterrupted run's losses exactly."""
    run_dir, ov = tmp_path / "run", train_overrides + [f"train.max_steps={REF_STEPS}"]
    proc = start_cli(ov, run_dir)
    try:
        wait_for_checkpoint(run_dir / "checkpoints", 4, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75, log_text(run_dir)
    finally:
        proc.kill()
    stopped_at = latest_step(run_dir / "checkpoints")
    assert 4 <= stopped_at <= REF_STEPS
    assert f"received SIGTERM: checkpoint saved at step {stopped_at}" in log_text(run_dir)
    assert max(train_records(read_metrics(run_dir))) == stopped_at  # it stopped right after saving

    code, records = run_inprocess(ov, run_dir)  # train.resume=auto is the default
    assert code == 0
    assert f"step-{stopped_at:08d} at step {stopped_at}" in capsys.readouterr().out
    assert_same_losses(records, read_metrics(reference_run))


def test_sigkill_after_checkpoint_then_resume_is_bitwise_identical(train_overrides, reference_run, tmp_path, capsys):
    """SIGKILL (no chance to save) after a checkpoint: resume=auto continues from the newest
    complete checkpoint; every step, including those the killed job had already logged again,
    carries the uninterrupted run's losses."""
    run_dir, ov = tmp_path / "run", train_overrides + [f"train.max_steps={REF_STEPS}"]
    proc = start_cli(ov, run_dir)
    try:
        wait_for_checkpoint(run_dir / "checkpoints", 4, proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
    killed_records = read_metrics(run_dir)
    assert max(train_records(killed_records)) < REF_STEPS, "the job finished before it was killed"

    code, records = run_inprocess(ov, run_dir)
    assert code == 0
    out = capsys.readouterr().out
    assert "resumed from" in out
    assert_same_losses(records, read_metrics(reference_run))


# --- non-finite losses -------------------------------------------------------------------------------
def test_nonfinite_steps_are_skipped_and_counted(train_overrides, tmp_path, monkeypatch):
    """Steps whose loss and gradients are NaN are skipped (no optimizer update: the following
    steps stay finite), counted in nonfinite_skipped, and the run completes when they are not
    consecutive beyond train.max_nonfinite_steps."""
    import mtp_pretrain.train as train_mod

    real, calls, poison = train_mod.mtp_loss, [0], {3, 5, 6}  # 1-based steps; grad_accum is 1

    def poisoned(impl, model, tokens, **kw):
        calls[0] += 1
        out = real(impl, model, tokens, **kw)
        if calls[0] in poison:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            out.per_head = [torch.full_like(x, float("nan")) for x in out.per_head]
        return out

    monkeypatch.setattr(train_mod, "mtp_loss", poisoned)
    code, records = run_inprocess(train_overrides + ["train.max_steps=9", "train.max_nonfinite_steps=3",
                                                     "checkpoint.interval=0"], tmp_path / "run")
    assert code == 0
    train = {s: v[0] for s, v in train_records(records).items()}
    assert sorted(train) == list(range(1, 10))
    for s, r in train.items():
        assert math.isnan(r["loss"]) == (s in poison), f"step {s}: loss {r['loss']}"
        # Had a NaN gradient reached AdamW, its moments and every later loss would be NaN.
        assert math.isfinite(r["grad_norm"]) or s in poison
        assert r["nonfinite_skipped"] == sum(1 for p in poison if p <= s)
        assert math.isfinite(r["lr"])
    assert all(math.isfinite(train[s]["loss"]) for s in (7, 8, 9))


def test_nonfinite_losses_in_a_row_stop_with_a_clear_error(train_overrides, tmp_path):
    """A real divergence (lr 1e30): skipped steps are logged, then the run stops after
    train.max_nonfinite_steps in a row with NonFiniteLossError naming the setting."""
    from mtp_pretrain.train import NonFiniteLossError

    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row .*train.max_nonfinite_steps=3"):
        run_inprocess(train_overrides + ["optim.lr=1e30", "optim.warmup_steps=0", "train.max_steps=20",
                                         "train.max_nonfinite_steps=3"], run_dir)
    train = {s: v[0] for s, v in train_records(read_metrics(run_dir)).items()}
    bad = [s for s, r in train.items() if not math.isfinite(r["loss"])]
    assert len(bad) == 2 and bad == list(range(bad[0], bad[0] + 2))  # the 3rd raises before logging
    assert [train[s]["nonfinite_skipped"] for s in bad] == [1, 2]
    assert max(train) < 20


def test_cli_exits_3_on_nonfinite_losses(train_overrides, tmp_path):
    p = run_cli(train_overrides + ["optim.lr=1e30", "optim.warmup_steps=0", "train.max_steps=20",
                                   "train.max_nonfinite_steps=2"], tmp_path / "run", check=False)
    assert p.returncode == 3, p.stdout[-3000:]
    assert "[mtp] error: 2 non-finite losses in a row" in p.stdout
    assert "lower optim.lr" in p.stdout


# --- wandb -------------------------------------------------------------------------------------------
def test_wandb_offline_run_holds_the_logged_metrics(train_overrides, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    run_dir = tmp_path / "run"
    code, records = run_inprocess(train_overrides + ["train.max_steps=4", "logging.wandb.mode=offline",
                                                     "logging.wandb.project=mtp_test"], run_dir)
    assert code == 0
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].is_dir()
    assert list(runs[0].glob("run-*.wandb")), f"no transaction log in {runs[0]}"

    history = wandb_history(run_dir)
    train_rows = {row["step"]: row for row in history if "loss" in row}
    val_rows = [row for row in history if "val/loss" in row]
    assert sorted(train_rows) == [1, 2, 3, 4]
    for step, (rec,) in train_records(records).items():
        row = train_rows[step]
        for k in TRAIN_KEYS:
            assert k in row, f"wandb step {step} lacks {k}"
        for k in loss_keys() + ["lr", "grad_norm", "tokens_seen"]:
            assert row[k] == pytest.approx(rec[k], rel=1e-12), f"wandb step {step} {k}"
    assert [r["step"] for r in val_rows] == [4] and "val/loss/head_4" in val_rows[0]
    # The run id is stored in the checkpoint so that a resumed job logs into the same wandb run.
    import json

    state = json.loads((run_dir / "checkpoints" / "step-00000004" / "train_state.json").read_text())
    assert runs[0].name.endswith(state["wandb_run_id"])


# --- mtp-plot ----------------------------------------------------------------------------------------
def test_mtp_plot_renders_a_png(reference_run, tmp_path):
    from mtp_pretrain.plot import main, step_records

    out = tmp_path / "curves.png"
    main([str(reference_run), "-o", str(out), "--smooth", "2"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    train, val = step_records(reference_run)
    assert len(train) == REF_STEPS and [r["step"] for r in val] == [4, 8, 12]


def test_mtp_plot_default_output_and_console_script(reference_run, tmp_path):
    import shutil
    from importlib.metadata import entry_points

    assert any(ep.value == "mtp_pretrain.plot:main" for ep in entry_points(group="console_scripts", name="mtp-plot"))
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(reference_run / "metrics.jsonl", run / "metrics.jsonl")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "loss": 1')  # a line cut short by a killed job is skipped
    from mtp_pretrain.plot import main

    main([str(run)])
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileNotFoundError):
        main([str(tmp_path / "nothing")])
