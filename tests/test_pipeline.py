"""Pipeline parallelism (``parallel.pp_size``) against one process, with the real Trainer under
torchrun (gloo, CPU), as ``test_parallel.py`` does for the other strategies.

Every run trains the tiny model 5 steps on the same global batch (``train.global_batch_tokens=512``:
4 micro-batches of 4 x 32 tokens, the pipeline's micro-batches) and is compared with the
one-process run of its model shape: per-step losses, per-step pre-clip gradient norms and the
parameters after 5 steps (read from its last checkpoint, written by every stage) within ``TOL``;
gradient clipping off and AdamW eps 1e-3 so the gradient's scale reaches the parameters.

Launches (one process group each, several runs in a row):

* PP=2 (``make test``): every schedule, each with another model shape -- 1f1b on the n=4
  transformer-head model (also: validation losses, a checkpoint), gpipe with tied embeddings,
  interleaved_1f1b (2 stages per rank) with causal heads, zbv with tied causal heads -- and a NaN
  loss step (skipped on every stage). ``make test-all`` adds every schedule on the n=4 model, an
  explicit ``pp_layout`` and the naive loss.
* PP=2 x FSDP=2 (``make test``): the n=4 model, and with causal heads, each rank's reduce-scatter
  bytes counted (every gradient reduced once per step) and every unit resharded after the last
  step and after a validation pass; causal heads, n=2, gpipe (slow).
* slow (``make test-all``): PP=4 (one trunk block per stage), PP=2 x TP=2 (tied causal heads too),
  PP=2 x FSDP=2 x TP=2 on 8 ranks.

Checkpoints: a PP=2 checkpoint resumes in one process; an fsdp checkpoint under PP=2 (slow).
Continued losses and final parameters equal the uninterrupted run's.

Run under ``flock /tmp/mtp_heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from conftest import launch_worker
from test_parallel import STEPS, TOL, _same, assert_continues, assert_matches, base_overrides, final_params, \
    max_param_diff
from test_parallel import one_process_reference
from test_parallel import data  # noqa: F401 - the same random-documents dataset (a module-scoped fixture)

NONFINITE_AT = [3]
# Model shapes beyond the n=4 transformer-head model: every way the embedding reaches the last stage.
PP_SHAPES = {
    "tied": ["model.tie_embeddings=true", "model.n_future=2"],
    "causal": ["model.head_type=causal", "model.n_future=2", "loss.chunk_size=40"],
    "tied_causal": ["model.tie_embeddings=true", "model.head_type=causal", "model.n_future=2"],
    # heads 2-4 each embed tokens: the last stage's embedding replica gets three backward passes
    "causal_n4": ["model.head_type=causal"],
}
VALIDATION = ["logging.val_interval=5", "logging.val_batches=2", "logging.decode_prompts=0"]


def pp(size: int, schedule: str = "1f1b", *extra: str) -> list[str]:
    return [f"parallel.pp_size={size}", f"parallel.pp_schedule={schedule}", *extra]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def reference(data, workdir) -> dict:
    """One process: the n=4 model (checkpoint at step 3, validation at step 5), a NaN loss, each
    shape of PP_SHAPES."""
    base = base_overrides(data)
    runs = [{"name": "hs", "overrides": base + ["checkpoint.interval=3"] + VALIDATION},
            {"name": "nonfinite", "overrides": base, "nonfinite_loss_at": NONFINITE_AT}]
    runs += [{"name": k, "overrides": base + v} for k, v in PP_SHAPES.items()]
    return one_process_reference(workdir, runs)


_LAUNCHED: dict[str, dict] = {}


def launch(name: str, nproc: int, runs: dict[str, list[str]], data: Path, workdir: Path, **special) -> dict:
    """One torchrun launch of ``runs`` ({run name: overrides beyond the base}), cached by name."""
    if name not in _LAUNCHED:
        base = base_overrides(data)
        specs = [{"name": k, "overrides": base + v, **special.get(k, {})} for k, v in runs.items()]
        _LAUNCHED[name] = launch_worker(workdir / name, nproc, specs)
    return _LAUNCHED[name]


def check(results: dict, reference: dict, refs: dict[str, str], what: str, nproc: int) -> None:
    assert results and set(results) <= set(refs), (what, sorted(results))
    for run, res in results.items():
        assert res["world_size"] == nproc
        ref = reference[refs[run]]
        assert_matches(res, ref, ref["params"], f"{what} {run}")


def val_losses(run_dir: str) -> dict[str, float]:
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    vals = [x for x in lines if "val/loss" in x]
    assert len(vals) == 1 and vals[0]["step"] == STEPS, vals
    return {k: v for k, v in vals[0].items() if k.startswith("val/loss") and not k.endswith("_s")}


# --- PP=2 ----------------------------------------------------------------------------------------
# make test: each schedule once, each with another model shape; make test-all: the rest.
PP2_RUNS = {
    "1f1b": pp(2, "1f1b", "checkpoint.interval=3", *VALIDATION),
    "nonfinite": pp(2, "1f1b"),
    "tied": pp(2, "gpipe", *PP_SHAPES["tied"]),
    "causal": pp(2, "interleaved_1f1b", *PP_SHAPES["causal"]),
    "tied_causal": pp(2, "zbv", *PP_SHAPES["tied_causal"]),
}
PP2_SLOW_RUNS = {
    "gpipe": pp(2, "gpipe"),
    "interleaved_1f1b": pp(2, "interleaved_1f1b"),
    "zbv": pp(2, "zbv"),
    "layout": pp(2, "1f1b", "parallel.pp_layout=[1,3]"),
    "naive": pp(2, "1f1b", "loss.impl=naive"),
}
# The one-process run each is compared with (naive: the head-sequential run; test_parallel.py
# checks that the two agree on one process).
REFS = {"1f1b": "hs", "gpipe": "hs", "interleaved_1f1b": "hs", "zbv": "hs", "layout": "hs", "naive": "hs",
        "nonfinite": "nonfinite", "tied": "tied", "causal": "causal", "tied_causal": "tied_causal", "hs": "hs",
        "causal_n4": "causal_n4"}


def pp2(data, workdir) -> dict:
    return launch("pp2", 2, PP2_RUNS, data, workdir, nonfinite={"nonfinite_loss_at": NONFINITE_AT})


@pytest.mark.distributed
def test_pp2_every_schedule_matches_one_process(data, workdir, reference):
    results = pp2(data, workdir)
    assert set(results) == set(PP2_RUNS)
    check(results, reference, REFS, "pp=2", 2)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_remaining_runs_match_one_process(data, workdir, reference):
    """Every schedule on the n=4 model, an explicit pp_layout, the naive loss."""
    check(launch("pp2_slow", 2, PP2_SLOW_RUNS, data, workdir), reference, REFS, "pp=2", 2)


@pytest.mark.distributed
def test_pp2_validation_matches_one_process(data, workdir, reference):
    """Validation runs the batches through the stages: the same per-head losses."""
    got, want = val_losses(pp2(data, workdir)["1f1b"]["dir"]), val_losses(reference["hs"]["dir"])
    assert set(got) == set(want) and len(want) == 5  # val/loss and the 4 heads
    for k in want:
        assert abs(got[k] - want[k]) < TOL, (k, got[k], want[k])


@pytest.mark.distributed
def test_pp2_checkpoint_resumes_in_one_process(data, workdir, reference):
    """A checkpoint both stages wrote (plain parameter names, each stage its own) resumes in one
    process: steps 4-5 log the uninterrupted run's losses and end with its parameters."""
    step3 = Path(pp2(data, workdir)["1f1b"]["dir"]) / "checkpoints" / "step-00000003"
    assert step3.is_dir()
    res = launch_worker(workdir / "resume_one", 1, [
        {"name": "one", "overrides": base_overrides(data) + [f"train.resume={step3}"]}])["one"]
    assert_continues(res, reference["hs"], "pp=2 -> 1 process")
    diff, name = max_param_diff(final_params(res["dir"]), reference["hs"]["params"])
    assert diff < TOL, f"pp=2 -> 1 process: {name} differs by {diff:.2e}"


