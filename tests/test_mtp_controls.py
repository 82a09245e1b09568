"""MTP training controls (docs/mtp_controls.md): head-weight schedules, the curriculum on n and
what skipping a zero-weight head means for gradients, and their exact resume in the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import read_metrics, run_inprocess, train_records
from mtp_pretrain.config import HeadWeightScheduleConfig, LossConfig, compose_job_config
from mtp_pretrain.head_schedule import HeadWeights, default_curriculum_steps, preset_weights
from mtp_pretrain.loss import head_sequential_loss, naive_loss
from mtp_pretrain.model.config import ModelConfig
from mtp_pretrain.model.transformer import MTPTransformer

VOCAB = 61


def schedule(n=4, max_steps=100, **kw) -> HeadWeights:
    loss_kw = {k: kw.pop(k) for k in ("head_weights", "curriculum", "curriculum_steps") if k in kw}
    return HeadWeights(LossConfig(weight_schedule=HeadWeightScheduleConfig(**kw), **loss_kw), n, max_steps)


# --- schedules ------------------------------------------------------------------------------------
def test_presets():
    assert preset_weights("uniform", 4, 0.3) == [1.0, 0.3, 0.3, 0.3]
    assert preset_weights("harmonic", 4) == pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4])
    assert preset_weights("exponential", 4, gamma=0.5) == [1.0, 0.5, 0.25, 0.125]
    assert preset_weights("exponential", 3, scale=0.2, gamma=0.8) == pytest.approx([1.0, 0.16, 0.128])
    assert preset_weights("uniform", 1) == [1.0]


def test_default_is_every_head_at_one_and_head_weights_is_a_constant_vector():
    assert schedule().weights(0, 0) == [1.0] * 4
    assert schedule(max_steps=10).weights(10**6, 10**9) == [1.0] * 4
    fixed = schedule(head_weights=[1.0, 0.5, 0.5, 0.25])
    assert [fixed.weights(s, 0) for s in (0, 50, 99)] == [[1.0, 0.5, 0.5, 0.25]] * 3


def test_step_change_point_three_to_point_one():
    hw = schedule(kind="step", begin=40, from_scale=0.3, to_scale=0.1)
    assert hw.weights(0, 0) == hw.weights(39, 0) == [1.0, 0.3, 0.3, 0.3]
    assert hw.weights(40, 0) == hw.weights(99, 0) == [1.0, 0.1, 0.1, 0.1]


def test_linear_and_cosine_anneal_between_two_vectors():
    kw = dict(begin=10, end=30, from_weights=[1.0, 1.0, 0.5, 0.0], to_weights=[1.0, 0.0, 0.5, 1.0])
    lin, cos = schedule(kind="linear", **kw), schedule(kind="cosine", **kw)
    for hw in (lin, cos):
        assert hw.weights(0, 0) == hw.weights(10, 0) == [1.0, 1.0, 0.5, 0.0]
        assert hw.weights(30, 0) == hw.weights(500, 0) == [1.0, 0.0, 0.5, 1.0]
    assert lin.weights(15, 0) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lin.weights(20, 0) == pytest.approx([1.0, 0.5, 0.5, 0.5])
    assert cos.weights(20, 0) == pytest.approx([1.0, 0.5, 0.5, 0.5])  # the midpoint agrees
    c15 = 0.5 * (1 - math.cos(math.pi * 0.25))  # cosine progress a quarter of the way
    assert cos.weights(15, 0) == pytest.approx([1.0, 1 - c15, 0.5, c15])
    assert cos.weights(15, 0)[1] > lin.weights(15, 0)[1]  # cosine leaves the start more slowly


def test_schedule_counted_in_tokens():
    hw = schedule(kind="linear", unit="tokens", begin=1000, end=3000, preset="harmonic", from_scale=1.0, to_scale=0.0)
    assert hw.weights(10**6, 0) == pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4])  # steps do not count
    assert hw.weights(0, 2000) == pytest.approx([1.0, 1 / 4, 1 / 6, 1 / 8])
    assert hw.weights(0, 3000) == [1.0, 0.0, 0.0, 0.0]


def test_curricula():
    fwd = schedule(curriculum="forward", curriculum_steps=[5, 10, 20], from_scale=0.5)
    assert [fwd.weights(s, 0) for s in (0, 4, 5, 10, 19, 20)] == [
        [1.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0.5, 0, 0], [1.0, 0.5, 0.5, 0], [1.0, 0.5, 0.5, 0], [1.0, 0.5, 0.5, 0.5]]
    rev = schedule(curriculum="reverse", curriculum_steps=[5, 10, 20])
    assert [rev.weights(s, 0) for s in (0, 5, 10, 20, 99)] == [
        [1.0] * 4, [1.0, 1, 1, 0], [1.0, 1, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0]]
    assert default_curriculum_steps(4, 300) == [75, 150, 225]
    assert schedule(curriculum="forward", max_steps=300).boundaries == [75, 150, 225]


@pytest.mark.parametrize("overrides, match", [
    (["loss.weight_schedule.kind=linear", "loss.weight_schedule.begin=5"], "end must be > begin"),
    (["loss.weight_schedule.kind=ramp"], "loss.weight_schedule.kind"),
    (["loss.weight_schedule.preset=zipf"], "loss.weight_schedule.preset"),
    (["loss.weight_schedule.to_weights=[1,0.1]"], "loss.weight_schedule.to_weights has 2 entries"),
    (["loss.head_weights=[1,1,1,1]", "loss.weight_schedule.kind=step"], "not both"),
    (["loss.curriculum=sideways"], "loss.curriculum"),
    (["loss.curriculum=forward", "loss.curriculum_steps=[10,20]"], "needs n_future - 1 = 3"),
    (["loss.curriculum=forward", "loss.curriculum_steps=[10,5,20]"], "strictly increasing"),
    (["loss.curriculum=reverse", "model.n_future=1"], "needs model.n_future >= 2"),
])
def test_bad_settings_are_refused_by_name(overrides, match):
    with pytest.raises(ValueError, match=match):
        compose_job_config(["model.n_future=4"] + overrides)


# --- a zero-weight head costs nothing and changes nothing --------------------------------------------
def pair(head_type: str) -> tuple[MTPTransformer, MTPTransformer]:
    """An n=4 model and an n=1 model holding the same embedding, trunk, head 1 and unembedding."""
    shape = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, head_type=head_type, max_seq_len=64)
    torch.manual_seed(0)
    big = MTPTransformer(ModelConfig(n_future=4, **shape)).float()
    one = MTPTransformer(ModelConfig(n_future=1, **shape)).float()
    missing, unexpected = one.load_state_dict(big.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith(("heads.1.", "heads.2.", "heads.3.")) for k in unexpected)
    return big, one


def grads_of(fn, model, tokens, weights) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = fn(model, tokens, weights=weights)
    return out.per_head, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head_type", ["transformer", "linear", "causal"])
@pytest.mark.parametrize("fn", [head_sequential_loss, naive_loss], ids=["head_sequential", "naive"])
def test_forward_curriculum_start_has_the_gradients_of_an_n1_model(fn, head_type):
    big, one = pair(head_type)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(1))
    weights = schedule(curriculum="forward", curriculum_steps=[5, 10, 20]).weights(0, 0)
    assert weights == [1.0, 0.0, 0.0, 0.0]
    calls = []
    for i in (2, 3, 4):  # a skipped head runs no forward at all
        big.heads[i - 1].register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    per_head, grads = grads_of(fn, big, tokens[:, :16 + 1], weights)
    ref_head, ref = grads_of(fn, one, tokens[:, :16 + 1], [1.0])
    assert calls == []
    assert torch.equal(per_head[0], ref_head[0]) and all(torch.isnan(l) for l in per_head[1:])
    assert sorted(grads) == sorted(ref) and len(ref) > 10  # heads 2..4: no gradient, not even zeros
    for name in ref:
        assert torch.equal(grads[name], ref[name]), name


def test_zero_weight_chained_head_before_a_weighted_one_still_runs():
    """Causal heads read the previous head's state: a zero-weight head followed by a weighted one
    must run (its parameters get the gradient flowing back from the later head)."""
    big, _ = pair("causal")
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    for fn in (head_sequential_loss, naive_loss):
        per_head, grads = grads_of(fn, big, tokens, [1.0, 0.0, 1.0, 0.0])
        assert torch.isfinite(per_head[1]) and torch.isnan(per_head[3])
        assert grads["heads.1.fuse.weight"].abs().sum() > 0 and not any(n.startswith("heads.3.") for n in grads)


# --- in the trainer: logged weights, skipped heads, exact resume --------------------------------------
def test_curriculum_and_schedule_log_their_weights_and_resume_exactly(train_overrides, tmp_path):
    ov = train_overrides + ["train.max_steps=8", "loss.curriculum=forward", "loss.curriculum_steps=[2,3,6]",
                            "loss.weight_schedule.kind=linear", "loss.weight_schedule.unit=tokens",
                            "loss.weight_schedule.begin=256", "loss.weight_schedule.end=768",
                            "loss.weight_schedule.from_scale=0.3", "loss.weight_schedule.to_scale=0.1"]
    code, records = run_inprocess(ov, tmp_path / "full")
    assert code == 0
    train = {s: r for s, (r,) in train_records(records).items()}
    assert sorted(train) == list(range(1, 9))
    # 128 tokens per step: step s (1-based) trained on weights at tokens (s-1)*128
    for s, r in train.items():
        scale = 0.3 + (0.1 - 0.3) * min(1.0, max(0.0, ((s - 1) * 128 - 256) / 512))
        on = 1 + sum(s - 1 >= b for b in (2, 3, 6))
        expected = [1.0] + [scale if i < on else 0.0 for i in range(1, 4)]
        assert [r[f"loss/weight/head_{i}"] for i in range(1, 5)] == pytest.approx(expected, abs=1e-12), s
        assert [f"loss/head_{i}" in r for i in range(1, 5)] == [i < on for i in range(4)], s
        assert r["loss"] == pytest.approx(sum(w * r[f"loss/head_{i + 1}"] for i, w in enumerate(expected) if w))
    val = [r for r in records if "val/loss" in r]  # validation still measures every head
    assert val and all(f"val/loss/head_{i}" in r for r in val for i in range(1, 5))

    resumed = tmp_path / "resumed"
    code, again = run_inprocess(ov + [f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step-00000004'}",
                                      f"checkpoint.dir={resumed / 'checkpoints'}"], resumed)
    assert code == 0
    after = {s: r for s, (r,) in train_records(again).items()}
    assert sorted(after) == [5, 6, 7, 8]
    keys = ["loss", "grad_norm"] + [k for k in train[8] if k.startswith("loss/")]
    for s in after:
        assert {k: after[s].get(k) for k in keys} == {k: train[s].get(k) for k in keys}, s


# --- heads-only training (train.freeze=trunk) ----------------------------------------------------------
FROZEN = ("tok_embeddings.", "trunk.", "heads.0.", "unembed.")


def initial_weights(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The weights the trainer starts from (it seeds with train.seed before building the model)."""
    cfg = compose_job_config(overrides)
    torch.manual_seed(cfg.train.seed)
    return MTPTransformer(cfg.model).state_dict()


