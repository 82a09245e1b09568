"""Hugging Face interop (mtp_pretrain.interop.hf): export to a transformers Llama directory and
initialise from one. Tiny random models, float32, CPU, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# transformers is a dev dependency: a missing one fails here rather than skipping every check.
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          PreTrainedTokenizerFast)

from mtp_pretrain.data.tokenizer import BOS, EOS, PAD, BPETokenizer, ByteTokenizer  # noqa: E402
from mtp_pretrain.checkpoint_reader import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE  # noqa: E402
from mtp_pretrain.inference import generate  # noqa: E402
from mtp_pretrain.interop.hf import (SIDE_CONFIG, SIDE_WEIGHTS, HFInteropError, export_hf,  # noqa: E402
                                     hydra_overrides_from_hf, load_hf_model, load_hf_weights,
                                     model_config_from_hf)
from mtp_pretrain.loss import head_sequential_loss  # noqa: E402
from mtp_pretrain.model import ModelConfig, MTPTransformer  # noqa: E402

VOCAB = 259  # the byte tokenizer's vocabulary
TOL = 1e-5


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def make_model(seed=0, **kw) -> MTPTransformer:
    """A random model whose every parameter, norms included, is distinct (so a swapped or
    dropped tensor changes the output); weights large enough that greedy choices are clear."""
    base = dict(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.08)
    torch.manual_seed(seed)
    model = MTPTransformer(ModelConfig(**{**base, **kw})).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def save_export(model: MTPTransformer, out: Path, tokenizer=None) -> Path:
    """Write a single-file export (the format mtp_pretrain.export writes) of an in-memory model."""
    out.mkdir(parents=True)
    sd = dict(model.state_dict())
    if model.cfg.tie_embeddings:
        sd.pop("unembed.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, out / WEIGHTS_FILE)
    (out / CONFIG_FILE).write_text(json.dumps({"model": asdict(model.cfg), "step": 7, "tokens_seen": 700}))
    (tokenizer or ByteTokenizer()).save(out / TOKENIZER_FILE)
    return out


def random_tokens(b=2, t=23, seed=1, vocab=VOCAB):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_full_recompute(model: MTPTransformer, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """Plain reference decoder: recompute the whole sequence, take head 1's argmax, stop at EOS."""
    seq = list(prompt)
    for _ in range(n):
        nxt = int(model(torch.tensor([seq]))[0][0, -1].argmax())
        seq.append(nxt)
        if nxt == eos:
            break
    return seq[len(prompt):]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def tiny_llama(tmp: Path, name="llama", seed=0, max_shard_size=None, **kw) -> tuple[LlamaForCausalLM, Path]:
    """A random LlamaForCausalLM saved with save_pretrained (sharded when max_shard_size is set)."""
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=700.0,
                tie_word_embeddings=False, initializer_range=0.08, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**base, **kw})
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "norm" in name_:
                p.uniform_(0.5, 1.5)
    out = tmp / name
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model, out


# ----------------------------------------------------------------------------------------------
# (1) export -> transformers: same logits, same greedy decoding, loadable tokenizer
# ----------------------------------------------------------------------------------------------