@pytest.mark.distributed
def test_a_pp2_checkpoint_decodes_in_one_process(data, workdir, reference):
    """``mtp-generate``'s loader reads the checkpoint both stages wrote: the same tokens as the
    one-process run's checkpoint, greedy and self-speculative (every head drafts)."""
    from mtp_pretrain.checkpoint_reader import load_model
    from mtp_pretrain.inference.decode import generate

    prompts = [[5, 17, 99, 3], [250, 1, 42]]
    outs = []
    for run in (pp2(data, workdir)["1f1b"], reference["hs"]):
        model, _ = load_model(Path(run["dir"]) / "checkpoints")
        outs.append([generate(model, prompts, mode=mode, max_new_tokens=12, num_drafts=None).tokens
                     for mode in ("greedy", "self_speculative")])
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1] and len(outs[0][0][0]) == 12


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_checkpoint_resumes_under_pp2(data, workdir, reference):
    """fsdp (2 ranks) writes step 3; PP=2 (interleaved) resumes it for steps 4-5."""
    fsdp = launch("fsdp", 2, {"fsdp": ["parallel=fsdp", "checkpoint.interval=3"]}, data, workdir)["fsdp"]
    step3 = Path(fsdp["dir"]) / "checkpoints" / "step-00000003"
    assert step3.is_dir()
    res = launch_worker(workdir / "resume_pp", 2, [
        {"name": "pp", "overrides": base_overrides(data) + pp(2, "interleaved_1f1b", f"train.resume={step3}")}])["pp"]
    assert_continues(res, reference["hs"], "fsdp -> pp=2")
    diff, name = max_param_diff(final_params(res["dir"]), reference["hs"]["params"])
    assert diff < TOL, f"fsdp -> pp=2: {name} differs by {diff:.2e}"