def assert_heads_only_checkpoint(ckpt, start: dict[str, torch.Tensor]) -> None:
    """Frozen tensors bit-identical to the start, every other one changed; optimizer state for
    the trained parameters only."""
    from torch.distributed.checkpoint import FileSystemReader

    from mtp_pretrain.checkpoint_reader import read_model_config, read_state_dict

    sd = read_state_dict(ckpt, read_model_config(ckpt))
    frozen = [k for k in start if k.startswith(FROZEN)]
    trained = [k for k in start if not k.startswith(FROZEN)]
    assert len(frozen) > 10 and len(trained) > 10
    for k in frozen:
        assert torch.equal(sd[k], start[k]), f"frozen {k} changed"
    for k in trained:
        assert not torch.equal(sd[k], start[k]), f"trained {k} did not change"
    keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    optim = {k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}
    assert optim == set(trained)


def test_heads_only_one_process_keeps_the_next_token_path_bit_identical(train_overrides, tmp_path):
    ov = train_overrides + ["train.freeze=trunk", "train.max_steps=8"]
    code, records = run_inprocess(ov, tmp_path / "run")
    assert code == 0
    assert_heads_only_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000008", initial_weights(ov))
    assert_heads_only_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000004", initial_weights(ov))
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [4, 8]
    # same validation batches, frozen next-token path: head 1's loss is bitwise the same, the others move
    assert val[0]["val/loss/head_1"] == val[1]["val/loss/head_1"]
    assert all(val[0][f"val/loss/head_{i}"] != val[1][f"val/loss/head_{i}"] for i in (2, 3, 4))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_heads_only_two_ranks(strategy, train_overrides, tmp_path):
    from conftest import run_cli

    ov = train_overrides + ["train.freeze=trunk", "train.max_steps=4", f"parallel={strategy}",
                            "logging.val_interval=4", "logging.decode_prompts=2", "logging.decode_new_tokens=8"]
    p = run_cli(ov, tmp_path / "run", nproc=2)
    assert f"strategy={strategy} world_size=2" in p.stdout and "train.freeze=trunk" in p.stdout
    assert_heads_only_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000004", initial_weights(ov))
    # validation decoding runs under both (fsdp: on a copy gathered to rank 0)
    (val,) = [r for r in read_metrics(tmp_path / "run") if "val/loss" in r]
    assert val["val/accept_per_forward"] >= 1 and "val/accept_rate/pos_3" in val and "val/acc/head_4" in val


