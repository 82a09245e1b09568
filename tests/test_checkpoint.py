"""Checkpoints: completeness rules, resume=auto past half-written saves, pruning, export ->
load_model, and init_from with another n_future."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REF_STEPS, read_metrics, run_inprocess, train_records
from mtp_pretrain.checkpoint_reader import TRAIN_STATE, find_latest, is_complete


def fake_checkpoint(root: Path, name: str, metadata: bool = True, train_state: bool = True) -> Path:
    p = root / name
    p.mkdir(parents=True)
    if metadata:
        (p / ".metadata").write_bytes(b"x")
    if train_state:
        (p / TRAIN_STATE).write_text("{}")
    return p


# --- which checkpoint counts ---------------------------------------------------------------------
def test_find_latest_skips_incomplete_and_temporary(tmp_path):
    root = tmp_path / "ckpt"
    assert find_latest(root) is None  # no directory at all
    root.mkdir()
    assert find_latest(root) is None
    good = fake_checkpoint(root, "step-00000004")
    fake_checkpoint(root, "step-00000002")
    fake_checkpoint(root, "step-00000008", train_state=False)  # crashed between shards and train_state
    fake_checkpoint(root, "step-00000012", metadata=False)  # shards never finished
    fake_checkpoint(root, ".tmp-step-00000016")  # a save in progress, complete or not: never read
    fake_checkpoint(root, "step-0000001x")  # not a step folder
    assert not is_complete(root / "step-00000008") and not is_complete(root / "step-00000012")
    assert find_latest(root) == good  # no pointer: the highest complete step
    (root / "latest").write_text("step-00000012\n")  # pointer to an incomplete one: ignored
    assert find_latest(root) == good
    (root / "latest").write_text("step-00000099")  # pointer to nothing: ignored
    assert find_latest(root) == good
    (root / "latest").write_text("step-00000002")  # pointer to a complete one wins (newest published)
    assert find_latest(root) == root / "step-00000002"


def test_resume_auto_ignores_half_written_checkpoints(reference_run, tmp_path, train_overrides, capsys):
    """A crash mid-save leaves a .tmp-step-N folder, or a step-N without train_state.json / without
    .metadata, and maybe a pointer to it: resume=auto takes the previous good checkpoint, redoes
    the steps after it with the uninterrupted run's exact losses, and the next save cleans up."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    root = run_dir / "checkpoints"
    (root / "step-00000012" / TRAIN_STATE).unlink()  # train_state.json is written last: never reached
    shutil.copytree(root / "step-00000008", root / ".tmp-step-00000016")  # a complete-looking temp folder
    shutil.copytree(root / "step-00000008", root / "step-00000020")
    (root / "step-00000020" / ".metadata").unlink()  # shards of a save that never finished
    (root / "latest").write_text("step-00000012")
    assert find_latest(root) == root / "step-00000008"

    code, records = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}"], run_dir)
    assert code == 0
    assert f"resumed from {root / 'step-00000008'} at step 8" in capsys.readouterr().out
    ref = train_records(read_metrics(reference_run))
    got = train_records(records)
    for step in range(9, REF_STEPS + 1):
        assert len(got[step]) == 2  # the reference's copy, then the redo
        for k in ["loss"] + [f"loss/head_{i}" for i in range(1, 5)]:
            assert got[step][1][k] == ref[step][0][k], f"step {step} {k}"
    assert is_complete(root / "step-00000012") and (root / "latest").read_text() == "step-00000012"
    assert not list(root.glob(".tmp-step-*"))  # debris of crashed saves removed after a good save
    state = json.loads((root / "step-00000012" / TRAIN_STATE).read_text())
    assert state["step"] == REF_STEPS and state["tokens_seen"] == REF_STEPS * 128 and state["world_size"] == 1


def test_keep_prunes_to_the_newest_k(train_overrides, tmp_path):
    run_dir = tmp_path / "run"
    code, _ = run_inprocess(train_overrides + ["train.max_steps=6", "checkpoint.interval=2", "checkpoint.keep=2",
                                               "logging.val_interval=0"], run_dir)
    assert code == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step-00000004", "step-00000006"]


