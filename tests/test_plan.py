"""mtp-plan: the fake step's per-rank memory against the same step measured for real.

The prediction (``plan_step``: FakeTensorMode, fake process group) and the measurement
(``measure_step``: real tensors, the CPU allocator's running total from torch's profiler) are
two independent counts of one job's step; on one CPU process they agree to the byte
(bench.plan_accuracy covers FSDP, DDP and TP on 2 ranks, with a stated 20 % floor).
"""

from __future__ import annotations

import json

import pytest
import torch

from mtp_pretrain.config import compose_job_config
from mtp_pretrain.parallel.setup import DistEnv
from mtp_pretrain.plan import (GPU_TYPES, RESERVED_GIB, largest_micro_batch, main, measure_step, parse_args,
                               plan_step, usable_bytes, with_micro_batch)

TINY = ["model=tiny", "parallel=none", "data.seq_len=64", "train.micro_batch_size=2", "train.dtype=float32",
        "logging=quiet"]
STATED_ERROR = 0.05  # one process, float32: the bench measured 0.0 %


def one_process() -> DistEnv:
    return DistEnv(0, 1, 0, torch.device("cpu"), "gloo")


@pytest.mark.parametrize("extra", [[], ["loss.impl=naive"],
                                   ["loss.chunk_size=32", "parallel.activation_checkpointing=full"]],
                         ids=["head_sequential", "naive", "chunked_ac"])
def test_prediction_equals_measured_peak(extra):
    cfg = compose_job_config(TINY + extra)
    predicted = plan_step(cfg, 1, "cpu")
    measured = measure_step(cfg, one_process())
    print(f"\n{extra}: predicted {predicted.peak:,} B (before step {predicted.before_step:,}), "
          f"measured {measured['peak']:,} B (before step {measured['before_step']:,}); {predicted.breakdown}")
    assert measured["peak"] > measured["before_step"] > 0
    assert abs(predicted.peak - measured["peak"]) <= STATED_ERROR * measured["peak"]
    assert abs(predicted.before_step - measured["before_step"]) <= STATED_ERROR * measured["before_step"]


def test_kernel_temporaries_are_counted():
    # ATen's logsumexp holds an input-sized exp(x - max) that the fake kernel never allocates
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.profiler import ProfilerActivity, profile

    from mtp_pretrain.plan import LiveStorageBytes, _profiler_events, allocator_totals

    x = torch.randn(256, 4096)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.logsumexp(x, dim=-1)
    measured = max(total for _, total in allocator_totals(_profiler_events(prof)))
    with FakeTensorMode():
        fake_x = torch.empty(256, 4096)
        tracker = LiveStorageBytes(counted=lambda t: isinstance(t, FakeTensor))
        with tracker:
            torch.logsumexp(fake_x, dim=-1)
    assert measured >= x.numel() * 4
    assert abs(tracker.peak - measured) <= 4 * 256 * 4  # the kernel's [256] row maxima are not counted