@pytest.mark.parametrize("strategy", ["deepspeed", "megatron", "tp", "fsdp_tp"])
def test_heads_only_and_curriculum_refused_where_unsupported(strategy):
    with pytest.raises(ValueError, match=f"train.freeze=trunk is not supported with parallel.strategy={strategy}"):
        compose_job_config(["train.freeze=trunk", f"parallel={strategy}"])
    if strategy in ("deepspeed", "megatron"):
        with pytest.raises(ValueError, match=f"loss.curriculum=forward is not supported with parallel.strategy="
                                             f"{strategy}"):
            compose_job_config(["loss.curriculum=forward", f"parallel={strategy}"])


def test_freeze_needs_extra_heads():
    with pytest.raises(ValueError, match="train.freeze=trunk trains heads 2..n only"):
        compose_job_config(["model.n_future=1", "train.freeze=trunk"])
    with pytest.raises(ValueError, match="train.freeze"):
        compose_job_config(["train.freeze=everything"])


def test_hf_llama_heads_only_exports_the_original_next_token_model(tmp_path):
    """init_from_hf + freeze=trunk: self-speculative heads are added to a Llama; the Llama
    exported from the trained checkpoint is the original, tensor for tensor."""
    transformers = pytest.importorskip("transformers")
    from test_hf_interop import VOCAB as HF_VOCAB
    from test_hf_interop import random_tokens, tiny_llama

    from mtp_pretrain.config import (CheckpointConfig, DataConfig, DataSourceConfig, JobConfig, LoggingConfig,
                                     OptimConfig, TrainConfig, WandbConfig)
    from mtp_pretrain.data.synthetic import write_random_dataset
    from mtp_pretrain.interop.hf import SIDE_WEIGHTS, export_hf, model_config_from_hf
    from mtp_pretrain.train import Trainer

    hf, path = tiny_llama(tmp_path, vocab_size=HF_VOCAB)
    data = tmp_path / "data"
    write_random_dataset(data, {"train": 20_000, "val": 2_000}, doc_len=100)
    job = JobConfig(
        model=model_config_from_hf(path, n_future=3),
        data=DataConfig(sources=[DataSourceConfig(path=str(data))], seq_len=32, prefetch=0),
        optim=OptimConfig(lr=1e-2, warmup_steps=0),
        train=TrainConfig(max_steps=3, micro_batch_size=2, resume="never", init_from_hf=str(path),
                          device="cpu", dtype="float32", freeze="trunk"),
        checkpoint=CheckpointConfig(dir=str(tmp_path / "ckpt"), interval=0),
        logging=LoggingConfig(interval=1, val_interval=0, wandb=WandbConfig(mode="disabled")))
    trainer = Trainer(job, tmp_path / "run")
    try:
        start_heads = {k: v.clone() for k, v in trainer.model.heads[1:].state_dict().items()}
        assert trainer.train() == 0
        assert any(not torch.equal(v, trainer.model.heads[1:].state_dict()[k]) for k, v in start_heads.items())
    finally:
        trainer.close()
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf_heads")
    assert (out / SIDE_WEIGHTS).is_file()  # the trained heads travel in the side file
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    original = hf.state_dict()
    assert exported.state_dict().keys() == original.keys()
    for k, v in exported.state_dict().items():
        assert torch.equal(v, original[k]), k
    x = random_tokens(2, 30, vocab=HF_VOCAB)
    with torch.no_grad():
        assert torch.equal(exported(x).logits, hf(x).logits)