EXPORT_CASES = {
    "transformer_n3_deep_heads": dict(n_future=3, head_layers=2, rope_theta=500.0),
    "gqa_tied": dict(n_future=2, n_kv_heads=1, tie_embeddings=True),
    "causal_heads_gqa": dict(n_future=3, head_type="causal", n_kv_heads=2),
    "baseline_matched_n1": dict(n_layers=3, n_future=1, match_baseline_params=True, norm_eps=1e-6),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_matches_transformers_logits_and_greedy(tmp_path, case):
    model = make_model(**EXPORT_CASES[case])
    cfg = model.cfg
    out = export_hf(save_export(model, tmp_path / "ckpt"), tmp_path / "hf")

    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["num_hidden_layers"] == cfg.trunk_layers + cfg.head_layers
    assert (hf_cfg["hidden_size"], hf_cfg["intermediate_size"], hf_cfg["num_attention_heads"],
            hf_cfg["num_key_value_heads"], hf_cfg["vocab_size"], hf_cfg["max_position_embeddings"]) == \
        (cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len)
    assert hf_cfg["tie_word_embeddings"] is cfg.tie_embeddings
    assert (hf_cfg["attention_bias"], hf_cfg["mlp_bias"], hf_cfg["hidden_act"]) == (False, False, "silu")
    assert (hf_cfg["bos_token_id"], hf_cfg["eos_token_id"], hf_cfg["pad_token_id"]) == (257, 258, 256)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) is not cfg.tie_embeddings

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf) is LlamaForCausalLM and hf.dtype == torch.float32
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    x = random_tokens(3, 37)
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
    assert ours.std() > 0.5  # the outputs are far from uniform: a mapping error would show
    assert max_diff(ours, theirs) <= TOL

    eos = 258
    for prompt in ([5, 9, 77, 200, 3], [257, 104, 101, 108, 108, 111]):
        want = greedy_full_recompute(model, prompt, 20, eos)
        got = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
        assert got == want
        ours_cached = generate(model, [prompt], mode="greedy", max_new_tokens=20, eos_id=eos).tokens[0]
        assert ours_cached == want


def test_export_side_file_and_tokenizers(tmp_path):
    """Side file contents; both of our tokenizer kinds become AutoTokenizer-loadable fast
    tokenizers with our ids and special tokens."""
    model = make_model(n_future=3)
    out = export_hf(save_export(model, tmp_path / "ckpt"), tmp_path / "hf")
    side = json.loads((out / SIDE_CONFIG).read_text())
    assert side["model"] == asdict(model.cfg) and side["extra_heads"] == 2 and side["step"] == 7
    extra = load_file(out / SIDE_WEIGHTS)
    assert set(extra) == {k for k in model.state_dict() if k.startswith(("heads.1.", "heads.2."))}
    texts = ["def f(x):\n    return x + 1\n", "héllo wörld ✓ 🙂", "  spaces\tand\nnewlines  "]

    byte_tok = AutoTokenizer.from_pretrained(out)
    ours = ByteTokenizer()
    assert isinstance(byte_tok, PreTrainedTokenizerFast)
    assert (byte_tok.bos_token, byte_tok.eos_token, byte_tok.pad_token) == (BOS, EOS, PAD)
    assert (byte_tok.bos_token_id, byte_tok.eos_token_id, byte_tok.pad_token_id) == (257, 258, 256)
    for t in texts:
        ids = byte_tok(t, add_special_tokens=True).input_ids
        assert ids == ours.encode(t)
        assert byte_tok.decode(ids + [ours.eos_id], skip_special_tokens=True) == t

    corpus = ["the quick brown fox jumps over the lazy dog " * 3, "def add(a, b): return a + b"] * 20
    bpe = BPETokenizer.train(corpus, vocab_size=300, show_progress=False)
    bpe_model = make_model(vocab_size=bpe.vocab_size, n_future=1)
    out2 = export_hf(save_export(bpe_model, tmp_path / "ckpt_bpe", tokenizer=bpe), tmp_path / "hf_bpe")
    hf_tok = AutoTokenizer.from_pretrained(out2)
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (bpe.bos_id, bpe.eos_id, bpe.pad_id)
    for t in texts + corpus[:2]:
        ids = hf_tok(t).input_ids
        assert ids == bpe.encode(t)
        assert hf_tok.decode(ids, skip_special_tokens=True) == bpe.decode(ids) == t
    assert json.loads((out2 / "config.json").read_text())["eos_token_id"] == bpe.eos_id