def test_resume_with_explicit_path_and_never(reference_run, train_overrides, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, records = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}",
                                                     f"train.resume={reference_run / 'checkpoints' / 'step-00000008'}",
                                                     "logging.val_interval=0"], run_dir)
    assert code == 0 and sorted(train_records(records)) == [9, 10, 11, 12]
    ref = train_records(read_metrics(reference_run))
    assert all(train_records(records)[s][0]["loss"] == ref[s][0]["loss"] for s in (9, 10, 11, 12))
    capsys.readouterr()
    code, records = run_inprocess(train_overrides + ["train.max_steps=2", "train.resume=never",
                                                     "logging.val_interval=0"], tmp_path / "fresh")
    assert code == 0 and "resumed" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        run_inprocess(train_overrides + [f"train.resume={tmp_path / 'nowhere'}"], tmp_path / "bad")


# --- export and init_from ------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_export_then_load_model_gives_the_trained_weights(train_overrides, tmp_path, tie):
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.checkpoint_reader import WEIGHTS_FILE, load_model
    from mtp_pretrain.export import export_single_file
    from mtp_pretrain.train import Trainer

    cfg = compose_job_config(train_overrides + ["train.max_steps=3", f"model.tie_embeddings={tie}",
                                                "logging.val_interval=0"])
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        assert trainer.train() == 0
        trained = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()
    ckpt = tmp_path / "run" / "checkpoints"
    out = export_single_file(ckpt, tmp_path / "export")
    assert (out / WEIGHTS_FILE).is_file() and (out / "tokenizer.json").is_file()
    meta = json.loads((out / "config.json").read_text())
    assert meta["step"] == 3 and meta["model"]["tie_embeddings"] is tie and meta["model"]["n_future"] == 4
    for source in (out, ckpt, ckpt / "step-00000003"):
        model, tokenizer = load_model(source)
        assert tokenizer is not None and not model.training
        sd = model.state_dict()
        assert sd.keys() == trained.keys()
        for k, v in trained.items():
            assert torch.equal(sd[k], v), f"{source}: {k}"
        if tie:
            assert model.unembed.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()


@pytest.mark.parametrize("n_new", [1, 6])
def test_init_from_other_n_future_copies_trunk_and_shared_heads(reference_run, train_overrides, tmp_path, n_new):
    """init_from an n=4 checkpoint into an n'-head model: embedding, trunk, unembedding and heads
    1..min(4, n') are copied exactly; extra heads keep their fresh initialisation; training from
    there starts at step 0."""
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.checkpoint_reader import read_model_config, read_state_dict, resolve_checkpoint
    from mtp_pretrain.train import Trainer

    src = resolve_checkpoint(reference_run / "checkpoints")
    source = read_state_dict(src, read_model_config(src))
    cfg = compose_job_config(train_overrides + [f"model.n_future={n_new}", f"train.init_from={src}"])
    trainer = Trainer(cfg, tmp_path / "run")
    try:
        assert trainer.step == 0
        sd = trainer.model.state_dict()
    finally:
        trainer.close()
    heads = {int(k.split(".")[1]) for k in sd if k.startswith("heads.")}
    assert heads == set(range(n_new))
    copied = [k for k in sd if not k.startswith("heads.") or int(k.split(".")[1]) < 4]
    assert any(k.startswith("trunk.") for k in copied) and any(k.startswith("heads.0.") for k in copied)
    for k in copied:
        assert torch.equal(sd[k], source[k]), k
    fresh = [k for k in sd if k.startswith("heads.") and int(k.split(".")[1]) >= 4]
    assert len(fresh) == (0 if n_new <= 4 else (n_new - 4) * len([k for k in sd if k.startswith("heads.0.")]))
    for k in fresh:  # heads the source lacks: freshly initialised, not a copy of a source head
        if sd[k].ndim == 2:
            assert not any(torch.equal(sd[k], source[f"heads.{h}.{k.split('.', 2)[2]}"]) for h in range(4)), k