# --- one shared module for heads 2..n (model.share_extra_heads) ---------------------------------------
def shared_pair() -> tuple[MTPTransformer, MTPTransformer]:
    """A causal n=4 model with heads 2..4 shared, and an unshared copy holding the same values."""
    shape = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, head_type="causal", max_seq_len=64, n_future=4)
    torch.manual_seed(0)
    shared = MTPTransformer(ModelConfig(share_extra_heads=True, **shape)).float()
    plain = MTPTransformer(ModelConfig(**shape)).float()
    plain.load_state_dict(shared.state_dict())
    return shared, plain


def test_shared_extra_heads_are_one_set_of_parameters():
    from mtp_pretrain.model.config import count_parameters

    shared, plain = shared_pair()
    for (name, a), b, c in zip(shared.heads[1].named_parameters(), shared.heads[2].parameters(),
                               shared.heads[3].parameters()):
        assert a is b is c, name
    assert shared.heads[1].blocks[0].attn.layer_id != shared.heads[2].blocks[0].attn.layer_id  # own cache slots
    n_shared = sum(p.numel() for p in shared.parameters())
    assert n_shared == count_parameters(shared.cfg)["total"]
    per_head = sum(p.numel() for p in plain.heads[1].parameters())
    assert sum(p.numel() for p in plain.parameters()) - n_shared == 2 * per_head
    with pytest.raises(ValueError, match="model.share_extra_heads needs head_type=causal"):
        ModelConfig(share_extra_heads=True, head_type="transformer", n_future=3)
    with pytest.raises(ValueError, match="model.share_extra_heads is not supported with parallel.strategy=fsdp"):
        compose_job_config(["model.head_type=causal", "model.share_extra_heads=true", "parallel=fsdp"])


