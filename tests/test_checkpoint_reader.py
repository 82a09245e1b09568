"""The checkpoint reader's partial loading (``train.init_from`` into another number of heads; the
same function loads ``train.init_from_hf``'s renamed tensors) and the train state behind an export.
Tiny in-memory models written as single-file exports: no training."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mtp_pretrain.checkpoint_reader import (CONFIG_FILE, TRAIN_STATE, WEIGHTS_FILE, CheckpointError,
                                            load_model_weights, train_state_of)
from mtp_pretrain.model import ModelConfig, MTPTransformer

TINY = dict(vocab_size=32, dim=16, n_layers=1, n_heads=2, max_seq_len=16)


def model(seed: int, **kw) -> MTPTransformer:
    torch.manual_seed(seed)
    return MTPTransformer(ModelConfig(**{**TINY, **kw}))


def write_export(m: MTPTransformer, out: Path, drop: tuple[str, ...] = (), **record) -> Path:
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in m.state_dict().items() if k not in drop}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"model": asdict(m.cfg), **record}))
    return out


@pytest.mark.parametrize("n_dst", [2, 5])
def test_init_from_copies_shared_heads_drops_extra_keeps_fresh(tmp_path, n_dst):
    src = model(0, n_future=3)
    path = write_export(src, tmp_path / "src")
    dst = model(1, n_future=n_dst)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    logs = []
    load_model_weights(dst, path, log=logs.append)
    got, want = dst.state_dict(), src.state_dict()
    shared = [k for k in got if not k.startswith("heads.") or int(k.split(".")[1]) < 3]
    fresh = [k for k in got if k not in shared]
    per_head = len([k for k in got if k.startswith("heads.0.")])
    assert any(k.startswith("trunk.") for k in shared) and per_head > 0
    assert len(fresh) == max(0, n_dst - 3) * per_head
    for k in shared:
        assert torch.equal(got[k], want[k]), k
    for k in fresh:  # heads the source lacks keep the values they had
        assert torch.equal(got[k], before[k]), k
    assert logs == [f"initialised from {path}: trunk + heads 1..{min(3, n_dst)} copied"
                    + ("; source heads 3..3 dropped" if n_dst == 2 else "; heads 4..5 freshly initialised")]


def test_init_from_refuses_what_does_not_fit(tmp_path):
    dst = model(1, n_future=2)
    untouched = {k: v.clone() for k, v in dst.state_dict().items()}
    wider = write_export(model(0, n_future=2, ffn_dim=128), tmp_path / "wider")
    with pytest.raises(CheckpointError, match=r"init_from .*wider: \S+\.mlp\.\S+ has shape "
                                              r"\((128, 16|16, 128)\) there, \((64, 16|16, 64)\) here"):
        load_model_weights(dst, wider)
    causal = write_export(model(0, n_future=2, head_type="causal"), tmp_path / "causal")
    with pytest.raises(CheckpointError, match=r"parameter heads.1.\S+ has no counterpart in this model "
                                              r"\(head_type causal vs transformer\?\)"):
        load_model_weights(dst, causal)
    holes = write_export(model(0, n_future=2), tmp_path / "holes", drop=("trunk.0.attn.q_proj.weight",
                                                                         "heads.1.norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing parameters \['trunk.0.attn.q_proj.weight', "
                                              r"'heads.1.norm.weight'\]"):
        load_model_weights(dst, holes)
    for k, v in dst.state_dict().items():  # a refused source changes nothing
        assert torch.equal(v, untouched[k]), k


def test_train_state_behind_an_export(tmp_path):
    source = tmp_path / "step-00000007"
    source.mkdir()
    (source / ".metadata").write_bytes(b"")
    (source / TRAIN_STATE).write_text(json.dumps({"step": 7, "tokens_seen": 700, "data_sources": ["d"]}))
    export = write_export(model(0), tmp_path / "export", step=7, tokens_seen=700, source=str(source))
    assert train_state_of(source)["data_sources"] == ["d"]
    assert train_state_of(export) == {"step": 7, "tokens_seen": 700, "data_sources": ["d"]}  # the source's
    (source / TRAIN_STATE).unlink()  # the source is gone: what the export recorded remains
    assert train_state_of(export) == {"step": 7, "tokens_seen": 700}
    (export / CONFIG_FILE).write_text('{"model": ')
    with pytest.raises(CheckpointError, match=f"export {export} is damaged: {CONFIG_FILE} is not valid JSON"):
        train_state_of(export)