def test_breakdown_names_what_is_alive():
    cfg = compose_job_config(TINY)
    mem = plan_step(cfg, 1, "cpu")
    bd = mem.breakdown
    n_params = sum(p.numel() for p in _meta_model(cfg).parameters())
    param_bytes = 4 * n_params
    print(f"\n{bd} params {param_bytes:,} B")
    # float32 parameters (+ the RoPE tables), AdamW's two moments of each (+ a scalar step counter each)
    rope = 2 * cfg.model.max_seq_len * (cfg.model.head_dim // 2) * 4
    assert bd["parameters"] == param_bytes + rope
    n_tensors = len(list(_meta_model(cfg).parameters()))
    assert 2 * param_bytes <= bd["optimizer"] <= 2 * param_bytes + 8 * n_tensors
    # one head's logits [B*T, V] in float32 at least, under the head-sequential loss
    assert bd["logits"] >= 2 * 64 * cfg.model.vocab_size * 4
    assert bd["activations"] > 0 and bd["gradients"] > 0
    assert sum(bd.values()) <= mem.peak <= sum(bd.values()) * 1.001


def test_naive_keeps_every_heads_logits_and_fsdp_shards_the_state():
    hs = plan_step(compose_job_config(TINY), 1, "cpu").breakdown
    naive = plan_step(compose_job_config(TINY + ["loss.impl=naive"]), 1, "cpu").breakdown
    one_head = 2 * 64 * 8192 * 4  # [B*T, V] float32
    # naive: every extra head keeps its log-probabilities for the one backward; head-sequential frees them
    assert naive["logits"] >= hs["logits"] + 3 * one_head
    fsdp = TINY[:1] + ["parallel=fsdp"] + TINY[2:]
    one = plan_step(compose_job_config(fsdp), 1, "cpu").before_step
    eight = plan_step(compose_job_config(fsdp), 8, "cpu").before_step
    assert eight < one / 4  # parameters and optimizer state split over 8 ranks


@pytest.mark.slow
def test_largest_micro_batch_fits_and_the_next_does_not():
    cfg = compose_job_config(TINY)
    measured = {}
    one = plan_step(with_micro_batch(cfg, 1), 1, "h100-80gb", 1)
    two = plan_step(with_micro_batch(cfg, 2), 1, "h100-80gb", 1)
    measured |= {1: one, 2: two}
    # a device on which about 5 micro-batches fit
    budget = one.predicted + 4.5 * (two.predicted - one.predicted)
    memory_gib = RESERVED_GIB + budget * 1.10 / 2 ** 30
    best = largest_micro_batch(cfg, 1, "h100-80gb", memory_gib, 1, measured)
    assert best >= 2
    assert measured[best].predicted <= usable_bytes(memory_gib) < measured[best + 1].predicted


def test_cli_reports_one_json_line(capsys):
    assert main(["model=tiny", "parallel=fsdp", "data.seq_len=64", "train.micro_batch_size=2",
                 "--world-size", "4", "--device", "a100-40gb", "--no-search"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["world_size"] == 4 and result["device"] == "a100-40gb" and result["fits"] is True
    assert result["peak_gib"] > 0 and result["optimizer_gib"] >= 0
    assert "| this job |" in out


def test_cli_unknown_device_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["model=tiny", "--device", "h100-80"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--device 'h100-80' is not a known GPU type" in err
    assert all(name in err for name in GPU_TYPES)


def test_unplannable_strategy_is_refused():
    cfg = compose_job_config(["model=tiny", "parallel=deepspeed"])
    with pytest.raises(ValueError, match="parallel.strategy=deepspeed|deepspeed steps inside its own engine"):
        plan_step(cfg, 2)


def _meta_model(cfg):
    from mtp_pretrain.model import MTPTransformer

    with torch.device("meta"):
        return MTPTransformer(cfg.model)


def test_gpu_acceptance_cpu_path_lists_what_it_skipped():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-m", "bench.gpu_acceptance", "--quick",
                        "--only", "plan_vs_measured,mfu_1b,loss_memory_128k,vs_megatron"],
                       cwd=repo, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    if result["cuda"]:
        pytest.skip("this machine has CUDA: the GPU path ran instead")
    assert set(result["skipped"]) == {"mfu_1b", "loss_memory_128k", "vs_megatron"}
    assert all("needs CUDA" in why for why in result["skipped"].values())
    assert result["errors"] == {}
    plan = result["results"]["plan_vs_measured"]
    assert plan["measured_gib"] > 0 and abs(plan["rel_error"]) <= STATED_ERROR
    assert "skipped (needs CUDA" in p.stdout


# --- pipeline parallelism ---------------------------------------------------------------------
TINY_PP = ["model=tiny", "parallel=none", "parallel.pp_size=2", "data.seq_len=64", "train.micro_batch_size=2",
           "train.dtype=float32", "logging=quiet"]


def _pp(extra=(), micro_batches=4, strategy="none", dp=1, seq=64):
    """TINY_PP with ``micro_batches`` per step on ``dp`` data-parallel ranks per stage (``extra``
    setting data.seq_len to ``seq``)."""
    return compose_job_config([*TINY_PP, f"parallel={strategy}", *extra,
                               f"train.global_batch_tokens={seq * 2 * micro_batches * dp}"])


def test_pipeline_plan_splits_the_model_into_its_stages():
    from mtp_pretrain.plan import plan_job

    cfg = _pp()
    mem = plan_job(cfg, 2, "cpu")
    assert [(s.pp_rank, s.pipeline_stages, s.micro_batches) for s in mem.stages] == [(0, (0,), 4), (1, (1,), 4)]
    assert mem.predicted == max(s.predicted for s in mem.stages) and mem.pp_rank == 1  # the heads' stage
    # Parameters at the peak: exactly the stage's own modules (float32) and the RoPE tables; the
    # first stage has the embedding and blocks 0-1, the last blocks 2-3, the heads and the
    # unembedding (and the embedding matrix again where heads embed tokens or weights are tied).
    full = _meta_model(cfg)
    first = {"tok_embeddings.", "trunk.0.", "trunk.1."}
    last = {"trunk.2.", "trunk.3.", "heads.", "unembed."} | ({"tok_embeddings."} if full.heads_chain
                                                              or cfg.model.tie_embeddings else set())
    rope = 2 * cfg.model.max_seq_len * (cfg.model.head_dim // 2) * 4

    def param_bytes(prefixes):
        seen = {}
        for name, p in full.named_parameters(remove_duplicate=False):
            if any(name.startswith(x) for x in prefixes):
                seen[id(p)] = 4 * p.numel()
        return sum(seen.values())

    print(f"\nstage 0 {mem.stages[0].breakdown}\nstage 1 {mem.stages[1].breakdown}")
    assert mem.stages[0].breakdown["parameters"] == param_bytes(first) + rope
    assert mem.stages[1].breakdown["parameters"] == param_bytes(last) + rope
    # Only the last stage computes logits.
    assert mem.stages[0].breakdown["logits"] == 0 < mem.stages[1].breakdown["logits"]
    # pp rank r runs as the first global rank of its stage: with 2 data-parallel ranks, rank 2.
    fsdp = plan_job(_pp(strategy="fsdp", dp=2), 4, "cpu")
    assert [(s.pp_rank, s.pipeline_stages) for s in fsdp.stages] == [(0, (0,)), (1, (1,))]


def test_pipeline_schedules_hold_their_micro_batches_in_flight():
    # Stage 0 keeps each micro-batch's activations from its forward until its backward: under
    # gpipe all of the step's (all forwards first), under 1f1b at most pp_size of them.
    def stage0(schedule, m):
        mem = plan_step(_pp([f"parallel.pp_schedule={schedule}", "data.seq_len=256"], micro_batches=m, seq=256), 2,
                        "cpu")
        assert mem.pipeline_stages == (0,) and mem.micro_batches == m
        return mem.peak

    gpipe2, gpipe6 = stage0("gpipe", 2), stage0("gpipe", 6)
    f1b2, f1b6 = stage0("1f1b", 2), stage0("1f1b", 6)
    print(f"\nstage 0's peak: gpipe {gpipe2:,} -> {gpipe6:,} B, 1f1b {f1b2:,} -> {f1b6:,} B")
    # a micro-batch's saved activations include at least each of the stage's 2 blocks' output [B, T, dim]
    per_micro_batch = (gpipe6 - gpipe2) / 4
    assert per_micro_batch > 2 * 2 * 256 * 128 * 4
    # 1f1b: 4 more micro-batches cost less than one more in flight (their receive buffers for
    # the gradients, their inputs), where gpipe holds all 4 more
    assert f1b6 - f1b2 < 0.6 * per_micro_batch
    assert f1b2 == pytest.approx(gpipe2, rel=0.02)  # 2 micro-batches: both schedules hold both


def test_cli_reports_every_pipeline_rank(capsys):
    assert main([*TINY_PP, "parallel.pp_schedule=gpipe", "train.global_batch_tokens=256", "--world-size", "2",
                 "--no-search"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    ranks = result["pp_ranks"]
    assert [(r["pp_rank"], r["stages"]) for r in ranks] == [(0, [0]), (1, [1])]
    assert result["worst_pp_rank"] == 1 and result["peak_gib"] == max(r["peak_gib"] for r in ranks)
    assert result["pp_size"] == 2 and result["pp_schedule"] == "gpipe" and result["micro_batches"] == 2
    assert "| this job (worst: pp rank 1) |" in out and "| pp rank 0 (stage 0) |" in out


def test_pipeline_plan_refuses_what_it_cannot_plan():
    from mtp_pretrain.plan import plan_job

    with pytest.raises(ValueError, match="pp_size > 1 with parallel.strategy in .*not tp"):
        plan_job(compose_job_config([*TINY_PP, "parallel=tp"]), 4, "cpu")
    with pytest.raises(ValueError, match="--world-size 3 is not divisible by parallel.pp_size=2"):
        plan_job(_pp(), 3, "cpu")


@pytest.mark.slow
def test_pipeline_prediction_equals_measured_peak_per_stage(tmp_path):
    # Two real gloo ranks under torchrun run the same steps (bench.plan_accuracy's measure), 4
    # micro-batches each: 1f1b, and gpipe (stage 0 holds all 4 micro-batches' activations).
    from bench.plan_accuracy import measure
    from mtp_pretrain.plan import plan_job

    settings = {s: [*TINY_PP, f"parallel.pp_schedule={s}", "train.global_batch_tokens=512"] for s in ("1f1b", "gpipe")}
    measured = measure(2, settings, tmp_path)
    for schedule, overrides in settings.items():
        predicted = plan_job(compose_job_config(overrides), 2, "cpu")
        for stage, meas in zip(predicted.stages, measured[schedule], strict=True):
            print(f"\n{schedule} pp rank {stage.pp_rank}: predicted {stage.predicted:,} B, measured {meas['peak']:,} B")
            assert abs(stage.predicted - meas["peak"]) <= STATED_ERROR * meas["peak"]
        assert measured[schedule][1]["peak"] > 1.3 * measured[schedule][0]["peak"]  # the last stage's logits
