"""parallel.strategy=megatron: parity with one process, ZeRO-1/2 through DeepSpeed, checkpoints
across strategies, and refusals of bad set-ups.

Every run trains the tiny n=4 model of conftest for 8 steps (checkpoints at steps 5 and 8) on the
same global batch as the single-process reference: 4 sequences per step -- micro-batch 4 at
dp=1 (TP=2 on 2 ranks), 2 per rank at dp=2 (TP=2 x DP=2 on 4 ranks), 1 per rank with two
accumulated micro-batches for ZeRO-2 (its deferred reductions). The multi-rank runs share one
torchrun per world size (tests/parallel_worker.py, several runs in one process group).

Every parity check compares per-step losses, per-step pre-clip gradient norms (relative) and
parameters; clipping is off and AdamW's eps is 1e-3 so that the gradient's scale reaches the
parameters (see tests/test_parallel.py). The model shapes of ``MG_SHAPES`` (tied embeddings with
causal heads and the chunked cross-entropy, linear heads with n=1 and activation checkpointing,
``match_baseline_params``) run at TP=2 against one process of the same shape, and a run whose loss
reads NaN at step 3 must skip that update under plain DP and under ZeRO-2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import launch_worker, run_inprocess, tiny_overrides

from mtp_pretrain.metrics import last_per_step, read_metrics

STEPS, SAVE_AT, TOL = 8, 5, 1e-4
MG = ["parallel=megatron", "parallel.tp_size=2"]
NONFINITE_AT = [3]
MG_SHAPES = {
    "tied_causal_chunked": ["model.tie_embeddings=true", "model.head_type=causal", "model.n_future=2",
                            "loss.chunk_size=40"],
    "linear_n1_ac": ["model.head_type=linear", "model.n_future=1", "parallel.activation_checkpointing=full"],
    "matched_n2": ["model.match_baseline_params=true", "model.n_future=2"],
}


def base(dataset) -> list[str]:
    return tiny_overrides(dataset) + [f"train.max_steps={STEPS}", f"checkpoint.interval={SAVE_AT}",
                                      "logging.val_interval=0", "optim.grad_clip=0", "optim.eps=1e-3"]


def _records(run_dir: Path) -> dict[int, dict]:
    return last_per_step(read_metrics(run_dir))


def losses(run_dir: Path) -> dict[int, float]:
    return {s: r["loss"] for s, r in _records(run_dir).items()}


def assert_close_steps(run_dir: Path, ref_dir: Path, steps) -> None:
    """Per-step losses and pre-clip gradient norms (relative) of two runs agree; a skipped step
    (NaN loss in both) may report a non-finite norm (DeepSpeed's for the gradients it discarded)."""
    got, ref = _records(run_dir), _records(ref_dir)
    steps = list(steps)
    assert sorted(got) == steps, f"steps {sorted(got)}, expected {steps}"
    for s in steps:
        g, r = got[s], ref[s]
        if math.isnan(r["loss"]):
            assert math.isnan(g["loss"]), f"step {s}: loss {g['loss']}, the reference skipped it"
            continue
        assert abs(g["loss"] - r["loss"]) < TOL, f"step {s}: loss {g['loss']} vs {r['loss']}"
        assert abs(g["grad_norm"] - r["grad_norm"]) < TOL * max(1.0, r["grad_norm"]), \
            f"step {s}: gradient norm {g['grad_norm']} vs {r['grad_norm']}"
        assert g["nonfinite_skipped"] == r["nonfinite_skipped"], s


def full_model(ckpt: Path) -> dict[str, torch.Tensor]:
    """The plain-FQN model tensors of a DCP checkpoint, read in this (single) process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / f"{ckpt.name}.pt"
    if not out.exists():
        dcp_to_torch_save(str(ckpt), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in sd["model"].items()}


def ckpt(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def assert_close_params(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), set(a) ^ set(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < TOL, f"parameters differ by {worst:.2e}"


# --- runs (module-scoped: one reference, one torchrun per world size) ---------------------------
@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("megatron")


@pytest.fixture(scope="module")
def ref(tiny_dataset, out) -> Path:
    run_dir = out / "ref"
    code, _ = run_inprocess(base(tiny_dataset), run_dir)
    assert code == 0
    return run_dir


@pytest.fixture(scope="module")
def shape_refs(tiny_dataset, out) -> Path:
    """One process: each of MG_SHAPES, and the run whose loss reads NaN at step 3."""
    b = base(tiny_dataset)
    o = out / "shape_refs"
    launch_worker(o, 1, [{"name": k, "overrides": b + v} for k, v in MG_SHAPES.items()]
                  + [{"name": "nonfinite", "overrides": b, "nonfinite_loss_at": NONFINITE_AT}])
    return o


@pytest.fixture(scope="module")
def two_ranks(tiny_dataset, out) -> Path:
    """megatron TP=2 (head-sequential, naive); fsdp; resumes across strategies."""
    b = base(tiny_dataset)
    o = out / "two"
    mg_ckpt = ckpt(o / "mg_hs", SAVE_AT)
    runs = [
        {"name": "mg_hs", "overrides": b + MG},
        {"name": "mg_naive", "overrides": b + MG + ["loss.impl=naive"]},
        {"name": "tp_from_mg", "overrides": b + ["parallel=tp", f"train.resume={mg_ckpt}"]},
        {"name": "fsdp", "overrides": b + ["parallel=fsdp", "train.micro_batch_size=2"]},
        {"name": "mg_from_fsdp", "overrides": b + MG + [f"train.resume={ckpt(o / 'fsdp', SAVE_AT)}"]},
        {"name": "mg_nonfinite", "overrides": b + MG, "nonfinite_loss_at": NONFINITE_AT},
    ] + [{"name": f"mg_{k}", "overrides": b + MG + v} for k, v in MG_SHAPES.items()]
    launch_worker(o, 2, runs)
    return o


@pytest.fixture(scope="module")
def four_ranks(tiny_dataset, out) -> Path:
    """TP=2 x DP=2 with DeepSpeed ZeRO-1 and ZeRO-2 over megatron's DP group."""
    b = base(tiny_dataset)
    o = out / "four"
    runs = [
        {"name": "zero1", "overrides": b + MG + ["parallel.zero_stage=1", "train.micro_batch_size=2"]},
        {"name": "zero2_accum", "overrides": b + MG + ["parallel.zero_stage=2", "train.micro_batch_size=1",
                                                       "train.global_batch_tokens=128"]},
        {"name": "zero2_naive", "overrides": b + MG + ["parallel.zero_stage=2", "train.micro_batch_size=2",
                                                       "loss.impl=naive"]},
        {"name": "zero2_nonfinite", "overrides": b + MG + ["parallel.zero_stage=2", "train.micro_batch_size=2"],
         "nonfinite_loss_at": NONFINITE_AT},
    ]
    launch_worker(o, 4, runs)
    return o


# --- parity -------------------------------------------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["mg_hs", "mg_naive"])
def test_tp2_parity_with_one_process(ref, two_ranks, name):
    assert_close_steps(two_ranks / name, ref, range(1, STEPS + 1))
    assert_close_params(full_model(ckpt(two_ranks / name, SAVE_AT)), full_model(ckpt(ref, SAVE_AT)))
    assert_close_params(full_model(ckpt(two_ranks / name, STEPS)), full_model(ckpt(ref, STEPS)))


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["zero1", "zero2_accum", "zero2_naive"])
def test_tp2_dp2_zero_parity_with_one_process(ref, four_ranks, name):
    assert_close_steps(four_ranks / name, ref, range(1, STEPS + 1))
    assert_close_params(full_model(ckpt(four_ranks / name, SAVE_AT)), full_model(ckpt(ref, SAVE_AT)))
    assert json.loads((four_ranks / name / "result.json").read_text())["world_size"] == 4