@pytest.mark.parametrize("fn", [head_sequential_loss, naive_loss], ids=["head_sequential", "naive"])
def test_shared_head_gradient_is_the_sum_over_its_depths(fn):
    shared, plain = shared_pair()
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(3))
    loss_s, g_shared = grads_of(fn, shared, tokens, [1.0, 0.5, 0.3, 0.2])
    loss_p, g_plain = grads_of(fn, plain, tokens, [1.0, 0.5, 0.3, 0.2])
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(loss_s, loss_p))
    assert not any(k.startswith(("heads.2.", "heads.3.")) for k in g_shared)  # one parameter, one .grad
    names = [k for k in g_shared if k.startswith("heads.1.")]
    assert len(names) > 5
    for k in names:
        expected = sum(g_plain[k.replace("heads.1.", f"heads.{d}.", 1)] for d in (1, 2, 3))
        assert torch.allclose(g_shared[k], expected, rtol=1e-5, atol=1e-7), k
    for k in g_plain:
        if not k.startswith("heads."):
            assert torch.allclose(g_shared[k], g_plain[k], rtol=1e-5, atol=1e-7), k


def test_shared_heads_decode_with_their_own_cache_slots():
    """Self-speculative decoding with the shared head at three depths equals the uncached
    greedy reference, and its drafts equal an uncached forward's (cache slots not mixed up)."""
    from test_inference import full_recompute_greedy, ragged_prompts, random_model

    from mtp_pretrain.inference import generate

    model = random_model("causal", n=4, logit_scale=40.0, share_extra_heads=True)
    assert model.heads[2].fuse.weight is model.heads[3].fuse.weight
    prompts = ragged_prompts(4)
    out = generate(model, prompts, mode="self_speculative", max_new_tokens=16)
    assert out.tokens == [full_recompute_greedy(model, p, 16) for p in prompts]
    assert out.stats.accepted_per_forward > 0


def test_shared_heads_train_and_resume_exactly(train_overrides, tmp_path):
    ov = train_overrides + ["train.max_steps=6", "model.head_type=causal", "model.share_extra_heads=true",
                            "logging.val_interval=0"]
    code, records = run_inprocess(ov, tmp_path / "full")
    assert code == 0
    resumed = tmp_path / "resumed"
    code, again = run_inprocess(ov + [f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step-00000004'}",
                                      f"checkpoint.dir={resumed / 'checkpoints'}"], resumed)
    assert code == 0
    full, after = train_records(records), train_records(again)
    assert sorted(after) == [5, 6]
    for s in (5, 6):
        assert [after[s][0][k] for k in ("loss", "grad_norm")] == [full[s][0][k] for k in ("loss", "grad_norm")]