# --- composed with data and tensor parallelism ----------------------------------------------------
# (the collectives are counted too: each gradient must be reduce-scattered once per step)
PP2_FSDP2_RUNS = {"hs": ["parallel=fsdp", *pp(2)], "causal_n4": ["parallel=fsdp", *pp(2), *PP_SHAPES["causal_n4"]]}


def pp2_fsdp2(data, workdir) -> dict:
    return launch("pp2_fsdp2", 4, PP2_FSDP2_RUNS, data, workdir,
                  **{k: {"count_comm": True, "check_resharded": True} for k in PP2_FSDP2_RUNS})


@pytest.mark.distributed
def test_pp2_x_fsdp2_matches_one_process(data, workdir, reference):
    check(pp2_fsdp2(data, workdir), reference, REFS, "pp=2 x fsdp=2", 4)


@pytest.mark.distributed
def test_pp2_x_fsdp2_reduces_each_gradient_once_per_step(data, workdir):
    """Counting the bytes each rank gives to reduce-scatter (FSDP2 reduces a full float32
    gradient): every parameter of the rank's stages is reduced exactly once per step -- with
    causal heads too, whose last stage's embedding replica gets a backward pass per head 2-4 in
    each micro-batch (reduced once per head of the last micro-batch, this test's failure before)."""
    results = pp2_fsdp2(data, workdir)
    assert set(results) == set(PP2_FSDP2_RUNS)
    for run, res in results.items():
        assert len(res["ranks"]) == 4 and len(res["steps"]) == STEPS, run
        for rank in res["ranks"]:
            reduced = sum(b for name, b in rank["comm"]["bytes"].items() if name.startswith("reduce_scatter"))
            once = STEPS * 4 * rank["param_numel"]
            assert reduced == once, (f"{run} rank {rank['rank']}: {reduced} bytes reduce-scattered in {STEPS} steps, "
                                     f"{once} for each parameter once per step ({(reduced - once) / STEPS / 4:.0f} "
                                     f"extra elements per step)")