# ----------------------------------------------------------------------------------------------
# (2) transformers Llama -> init_from_hf: same logits, trains
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharded,tied", [(False, False), (True, False), (True, True)])
def test_init_from_hf_llama_matches_and_trains(tmp_path, sharded, tied):
    hf, path = tiny_llama(tmp_path, max_shard_size="40KB" if sharded else None, tie_word_embeddings=tied)
    if sharded:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and not (path / "model.safetensors").exists()

    cfg = model_config_from_hf(path, n_future=3)
    assert (cfg.n_layers, cfg.head_layers, cfg.dim, cfg.ffn_dim, cfg.n_kv_heads, cfg.vocab_size, cfg.rope_theta,
            cfg.norm_eps, cfg.tie_embeddings, cfg.max_seq_len) == (2, 1, 48, 80, 2, 97, 700.0, 1e-6, tied, 64)
    torch.manual_seed(0)
    model = MTPTransformer(cfg)
    logs = []
    load_hf_weights(model, path, log=logs.append)
    assert "heads 2..3 copies of head 1" in logs[0]
    model.eval()

    x = random_tokens(2, 41, vocab=97)
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert max_diff(ours[0], theirs) <= TOL
    sd = model.state_dict()
    head_1 = [k for k in sd if k.startswith("heads.0.")]
    assert head_1, "no head-1 parameters to compare"
    for i in (1, 2):  # default rule: heads 2..n start as copies of head 1
        for k in head_1:
            assert torch.equal(sd[k.replace("heads.0.", f"heads.{i}.", 1)], sd[k])
        assert max_diff(ours[i], ours[0]) == 0
    if tied:
        assert model.unembed.weight is model.tok_embeddings.weight

    # continued pretraining with the multi-token loss lowers the loss
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(40).remainder(13).add(3).repeat(4, 1)  # a repetitive sequence
    losses = []
    for _ in range(8):
        opt.zero_grad()
        losses.append(float(head_sequential_loss(model, data).loss))
        opt.step()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_init_from_hf_fresh_heads_and_plain_n1(tmp_path):
    hf, path = tiny_llama(tmp_path)
    torch.manual_seed(0)
    model = MTPTransformer(model_config_from_hf(path, n_future=2))
    before = model.heads[1].blocks[0].attn.q_proj.weight.clone()
    load_hf_weights(model, path, extra_heads="fresh", log=lambda _: None)
    assert torch.equal(model.heads[1].blocks[0].attn.q_proj.weight, before)  # kept its fresh init
    assert not torch.equal(model.heads[1].blocks[0].attn.q_proj.weight, model.heads[0].blocks[0].attn.q_proj.weight)

    # n_future=1: plain continued pretraining of the same network; deeper heads take more layers
    plain = load_hf_model(path, head_layers=2)
    assert (plain.cfg.n_future, plain.cfg.trunk_layers, plain.cfg.head_layers) == (1, 1, 2)
    x = random_tokens(1, 30, vocab=97)
    with torch.no_grad():
        assert max_diff(plain(x)[0], hf(x).logits) <= TOL

    # causal heads: head 1 is the Llama's last layer; heads 2..n copy its blocks
    causal = load_hf_model(path, n_future=2, head_type="causal")
    with torch.no_grad():
        assert max_diff(causal(x)[0], hf(x).logits) <= TOL
    assert torch.equal(causal.heads[1].norm.weight, causal.heads[0].norm.weight)


