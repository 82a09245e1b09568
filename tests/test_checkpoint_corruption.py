"""Damaged checkpoints: the manifest written at save, resume=auto falling back past a damaged
newest checkpoint (naming the checkpoint, the file and why), explicit paths failing with that
message, incompatible model configs, checkpoints from before manifests, and the same errors from
every reader (mtp-export, mtp-generate, mtp-eval, train.init_from). All in-process."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import pytest

from conftest import REF_STEPS, read_metrics, run_inprocess, train_records
from mtp_pretrain.checkpoint_reader import MANIFEST, TRAIN_STATE, CheckpointError, DamagedCheckpointError, find_latest

SHARD = "__0_0.distcp"  # the one DCP data file of a one-process save


def damage(ckpt: Path, how: str) -> str:
    """Damage checkpoint folder ``ckpt``; returns the words the report must contain."""
    if how == "truncated":
        data = (ckpt / SHARD).read_bytes()
        (ckpt / SHARD).write_bytes(data[: len(data) // 2])
        return f"{SHARD} has {len(data) // 2} bytes, its manifest says {len(data)}"
    if how == "deleted":
        (ckpt / SHARD).unlink()
        return f"{SHARD} is missing"
    if how == "deleted_rank_file":
        (ckpt / "rng" / "rank-00000.pt").unlink()
        return "rng/rank-00000.pt is missing"
    if how == "garbage_state":
        (ckpt / TRAIN_STATE).write_text('{"step": 12, "tokens_')  # cut short mid-write
        return f"{TRAIN_STATE} is not valid JSON"
    if how == "garbage_manifest":
        (ckpt / MANIFEST).write_text('{"files": {".metadata": {"size": 12')
        return f"{MANIFEST} is unreadable"
    if how == "header_zeroed":  # same size, unloadable: found by the checksum run after the failed load
        from torch.distributed.checkpoint import FileSystemReader

        items = FileSystemReader(str(ckpt)).read_metadata().storage_data.values()
        assert {item.relative_path for item in items} == {SHARD}
        with open(ckpt / SHARD, "r+b") as f:
            for item in items:  # every saved tensor's serialised header, so that any reader trips
                f.seek(item.offset)
                f.write(b"\0" * 4)
        return f"{SHARD} has crc32"
    if how == "byte_flipped":  # same size, loads fine: only checkpoint.verify=checksum sees it
        data = bytearray((ckpt / SHARD).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (ckpt / SHARD).write_bytes(bytes(data))
        return f"{SHARD} has crc32"
    raise AssertionError(how)


@pytest.fixture()
def run_copy(reference_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    return run_dir


# --- the manifest ----------------------------------------------------------------------------------
def test_manifest_lists_every_file_with_its_size_and_crc32(reference_run):
    ckpt = reference_run / "checkpoints" / f"step-{REF_STEPS:08d}"
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["checksum"] == "crc32"
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST, TRAIN_STATE}
    assert {".metadata", SHARD, "rng/rank-00000.pt"} <= on_disk
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name


def small_save(tmp_path: Path, log: list[str]) -> Path:
    """One CheckpointManager save (one process) of a small model with AdamW moments; its folder."""
    import torch

    from mtp_pretrain.checkpoint import CheckpointManager
    from mtp_pretrain.model import ModelConfig, MTPTransformer
    from mtp_pretrain.parallel.base import ModelState, OptimState
    from mtp_pretrain.parallel.setup import DistEnv

    torch.manual_seed(0)
    model = MTPTransformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_future=2))
    optimizer = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    ckpt = CheckpointManager(tmp_path / "checkpoints", keep=2, env=env, log=log.append)
    return ckpt.save(1, {"model": ModelState(model), "optim": OptimState(model, optimizer)},
                     {"step": 1, "tokens_seen": 0, "scheduler": {}, "data": {}})


def manifest_matches_the_files(ckpt: Path) -> None:
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST, TRAIN_STATE}
    assert {".metadata", SHARD, "rng/rank-00000.pt"} <= on_disk and set(files) == on_disk
    for name in sorted(on_disk):
        data = (ckpt / name).read_bytes()
        assert files[name] == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name


def test_the_manifest_is_recorded_while_writing(tmp_path, monkeypatch):
    """A save reads none of its files back: the sizes and crc32s come from the bytes written."""
    import mtp_pretrain.checkpoint as checkpoint
    import mtp_pretrain.checkpoint_reader as checkpoint_reader

    def no_reading(*args, **kwargs):
        raise AssertionError("a file was read back for the manifest")

    for module in (checkpoint, checkpoint_reader):  # the reader's own (verify) and the save's reference
        monkeypatch.setattr(module, "file_digests", no_reading, raising=False)
    log: list[str] = []
    path = small_save(tmp_path, log)
    monkeypatch.undo()
    manifest_matches_the_files(path)
    assert not any("not seen while writing" in line for line in log), log


def test_a_file_not_seen_while_writing_is_read_back(tmp_path, monkeypatch):
    """Should DCP write a file by another path than the recorded one, the manifest still lists it
    with its true size and crc32 (read back), and the log says so."""
    import mtp_pretrain.checkpoint as checkpoint

    real = checkpoint.DigestingWriter.digests
    monkeypatch.setattr(checkpoint.DigestingWriter, "digests",
                        lambda self, root: {k: v for k, v in real(self, root).items() if k != SHARD})
    log: list[str] = []
    manifest_matches_the_files(small_save(tmp_path, log))
    assert any(f"1 file(s) not seen while writing, read back: {SHARD}" in line for line in log), log


def test_death_while_writing_the_manifest_publishes_nothing(run_copy, train_overrides, monkeypatch, capsys):
    """The manifest is computed inside .tmp-step-N before train_state.json: a process dying there
    leaves the previous checkpoint the newest, and the next run resumes from it and publishes."""
    import mtp_pretrain.checkpoint as checkpoint

    class Killed(BaseException):  # stands in for SIGKILL: no handler runs
        pass

    def die(*args, **kwargs):
        raise Killed

    root = run_copy / "checkpoints"
    monkeypatch.setattr(checkpoint, "manifest_digests", die)
    with pytest.raises(Killed):
        run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS + 4}"], run_copy)
    tmp = root / f".tmp-step-{REF_STEPS + 4:08d}"
    assert (tmp / SHARD).is_file() and not (tmp / MANIFEST).exists() and not (tmp / TRAIN_STATE).exists()
    assert find_latest(root) == root / f"step-{REF_STEPS:08d}"
    monkeypatch.undo()
    capsys.readouterr()
    code, _ = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS + 4}"], run_copy)
    assert code == 0 and f"resumed from {root / f'step-{REF_STEPS:08d}'} at step {REF_STEPS}" in capsys.readouterr().out
    assert find_latest(root) == root / f"step-{REF_STEPS + 4:08d}" and not tmp.exists()


# --- resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how,verify", [("truncated", "size"), ("deleted", "size"), ("deleted_rank_file", "size"),
                                        ("garbage_state", "size"), ("garbage_manifest", "size"),
                                        ("header_zeroed", "size"),
                                        ("byte_flipped", "checksum")])
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(run_copy, reference_run, train_overrides,
                                                                  capsys, how, verify):
    """The damaged step-12 is reported (checkpoint, file, why) and set aside; training resumes from
    step-8 and redoes steps 9..12 with the uninterrupted run's exact losses."""
    root = run_copy / "checkpoints"
    newest = root / "step-00000012"
    words = damage(newest, how)
    code, records = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}", f"checkpoint.verify={verify}"],
                                  run_copy)
    assert code == 0
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged: {words}" in out
    assert f"moved the damaged checkpoint to {root / 'step-00000012.damaged'}" in out
    assert f"resumed from {root / 'step-00000008'} at step 8" in out
    ref, got = train_records(read_metrics(reference_run)), train_records(records)
    assert sorted(got) == list(range(1, REF_STEPS + 1))
    for step in range(9, REF_STEPS + 1):
        assert len(got[step]) == 2, step  # the reference's copy, then the redo
        assert got[step][1]["loss"] == ref[step][0]["loss"], step
    assert (root / "step-00000012.damaged").is_dir()  # kept for inspection, out of the rotation
    assert json.loads((root / "step-00000012" / TRAIN_STATE).read_text())["step"] == REF_STEPS  # saved anew