@pytest.mark.distributed
@pytest.mark.parametrize("shape", list(MG_SHAPES))
def test_tp2_model_shapes_match_one_process(shape_refs, two_ranks, shape):
    assert_close_steps(two_ranks / f"mg_{shape}", shape_refs / shape, range(1, STEPS + 1))
    assert_close_params(full_model(ckpt(two_ranks / f"mg_{shape}", STEPS)), full_model(ckpt(shape_refs / shape, STEPS)))


@pytest.mark.distributed
@pytest.mark.parametrize("run", ["two/mg_nonfinite", "four/zero2_nonfinite"])
def test_nonfinite_loss_step_is_skipped(shape_refs, out, run, two_ranks, four_ranks):
    """The loss reads NaN at step 3 (gradients finite): plain DP x TP and ZeRO-2 skip that update
    and continue on the one-process numbers."""
    got = _records(out / run)
    assert [s for s, r in got.items() if math.isnan(r["loss"])] == NONFINITE_AT
    assert got[STEPS]["nonfinite_skipped"] == len(NONFINITE_AT)
    assert_close_steps(out / run, shape_refs / "nonfinite", range(1, STEPS + 1))
    assert_close_params(full_model(ckpt(out / run, STEPS)), full_model(ckpt(shape_refs / "nonfinite", STEPS)))


@pytest.mark.distributed
def test_head_sequential_and_naive_agree(two_ranks, four_ranks):
    hs, nv = losses(two_ranks / "mg_hs"), losses(two_ranks / "mg_naive")
    assert max(abs(hs[s] - nv[s]) for s in hs) < TOL
    z_hs, z_nv = losses(four_ranks / "zero2_accum"), losses(four_ranks / "zero2_naive")
    assert max(abs(z_hs[s] - z_nv[s]) for s in z_hs) < TOL


# --- checkpoints across strategies ------------------------------------------------------------
@pytest.mark.distributed
def test_checkpoint_megatron_to_one_process(ref, two_ranks, tiny_dataset, out):
    run_dir = out / "none_from_mg"
    code, _ = run_inprocess(base(tiny_dataset) + [f"train.resume={ckpt(two_ranks / 'mg_hs', SAVE_AT)}"], run_dir)
    assert code == 0
    assert_close_steps(run_dir, ref, range(SAVE_AT + 1, STEPS + 1))