def test_init_from_hf_through_trainer_then_export(tmp_path):
    """train.init_from_hf in the Trainer: the model starts as the Llama, trains a few steps, and
    its DCP checkpoint exports back to a Llama with the trained weights."""
    from mtp_pretrain.config import (CheckpointConfig, DataConfig, DataSourceConfig, JobConfig, LoggingConfig,
                                     OptimConfig, TrainConfig, WandbConfig)
    from mtp_pretrain.data.synthetic import write_random_dataset
    from mtp_pretrain.checkpoint_reader import read_model_config
    from mtp_pretrain.train import Trainer

    hf, path = tiny_llama(tmp_path, vocab_size=VOCAB)
    data = tmp_path / "data"
    write_random_dataset(data, {"train": 20_000, "val": 2_000}, doc_len=100)
    job = JobConfig(
        model=model_config_from_hf(path, n_future=2),
        data=DataConfig(sources=[DataSourceConfig(path=str(data))], seq_len=32, prefetch=0),
        optim=OptimConfig(lr=1e-3, warmup_steps=0),
        train=TrainConfig(max_steps=3, micro_batch_size=2, resume="never", init_from_hf=str(path),
                          device="cpu", dtype="float32"),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), interval=0),
        logging=LoggingConfig(interval=1, val_interval=0, wandb=WandbConfig(mode="disabled")))
    trainer = Trainer(job, tmp_path / "run")
    try:
        x = random_tokens(2, 30)
        with torch.no_grad():
            assert max_diff(trainer.model(x)[0], hf(x).logits) <= TOL
        assert trainer.train() == 0
        trained = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    finally:
        trainer.close()
    ckpt = sorted((tmp_path / "ckpt").glob("step-*"))[-1]
    assert read_model_config(ckpt).n_future == 2
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf_trained")
    rebuilt = load_hf_model(out)
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in trained.items())
    assert AutoTokenizer.from_pretrained(out).eos_token_id == 258
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert max_diff(rebuilt(x)[0], reloaded(x).logits) <= TOL


# ----------------------------------------------------------------------------------------------
# (3) export -> init_from_hf restores every weight exactly
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(n_future=4, head_layers=2), dict(n_future=3, head_type="causal", tie_embeddings=True),
                                dict(n_future=3, n_layers=4, match_baseline_params=True, n_kv_heads=2)])
def test_export_then_init_round_trip_is_exact(tmp_path, kw):
    model = make_model(**kw)
    out = export_hf(save_export(model, tmp_path / "ckpt"), tmp_path / "hf")
    assert model_config_from_hf(out) == model.cfg

    rebuilt = load_hf_model(out)
    want, got = model.state_dict(), rebuilt.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k

    # into a model with a fresh init and one head more: heads 2..n from the side file, head n+1 copied
    n = model.cfg.n_future
    bigger = MTPTransformer(model.cfg.replace(n_future=n + 1, match_baseline_params=False,
                                              n_layers=model.cfg.trunk_layers))
    logs = []
    load_hf_weights(bigger, out, log=logs.append)
    assert f"heads 2..{n} from {SIDE_WEIGHTS}" in logs[0] and f"heads {n + 1}..{n + 1} copies" in logs[0]
    got = bigger.state_dict()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    head_1 = [k for k in want if k.startswith("heads.0.")]
    assert head_1, "no head-1 parameters to compare"
    for k in head_1:
        assert torch.equal(got[k.replace("heads.0.", f"heads.{n}.", 1)], want[k])


# ----------------------------------------------------------------------------------------------
# (4) what is not a Llama is refused, with the reason, and nothing is written
# ----------------------------------------------------------------------------------------------