@pytest.mark.distributed
def test_pp2_x_fsdp2_units_hold_only_their_shards_between_passes(data, workdir):
    """After the last step and after a validation pass through the stages, every rank holds each
    of its stages' parameters as its FSDP shard: the last stage's heads, unembedding and (causal
    heads) embedding replica, which the loss calls as FSDP roots of their own, included."""
    results = pp2_fsdp2(data, workdir)
    assert set(results) == set(PP2_FSDP2_RUNS)
    for run, res in results.items():
        assert len(res["ranks"]) == 4, run
        for rank in res["ranks"]:
            for when, checked in rank["resharded"].items():
                assert checked["sharded"] > 0 and checked["gathered"] == [], (run, rank["rank"], when, checked)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_x_fsdp2_causal_heads_match_one_process(data, workdir, reference):
    """The last stage's embedding replica, read by the causal heads, sharded over the data-parallel ranks."""
    check(launch("pp2_fsdp2_causal", 4, {"causal": ["parallel=fsdp", *pp(2, "gpipe"), *PP_SHAPES["causal"]]},
                 data, workdir), reference, REFS, "pp=2 x fsdp=2", 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp4_matches_one_process(data, workdir, reference):
    """Four stages of one trunk block each (the first also embeds, the last runs the heads)."""
    res = launch("pp4", 4, {"hs": pp(4, "1f1b"), "tied": pp(4, "gpipe", *PP_SHAPES["tied"])}, data, workdir)
    check(res, reference, REFS, "pp=4", 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp4_virtual_stage_schedules_match_one_process(data, workdir):
    """PP=4 with two stages per rank (interleaved 1F1B; zero-bubble V): 8 trunk blocks, one per
    stage, and 8 micro-batches (zbv needs one per stage), against one process of that model."""
    deep = ["model.n_layers=8", "train.micro_batch_size=2"]
    ref = launch_worker(workdir / "reference_deep", 1, [{"name": "hs", "overrides": base_overrides(data) + deep}])["hs"]
    ref["params"] = final_params(ref["dir"])
    res = launch("pp4_virtual", 4, {"interleaved_1f1b": [*deep, *pp(4, "interleaved_1f1b")],
                                    "zbv": [*deep, *pp(4, "zbv")]}, data, workdir)
    assert set(res) == {"interleaved_1f1b", "zbv"}
    for run, result in res.items():
        assert result["world_size"] == 4
        assert_matches(result, ref, ref["params"], f"pp=4 {run}")


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_x_tp2_matches_one_process(data, workdir, reference):
    res = launch("pp2_tp2", 4, {"hs": ["parallel=tp", *pp(2)],
                                "tied_causal": ["parallel=tp", *pp(2, "interleaved_1f1b"), *PP_SHAPES["tied_causal"]]},
                 data, workdir)
    check(res, reference, REFS, "pp=2 x tp=2", 4)


@pytest.mark.slow
@pytest.mark.distributed
def test_pp2_x_fsdp2_x_tp2_matches_one_process(data, workdir, reference):
    res = launch("pp2_fsdp2_tp2", 8, {"hs": ["parallel=fsdp_tp", "parallel.tp_size=2", *pp(2)]}, data, workdir)
    check(res, reference, REFS, "pp=2 x fsdp=2 x tp=2", 8)


# --- no processes ----------------------------------------------------------------------------------
def test_stage_split_and_placement():
    from mtp_pretrain.parallel.pipeline import stage_blocks, stage_owner

    assert stage_blocks(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert stage_blocks(4, 2, [1, 3]) == [range(0, 1), range(1, 4)]
    assert stage_blocks(3, 3, [0, 1, 2]) == [range(0, 0), range(0, 1), range(1, 3)]
    assert [stage_owner(s, 2, 4, v_shape=False) for s in range(4)] == [0, 1, 0, 1]
    assert [stage_owner(s, 2, 4, v_shape=True) for s in range(4)] == [0, 1, 1, 0]
    assert [stage_owner(s, 3, 6, v_shape=True) for s in range(6)] == [0, 1, 2, 2, 1, 0]


@pytest.mark.parametrize("stages,first,last,shape", [
    ((0,), True, False, {}), ((1,), False, True, {}), ((1,), False, True, {"tie_embeddings": True}),
    ((1,), False, True, {"head_type": "causal"}), ((0, 1), True, True, {"tie_embeddings": True})])
def test_a_rank_keeps_its_stages_under_the_plain_names(stages, first, last, shape):
    """What a rank keeps is a subset of the plain model's state dict, under the same names, and
    the ranks of a pipeline together hold all of it (the embedding matrix where a stage reads it)."""
    from mtp_pretrain.model import ModelConfig, MTPTransformer
    from mtp_pretrain.parallel.pipeline import AbsentModule, keep_stages, stage_blocks

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_future=2, **shape)
    plain = MTPTransformer(cfg).state_dict()
    ranges = stage_blocks(4, 2)
    model = keep_stages(MTPTransformer(cfg), {b for s in stages for b in ranges[s]}, first, last)
    kept = model.state_dict()
    assert kept and set(kept) <= set(plain)
    trunk = {int(k.split(".")[1]) for k in kept if k.startswith("trunk.")}
    assert trunk == {b for s in stages for b in ranges[s]}
    assert any(k.startswith("heads.") for k in kept) == last
    assert ("tok_embeddings.weight" in kept) == (first or (last and cfg.head_type == "causal"))
    assert ("unembed.weight" in kept) == last
    absent = [m for m in model.trunk if isinstance(m, AbsentModule)]
    assert len(absent) == 4 - len(trunk)
    for m in absent:
        with pytest.raises(RuntimeError, match="held by another pipeline stage"):
            m(torch.zeros(1))


def test_the_shape_pass_guard_hooks_into_this_torch():
    """``_Stage`` flags the schedule's shape inference by overriding this PipelineStage method:
    if a torch release renames it, the loss would run its heads on uninitialised tensors."""
    from torch.distributed.pipelining import PipelineStage

    assert callable(getattr(PipelineStage, "_backward_metadata_inference", None))


@pytest.mark.parametrize("overrides,msg", [
    (["parallel.pp_size=2", "model.n_layers=3"], "3 trunk blocks (model.trunk_layers) do not divide evenly into 2"),
    (["parallel.pp_size=2", "parallel.pp_layout=[1,2]"], "places 3 trunk blocks; the model has 4"),
    (["parallel.pp_size=2", "parallel.pp_layout=[4]"], "pp_layout has 1 entries; parallel.pp_size=2"),
    (["parallel.pp_size=3", "parallel.pp_layout=[2,0,2]"], "and >= 1 for a middle stage"),
    (["parallel.pp_size=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=1"],
     "needs parallel.pp_virtual_stages >= 2"),
    (["parallel.pp_size=2", "parallel.pp_schedule=zero"], "parallel.pp_schedule must be one of"),
    (["parallel.pp_size=2", "train.freeze=trunk"], "train.freeze=trunk is not supported with parallel.pp_size > 1"),
])
def test_bad_pipeline_settings_are_refused(overrides, msg, data):
    from mtp_pretrain.config import compose_job_config

    with pytest.raises(Exception, match=re.escape(msg)):
        compose_job_config(base_overrides(data) + overrides)


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed", "megatron"])
def test_pipeline_with_a_strategy_it_does_not_compose_with_is_refused(strategy):
    from mtp_pretrain.config import ParallelConfig
    from mtp_pretrain.parallel import DistEnv
    from mtp_pretrain.parallel.layout import ParallelDims

    env = DistEnv(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ValueError, match=f"parallel.pp_size=2 does not combine with parallel.strategy={strategy}"):
        ParallelDims.from_config(strategy, ParallelConfig(strategy=strategy, pp_size=2, zero_stage=1), env)


@pytest.mark.parametrize("schedule,microbatches,ok", [("1f1b", 1, False), ("1f1b", 2, True), ("zbv", 3, False),
                                                      ("zbv", 4, True), ("gpipe", 1, True),
                                                      ("interleaved_1f1b", 5, False), ("interleaved_1f1b", 3, True)])
def test_too_few_microbatches_are_refused_at_start_up(schedule, microbatches, ok):
    from mtp_pretrain.config import ParallelConfig
    from mtp_pretrain.parallel.pipeline import Pipeline

    pipe = Pipeline(ParallelConfig(pp_size=2, pp_schedule=schedule), 0, None, 1, torch.device("cpu"))
    if ok:
        pipe.validate(microbatches)
    else:
        with pytest.raises(ValueError, match=f"parallel.pp_schedule={schedule} needs"):
            pipe.validate(microbatches)


@pytest.mark.distributed
def test_nonfinite_step_is_skipped_on_every_stage(data, workdir, reference):
    """(No new launch: the PP=2 launch's NaN run.) The NaN step is counted and skipped."""
    res = pp2(data, workdir)["nonfinite"]
    assert [math.isnan(x) for x in res["losses"]] == [s in NONFINITE_AT for s in res["steps"]]
    assert all(math.isfinite(x) for x in res["grad_norms"])
    assert all(_same(x, y, rel=1.0) for x, y in zip(res["grad_norms"], reference["nonfinite"]["grad_norms"]))