# --- decoding measured during validation -------------------------------------------------------------
def test_validation_decoding_equals_mtp_generate(tmp_path, capsys):
    """The logged val/accept_per_forward and val/accept_rate/pos_k are what mtp-generate
    --mode self_speculative --num-drafts n-1 --no-eos reports for the same checkpoint, prompts
    and token budget. Data of three token ids: after a few steps the heads predict those, so
    drafts are accepted about a third of the time (not a degenerate 0 or 1)."""
    import json
    import shutil

    from conftest import tiny_overrides
    from mtp_pretrain.checkpoint_reader import TRAIN_STATE
    from mtp_pretrain.data.synthetic import write_random_dataset
    from mtp_pretrain.inference.cli import main as mtp_generate

    data = []
    for i, name in enumerate(("x", "y")):
        write_random_dataset(tmp_path / name, {"train": 20_000, "val": 4_000}, high=3, doc_len=300, seed=i)
        data.append(tmp_path / name)
    run = tmp_path / "run"
    ov = tiny_overrides(data) + ["train.max_steps=8", "logging.val_interval=8", "logging.decode_prompts=3",
                                 "logging.decode_new_tokens=20", "logging.decode_prompt_tokens=12"]
    code, records = run_inprocess(ov, run)
    assert code == 0
    (val,) = [r for r in records if "val/accept_per_forward" in r]
    assert val["step"] == 8 and 1.1 < val["val/accept_per_forward"] < 4
    assert all(0 < val[f"val/acc/head_{i}"] <= 1 for i in range(1, 5)) and val["val/decode_s"] > 0
    spec = json.loads((run / "decode_prompts.json").read_text())
    assert spec["num_drafts"] == 3 and spec["max_new_tokens"] == 20 and sorted(spec["prompts"]) == ["x", "y"]

    # The same checkpoint, with no data source named: mtp-generate then reads prompts as token ids.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run / "checkpoints" / "step-00000008", ckpt)
    state = json.loads((ckpt / TRAIN_STATE).read_text())
    (ckpt / TRAIN_STATE).write_text(json.dumps(state | {"data_sources": []}))
    prompts = [p for source in ("x", "y") for p in spec["prompts"][source]]  # the trainer's order
    assert len(prompts) == 6 and all(len(p) == 12 for p in prompts)
    capsys.readouterr()
    mtp_generate([str(ckpt), "--mode", "self_speculative", "--num-drafts", "3", "--no-eos",
                  "--max-new-tokens", "20", "--batch-size", "6", "--json"]
                 + [a for p in prompts for a in ("--prompt", ",".join(map(str, p)))])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 6 and lines[0]["run"]["tokens_generated"] == 6 * 20
    assert lines[0]["run"]["accepted_per_forward"] == round(val["val/accept_per_forward"], 4)
    for source, rows in (("x", lines[:3]), ("y", lines[3:])):
        tokens = sum(line["stats"]["tokens_generated"] for line in rows)
        passes = sum(line["stats"]["forward_passes"] for line in rows)
        assert val[f"val/accept_per_forward/{source}"] == tokens / passes
    tokens = sum(line["stats"]["tokens_generated"] for line in lines)
    assert val["val/accept_per_forward"] == tokens / sum(line["stats"]["forward_passes"] for line in lines)
    # unconditional rates: a draft behind a rejected one is not accepted, so they cannot rise with k
    rates = [val[f"val/accept_rate/pos_{k}"] for k in (1, 2, 3)]
    assert 0 < rates[0] <= 1 and rates[0] >= rates[1] >= rates[2]


@pytest.mark.parametrize("head_type", ["transformer", "linear", "causal"])
def test_frozen_next_token_path_gets_no_gradient_in_either_loss(head_type):
    from mtp_pretrain.train import freeze_next_token_path

    big, _ = pair(head_type)
    freeze_next_token_path(big)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=torch.Generator().manual_seed(4))
    seq_loss, seq = grads_of(head_sequential_loss, big, tokens, [1.0, 1.0, 0.5, 0.25])
    ref_loss, ref = grads_of(naive_loss, big, tokens, [1.0, 1.0, 0.5, 0.25])
    trained = sorted(n for n, p in big.named_parameters() if p.requires_grad)
    assert trained and all(n.startswith(("heads.1.", "heads.2.", "heads.3.")) for n in trained)
    assert sorted(seq) == sorted(ref) == trained
    assert all(torch.isfinite(l) for l in seq_loss)  # head 1 still reports its loss
    for n in trained:
        assert torch.allclose(seq[n], ref[n], rtol=1e-5, atol=1e-7), n