def test_flipped_byte_passes_the_size_check(run_copy, train_overrides, capsys):
    """What checkpoint.verify=size cannot see (why checksum exists): same size, loadable tensor bytes."""
    damage(run_copy / "checkpoints" / "step-00000012", "byte_flipped")
    code, _ = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}"], run_copy)
    assert code == 0 and "resumed from" in (out := capsys.readouterr().out) and "step-00000012 at step 12" in out


def test_explicit_damaged_path_fails_naming_the_file(run_copy, train_overrides, tmp_path):
    ckpt = run_copy / "checkpoints" / "step-00000008"
    words = damage(ckpt, "truncated")
    with pytest.raises(DamagedCheckpointError, match=f"checkpoint {ckpt} is damaged: {words}"):
        run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}", f"train.resume={ckpt}"], tmp_path / "new")
    assert ckpt.is_dir()  # an explicit path is reported, never moved


def test_resume_auto_with_every_checkpoint_damaged_fails(run_copy, train_overrides):
    root = run_copy / "checkpoints"
    steps = sorted(p.name for p in root.glob("step-*"))
    assert steps == ["step-00000004", "step-00000008", "step-00000012"]
    for name in steps:
        damage(root / name, "garbage_state")
    with pytest.raises(CheckpointError, match=f"no undamaged checkpoint under {root}"):
        run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}"], run_copy)