def test_linear_heads_refused_nothing_written(tmp_path):
    ckpt = save_export(make_model(n_future=2, head_type="linear"), tmp_path / "ckpt")
    out = tmp_path / "exports" / "hf"
    with pytest.raises(HFInteropError, match="head_type='linear'.*not a transformer block"):
        export_hf(ckpt, out)
    assert not out.exists()
    assert not (tmp_path / "exports").exists() or list((tmp_path / "exports").iterdir()) == []

    # an existing export at out_dir is left alone
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("old")
    with pytest.raises(HFInteropError):
        export_hf(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["hf"]

    # the command line says why and fails
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "mtp_pretrain.export", "--format", "hf", str(ckpt),
                        str(tmp_path / "cli_out")], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "head_type='linear'" in r.stderr and "not a transformer block" in r.stderr
    assert not (tmp_path / "cli_out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "exports"]


def test_failed_write_leaves_no_partial_directory(tmp_path, monkeypatch):
    ckpt = save_export(make_model(n_future=2), tmp_path / "ckpt")
    import mtp_pretrain.interop.hf as hf_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(hf_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_hf(ckpt, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,message", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 700.0, "factor": 4.0}), "rope_type='yarn'"),
    (dict(attention_bias=True), "attention_bias=True"),
    (dict(mlp_bias=True), "mlp_bias=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(head_dim=16), "head_dim=16"),
    (dict(model_type="gpt2"), "model_type='gpt2'"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window=16"),
])
def test_unsupported_hf_settings_rejected(tmp_path, changes, message):
    _, path = tiny_llama(tmp_path)
    model = MTPTransformer(model_config_from_hf(path))
    _edit_config(path, **changes)
    with pytest.raises(HFInteropError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_hf_weights(model, path, log=lambda _: None)
    with pytest.raises(HFInteropError, match="cannot represent it exactly"):
        model_config_from_hf(path)


@pytest.mark.parametrize("field,value,hf_key", [
    ("dim", 64, "hidden_size"), ("vocab_size", 128, "vocab_size"), ("n_kv_heads", 4, "num_key_value_heads"),
    ("ffn_dim", 96, "intermediate_size"), ("tie_embeddings", True, "tie_word_embeddings"),
    ("rope_theta", 10000.0, "rope_theta"), ("norm_eps", 1e-5, "rms_norm_eps"), ("n_layers", 3, "num_hidden_layers"),
    ("max_seq_len", 128, "max_position_embeddings"),
])
def test_config_mismatch_names_the_field(tmp_path, field, value, hf_key):
    _, path = tiny_llama(tmp_path)
    cfg = model_config_from_hf(path).replace(**{field: value})
    with pytest.raises(HFInteropError, match=hf_key) as e:
        load_hf_weights(MTPTransformer(cfg), path, log=lambda _: None)
    assert f"model.{field}" in str(e.value) or (field == "n_layers" and "model.n_layers=2" in str(e.value))


def test_bad_weights_and_targets_rejected(tmp_path):
    _, path = tiny_llama(tmp_path)
    cfg = model_config_from_hf(path)
    with pytest.raises(HFInteropError, match="head_type='linear'"):
        load_hf_weights(MTPTransformer(cfg.replace(head_type="linear")), path)
    sd = load_file(path / "model.safetensors")
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(48)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(HFInteropError, match="q_proj.bias"):
        load_hf_weights(MTPTransformer(cfg), path)
    del sd["model.layers.0.self_attn.q_proj.bias"], sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors")
    with pytest.raises(HFInteropError, match="lacks.*layers.1.mlp.up_proj"):
        load_hf_weights(MTPTransformer(cfg), path)
    os.remove(path / "model.safetensors")
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(HFInteropError, match="pytorch_model.bin"):
        load_hf_weights(MTPTransformer(cfg), path)
    with pytest.raises(ValueError, match="extra_heads"):
        load_hf_weights(MTPTransformer(cfg), path, extra_heads="mean")


def test_side_file_head_type_mismatch_and_hydra_overrides(tmp_path):
    model = make_model(n_future=2, head_type="causal")
    out = export_hf(save_export(model, tmp_path / "ckpt"), tmp_path / "hf")
    other = MTPTransformer(model.cfg.replace(head_type="transformer"))
    with pytest.raises(HFInteropError, match="head_type='causal'.*model.head_type='transformer'"):
        load_hf_weights(other, out)

    _, path = tiny_llama(tmp_path)
    overrides = hydra_overrides_from_hf(path, n_future=4)
    assert "model.dim=48" in overrides and "model.n_future=4" in overrides and "model.n_layers=2" in overrides
    assert "model.rope_theta=700.0" in overrides and "model.n_kv_heads=2" in overrides

    from mtp_pretrain.config import TrainConfig

    with pytest.raises(ValueError, match="at most one of train.init_from and train.init_from_hf"):
        TrainConfig(init_from="a", init_from_hf="b")
    with pytest.raises(ValueError, match="train.init_from_hf_heads"):
        TrainConfig(init_from_hf="b", init_from_hf_heads="mean")