@pytest.mark.distributed
def test_checkpoint_megatron_to_tp(ref, two_ranks):
    assert_close_steps(two_ranks / "tp_from_mg", ref, range(SAVE_AT + 1, STEPS + 1))


@pytest.mark.distributed
def test_checkpoint_fsdp_to_megatron(ref, two_ranks):
    assert_close_steps(two_ranks / "fsdp", ref, range(1, STEPS + 1))
    assert_close_steps(two_ranks / "mg_from_fsdp", ref, range(SAVE_AT + 1, STEPS + 1))


@pytest.mark.distributed
def test_checkpoint_is_plain_layout(ref, two_ranks):
    """Same keys and full shapes as a single-process checkpoint: no shard, no _extra_state."""
    mg, plain = full_model(ckpt(two_ranks / "mg_hs", SAVE_AT)), full_model(ckpt(ref, SAVE_AT))
    assert {k: tuple(v.shape) for k, v in mg.items()} == {k: tuple(v.shape) for k, v in plain.items()}


# --- one process (no torchrun): ZeRO's hooks, deferral and checkpoint mapping at TP=1, DP=1 ------
def test_one_process_zero2_accumulation_and_resume_across(ref, tiny_dataset, out):
    """ZeRO-2 with two accumulated micro-batches (every reduction held back to the last one),
    then a ZeRO-1 run resumed from the single-process checkpoint and a plain run resumed from the
    ZeRO-2 checkpoint: all on the reference's numbers."""
    b = base(tiny_dataset) + ["parallel=megatron", "parallel.tp_size=1"]
    z2 = out / "one_zero2"
    assert run_inprocess(b + ["parallel.zero_stage=2", "train.micro_batch_size=2",
                              "train.global_batch_tokens=128"], z2)[0] == 0
    assert_close_steps(z2, ref, range(1, STEPS + 1))
    z1 = out / "one_zero1_from_ref"
    assert run_inprocess(b + ["parallel.zero_stage=1", f"train.resume={ckpt(ref, SAVE_AT)}"], z1)[0] == 0
    assert_close_steps(z1, ref, range(SAVE_AT + 1, STEPS + 1))
    plain = out / "one_none_from_zero2"
    assert run_inprocess(base(tiny_dataset) + [f"train.resume={ckpt(z2, SAVE_AT)}"], plain)[0] == 0
    assert_close_steps(plain, ref, range(SAVE_AT + 1, STEPS + 1))
    assert_close_params(full_model(ckpt(z2, STEPS)), full_model(ckpt(ref, STEPS)))


# --- bad set-ups --------------------------------------------------------------------------------
def _strategy(world_size=2, **kw):
    from mtp_pretrain.config import ParallelConfig
    from mtp_pretrain.parallel import build_strategy
    from mtp_pretrain.parallel.setup import DistEnv

    cfg = ParallelConfig(strategy="megatron", **kw)
    return build_strategy(cfg, DistEnv(0, world_size, 0, torch.device("cpu"), "gloo"))


def _model_cfg(**kw):
    from mtp_pretrain.model.config import ModelConfig

    base_kw = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_future=4, max_seq_len=128)
    fields = ModelConfig.__dataclass_fields__
    return ModelConfig(**{k: v for k, v in {**base_kw, **kw}.items() if k in fields})


def test_refuses_world_size_not_divisible():
    with pytest.raises(ValueError, match=r"world size 3 is not divisible by parallel.tp_size=2"):
        _strategy(world_size=3, tp_size=2).validate(_model_cfg())


@pytest.mark.parametrize("field,value,extra", [("n_heads", 6, {"dim": 96}), ("n_kv_heads", 2, {}),
                                               ("ffn_dim", 170, {}), ("vocab_size", 322, {})])
def test_refuses_tp_not_dividing_model(field, value, extra):
    from mtp_pretrain.parallel.tp_plan import TP_DIVISIBLE

    assert [f for f, _ in TP_DIVISIBLE] == ["n_heads", "n_kv_heads", "ffn_dim", "vocab_size"]
    cfg = _model_cfg(**{field: value}, **extra)
    with pytest.raises(ValueError, match=rf"parallel.tp_size=4 does not divide model.{field}={value}"):
        _strategy(world_size=4, tp_size=4).validate(cfg)


@pytest.mark.parametrize("stage", [3, -1])
def test_refuses_zero_stage(stage):
    with pytest.raises(ValueError, match=rf"parallel.zero_stage={stage}"):
        _strategy(tp_size=2, zero_stage=stage)


def test_refuses_without_megatron_core(monkeypatch):
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(RuntimeError, match=r"parallel.strategy=megatron needs megatron-core"):
        _strategy(tp_size=2)


def test_fails_at_start_in_the_trainer(tiny_dataset, tmp_path):
    """One process asked for TP=2: the Trainer stops before building anything."""
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by parallel.tp_size=2"):
        run_inprocess(base(tiny_dataset) + MG, tmp_path / "run")