def test_incompatible_model_config_names_the_fields(run_copy, train_overrides, capsys):
    ckpt = run_copy / "checkpoints" / "step-00000012"
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} was saved from an incompatible model config: "
                                              # ffn_dim follows dim (8/3 dim, rounded up to 64)
                                              "model.dim: checkpoint 64, config 32; model.ffn_dim: checkpoint 192, "
                                              "config 128; model.n_future: checkpoint 4, config 2$"):
        run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS}", "model.dim=32", "model.n_future=2"],
                      run_copy)
    assert ckpt.is_dir()  # not damage: nothing set aside
    # a field that keeps every parameter's shape is allowed, and said
    code, _ = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS + 1}", "model.rope_theta=500.0"], run_copy)
    out = capsys.readouterr().out
    assert code == 0 and "model.rope_theta: checkpoint 10000.0, config 500.0" in out
    assert f"resumed from {ckpt} at step 12" in out


def test_checkpoint_without_manifest_still_loads(run_copy, reference_run, train_overrides, capsys):
    """Written before manifests: loads, says once that its files are not verified."""
    root = run_copy / "checkpoints"
    for name in ("step-00000004", "step-00000008", "step-00000012"):
        (root / name / MANIFEST).unlink()
    code, records = run_inprocess(train_overrides + [f"train.max_steps={REF_STEPS + 2}", "checkpoint.interval=0"],
                                  run_copy)
    out = capsys.readouterr().out
    assert code == 0 and f"resumed from {root / 'step-00000012'} at step 12" in out
    assert out.count(f"checkpoint {root / 'step-00000012'} has no {MANIFEST}") == 1
    assert sorted(train_records(records)) == list(range(1, REF_STEPS + 3))
    assert (root / f"step-{REF_STEPS + 2:08d}" / MANIFEST).is_file()  # the next save has one
    # readers: mtp-eval resolves a checkpoint several times; the note still comes once
    from mtp_pretrain.checkpoint_reader import load_model, resolve_checkpoint

    old = root / "step-00000008"
    assert resolve_checkpoint(old) == old
    model, _ = load_model(old)
    assert model.cfg.n_future == 4
    assert capsys.readouterr().err.count(f"checkpoint {old} has no {MANIFEST}") == 1


# --- every reader gives the same error -------------------------------------------------------------
def _read_with(reader: str, root: Path, tmp_path: Path, train_overrides: list[str]) -> str:
    """Run ``reader`` on checkpoint root ``root``; the error message it stopped with."""
    with pytest.raises((SystemExit, CheckpointError)) as info:
        if reader == "mtp-export":
            from mtp_pretrain.export import main

            main([str(root), str(tmp_path / "export")])
        elif reader == "mtp-generate":
            from mtp_pretrain.inference.cli import main

            main([str(root), "--prompt", "1,2,3", "--max-new-tokens", "2"])
        elif reader == "mtp-eval":
            from mtp_pretrain.eval.cli import main

            main(["per_head", "--checkpoint", str(root), "--max-batches", "1"])
        else:
            run_inprocess(train_overrides + ["train.max_steps=1", f"train.init_from={root}"], tmp_path / "init")
    if isinstance(info.value, SystemExit):
        assert str(info.value.code).startswith(f"{reader}: "), info.value.code
        return str(info.value.code)
    assert reader == "train.init_from"
    return str(info.value)


@pytest.mark.parametrize("how", ["truncated", "deleted", "garbage_state"])
@pytest.mark.parametrize("reader", ["mtp-export", "mtp-generate", "mtp-eval", "train.init_from"])
def test_readers_report_the_damaged_file(run_copy, train_overrides, tmp_path, reader, how):
    """Given the root, a reader takes the newest checkpoint; damaged, it stops with the damage and
    the newest undamaged checkpoint to use instead (it does not silently read an older one)."""
    root = run_copy / "checkpoints"
    words = damage(root / "step-00000012", how)
    message = _read_with(reader, root, tmp_path, train_overrides)
    assert f"checkpoint {root / 'step-00000012'} is damaged: {words}" in message
    assert f"the newest undamaged checkpoint there: {root / 'step-00000008'}" in message
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("reader", ["mtp-export", "mtp-generate", "mtp-eval", "train.init_from"])
def test_readers_name_the_file_when_loading_fails(run_copy, train_overrides, tmp_path, reader):
    """Same size, so the size check passes; the failed load runs the checksums, which name the file."""
    ckpt = run_copy / "checkpoints" / "step-00000012"
    words = damage(ckpt, "header_zeroed")
    message = _read_with(reader, ckpt, tmp_path, train_overrides)
    assert f"checkpoint {ckpt} is damaged: {words}" in message
