"""Every parallel strategy against one process, with the real Trainer under torchrun (gloo, CPU).

One torchrun launch per strategy runs ``tests/parallel_worker.py``, which trains the tiny model
for 5 steps several times in one process group: the n=4 transformer-head model with the
head-sequential and the naive loss, every model shape of ``SHAPES`` (tied embeddings, causal,
linear heads, n = 1 / 2 / 4, ``match_baseline_params``, activation checkpointing,
``loss.chunk_size``), strategy-specific variants, and a run whose loss reads NaN at step 3 (the
strategy's ``step`` must skip that update although every gradient is finite). Every run uses the
same global batch (``train.global_batch_tokens=512``: 16 sequences of 32 tokens) so that 1, 2 and
4 ranks see the same samples per step, and is compared with the single-process run of its shape:

* per-step losses and per-step pre-clip gradient norms (relative) within ``TOL``;
* parameters after the 5 steps (its step-5 DCP checkpoint, read on one process) within ``TOL``.

The gradient's scale must reach the checks: gradient clipping is off, and AdamW's eps is 1e-3
(about a fifth of a typical gradient element here), so its update m / (sqrt(v) + eps) depends on
the gradient's scale instead of only its sign (with eps 1e-8 a gradient multiplied by any
constant moves the parameters the same way). fp32 throughout, lr 1e-3.

Also: a checkpoint written by fsdp on 2 ranks resumed by tp on 2 ranks and by one process
(continued losses and final parameters match the uninterrupted run); a ZeRO-3 checkpoint
exported with ``mtp-export`` to one safetensors file; the communicated bytes of the shared
unembedding's gradient, reduced once per step vs once per head (FSDP); start-up validation.

Which shapes run in ``make test`` and which only in ``make test-all`` (``slow``): see
``SLOW_SHAPES``. Each rank of a launch logs to its own files (``<out>/logs``, torchrun
``--log-dir``); a failed launch reports the tail of the rank torchrun names as the root cause.

Run under ``flock /tmp/mtp_heavy.lock`` on a shared machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import launch_worker
from mtp_pretrain.config import ParallelConfig
from mtp_pretrain.model.config import ModelConfig
from mtp_pretrain.parallel import DistEnv, build_strategy
from mtp_pretrain.parallel.tp_plan import TP_PLAN, assign

TOL = 1e-4
STEPS = 5
VOCAB, DIM, N_FUTURE = 512, 128, 4
NONFINITE_AT = [3]

# Model shapes, each run by every strategy that can run it, against one process of the same shape.
# Between them they take every branch the strategies have: tied embeddings (one FSDP unit / one
# ZeRO parameter for two modules), chained heads reading token embeddings, linear heads, n = 1,
# fewer trunk blocks (match_baseline_params), activation checkpointing, the chunked cross-entropy.
SHAPES = {
    "tied_n2_ac": ["model.tie_embeddings=true", "model.n_future=2", "parallel.activation_checkpointing=full"],
    "tied_causal": ["model.tie_embeddings=true", "model.head_type=causal", "model.n_future=2"],
    "causal_chunked": ["model.head_type=causal", "model.n_future=2", "loss.chunk_size=40"],
    "linear_n1": ["model.head_type=linear", "model.n_future=1"],
    "matched": ["model.match_baseline_params=true"],
}
TIED_CAUSAL_FSDP = "model.tie_embeddings=true with model.head_type=causal is not supported under parallel.strategy="

# name -> (processes, overrides shared by every run of the launch, {extra run: overrides},
#          {shape the strategy refuses at start-up: the message})
LAUNCHES = {
    "ddp": (2, ["parallel=ddp"], {}, {}),
    "fsdp": (2, ["parallel=fsdp", "checkpoint.interval=3"], {}, {"tied_causal": TIED_CAUSAL_FSDP + "fsdp"}),
    "tp": (2, ["parallel=tp"], {"ac_every_2": ["parallel.activation_checkpointing=every_k", "parallel.ac_every=2"]},
           {}),
    "fsdp_tp": (4, ["parallel=fsdp_tp", "parallel.tp_size=2"], {}, {"tied_causal": TIED_CAUSAL_FSDP + "fsdp_tp"}),
    "zero1": (2, ["parallel=deepspeed", "parallel.zero_stage=1"], {}, {}),
    "zero2": (2, ["parallel=deepspeed", "parallel.zero_stage=2"], {}, {}),
    "zero3": (2, ["parallel=deepspeed", "parallel.zero_stage=3"], {},
              {"tied_n2_ac": "model.tie_embeddings with ZeRO-3", "tied_causal": "model.tie_embeddings with ZeRO-3"}),
}
# The shapes each strategy runs in `make test`; the rest of those it supports run in `make test-all` (slow).
FAST_SHAPES = {"ddp": {"tied_causal"}, "fsdp": {"tied_n2_ac", "causal_chunked", "linear_n1", "matched"},
               "tp": {"tied_causal", "causal_chunked"}, "fsdp_tp": {"tied_n2_ac"}, "zero1": set(),
               "zero2": {"tied_causal", "causal_chunked"}, "zero3": {"linear_n1", "matched"}}
SLOW_SHAPES = {name: set(SHAPES) - FAST_SHAPES[name] - set(LAUNCHES[name][3]) for name in LAUNCHES}


def base_overrides(data: Path) -> list[str]:
    return [f"data.sources=[{{path:{data},weight:1.0}}]", "data.seq_len=32", "data.prefetch=0",
            "model=tiny", f"model.vocab_size={VOCAB}", f"model.dim={DIM}", f"model.n_future={N_FUTURE}",
            "train.micro_batch_size=4", "train.global_batch_tokens=512", f"train.max_steps={STEPS}",
            "train.dtype=float32", "train.device=cpu", "train.resume=never", "optim.lr=1e-3", "optim.eps=1e-3",
            "optim.grad_clip=0", "optim.warmup_steps=2", "checkpoint.interval=0", "checkpoint.keep=5"]


def final_params(run_dir: str | Path) -> dict[str, torch.Tensor]:
    from mtp_pretrain.checkpoint_reader import read_model_config, read_state_dict, resolve_checkpoint

    path = resolve_checkpoint(Path(run_dir) / "checkpoints")
    return read_state_dict(path, read_model_config(path))


def max_param_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)


def _same(x: float, y: float, rel: float = 0.0) -> bool:
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return abs(x - y) <= TOL * max(1.0, rel * abs(y))


def assert_matches(result: dict, ref: dict, ref_params: dict, what: str) -> None:
    """Per-step losses, per-step pre-clip gradient norms and final parameters equal the reference's."""
    assert result["steps"] == list(range(1, STEPS + 1)), what
    assert len(result["losses"]) == len(result["grad_norms"]) == len(ref["grad_norms"]) == STEPS, what
    for step, (x, y) in enumerate(zip(result["losses"], ref["losses"]), 1):
        assert _same(x, y), f"{what}: step {step} loss {x} vs reference {y} (all: {result['losses']} vs {ref['losses']})"
    for step, (x, y) in enumerate(zip(result["grad_norms"], ref["grad_norms"]), 1):
        if math.isnan(ref["losses"][step - 1]) and math.isinf(x):
            continue  # a skipped step: DeepSpeed reports inf for the gradients it discarded
        assert _same(x, y, rel=1.0), (f"{what}: step {step} gradient norm {x} vs reference {y} "
                                      f"(all: {result['grad_norms']} vs {ref['grad_norms']})")
    assert result["nonfinite_skipped"] == ref["nonfinite_skipped"], what
    diff, name = max_param_diff(final_params(result["dir"]), ref_params)
    assert diff < TOL, f"{what}: parameter {name} differs by {diff:.2e} after {STEPS} steps"


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from mtp_pretrain.data.synthetic import write_random_dataset

    path = tmp_path_factory.mktemp("parallel_data") / "random"
    # Documents of 24 tokens: every cell trains with document masking (on by default) across boundaries.
    write_random_dataset(path, {"train": 100_000, "val": 10_000}, seed=0, doc_len=24)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel")


@pytest.fixture(scope="module")
def reference(data, workdir) -> dict:
    """One process: head-sequential (checkpoints at 3 and 5), naive, every shape, a NaN loss."""
    base = base_overrides(data)
    runs = [{"name": "hs", "overrides": base + ["checkpoint.interval=3"]},
            {"name": "naive", "overrides": base + ["loss.impl=naive"]},
            {"name": "nonfinite", "overrides": base, "nonfinite_loss_at": NONFINITE_AT}]
    runs += [{"name": k, "overrides": base + v} for k, v in SHAPES.items()]
    return one_process_reference(workdir, runs)


def one_process_reference(workdir: Path, runs: list[dict]) -> dict:
    """``runs`` in one process, each result with its final parameters ("params")."""
    res = launch_worker(workdir / "reference", 1, runs)
    for run in res.values():
        run["params"] = final_params(run["dir"])
    return res


def reference_of(run: str, reference: dict) -> dict:
    """The one-process run a strategy's run is compared with: its shape's, else the n=4 model's."""
    return reference[run] if run in SHAPES or run == "nonfinite" else reference["hs"]


_LAUNCHED: dict[tuple[str, bool], dict] = {}


def strategy_runs(name: str, data: Path, workdir: Path, slow: bool = False) -> dict:
    """The launch of strategy ``name``: its fast runs, or (slow) the shapes left to make test-all."""
    if (name, slow) not in _LAUNCHED:
        nproc, common, extra, _ = LAUNCHES[name]
        base = base_overrides(data) + common
        shapes = SLOW_SHAPES[name] if slow else FAST_SHAPES[name]
        if slow:
            runs = []
        else:
            runs = [{"name": "hs", "overrides": base}, {"name": "naive", "overrides": base + ["loss.impl=naive"]},
                    {"name": "nonfinite", "overrides": base, "nonfinite_loss_at": NONFINITE_AT}]
            runs += [{"name": k, "overrides": base + v} for k, v in extra.items()]
        runs += [{"name": k, "overrides": base + v} for k, v in SHAPES.items() if k in shapes]
        for run in runs:  # (test_fsdp_units_hold_only_their_shards_between_passes)
            run["check_resharded"] = name in RESHARD_CHECKED
        _LAUNCHED[(name, slow)] = launch_worker(workdir / (name + "_slow" * slow), nproc, runs)
    return _LAUNCHED[(name, slow)]


# --- parity ------------------------------------------------------------------------------------
def test_reference_losses_agree(reference):
    """Naive agrees with head-sequential on one process, and the NaN step of the reference's
    skip run was skipped (counted, its neighbours finite)."""
    assert_matches(reference["naive"], reference["hs"], reference["hs"]["params"], "1 process naive")
    skip = reference["nonfinite"]
    assert [math.isnan(x) for x in skip["losses"]] == [s in NONFINITE_AT for s in skip["steps"]]
    assert skip["nonfinite_skipped"] == [sum(1 for p in NONFINITE_AT if p <= s) for s in skip["steps"]]
    assert all(math.isfinite(x) for x in skip["grad_norms"])  # only the loss was poisoned


def _check_launch(name: str, results: dict, reference: dict) -> None:
    nproc = LAUNCHES[name][0]
    assert results, name
    for run, res in results.items():
        assert res["world_size"] == nproc
        ref = reference_of(run, reference)
        assert_matches(res, ref, ref["params"], f"{name} x{nproc} {run}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_strategy_matches_single_process(name, data, workdir, reference):
    results = strategy_runs(name, data, workdir)
    assert {"hs", "naive", "nonfinite"} <= set(results)
    _check_launch(name, results, reference)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", sorted(k for k, v in SLOW_SHAPES.items() if v))
def test_strategy_matches_single_process_remaining_shapes(name, data, workdir, reference):
    results = strategy_runs(name, data, workdir, slow=True)
    assert set(results) == SLOW_SHAPES[name]
    _check_launch(name, results, reference)


RESHARD_CHECKED = ("fsdp", "fsdp_tp")


@pytest.mark.distributed
@pytest.mark.parametrize("name", RESHARD_CHECKED)
def test_fsdp_units_hold_only_their_shards_between_passes(name, data, workdir):
    """After the last training step and after a validation pass run then (fsdp: ``per_head_sums``,
    fsdp_tp: ``evaluate_loss``), every rank holds every parameter as its FSDP shard, in every run
    of the launch (head-sequential and naive loss, tied embeddings, causal heads, linear heads):
    no unit stays gathered. FSDP2 keeps a root's parameters gathered after its forward until its
    backward, and the loss calls the embedding, heads and unembedding as roots of their own:
    before ``release_gathered`` and the heads' reshard after a gradient-free forward, validation
    left the embedding, every head and the unembedding gathered."""
    results = strategy_runs(name, data, workdir)
    assert {"hs", "naive", "tied_n2_ac"} <= set(results), sorted(results)
    for run, res in results.items():
        assert len(res["ranks"]) == LAUNCHES[name][0], run
        for rank in res["ranks"]:
            checked = rank["resharded"]
            for when in ("after_step", "after_validation"):
                assert checked[when]["sharded"] > 0, (name, run, when, checked[when])
                assert checked[when]["gathered"] == [], (f"{name} {run} rank {rank['rank']} {when}: "
                                                         f"gathered {checked[when]['gathered']}")


def test_every_branch_runs_in_make_test():
    """make test-all runs every shape under every strategy that does not refuse it; make test runs
    every shape under at least two strategies, one of them sharding parameters."""
    for shape in SHAPES:
        fast = {name for name in LAUNCHES if shape in FAST_SHAPES[name]}
        assert len(fast) >= 2 and fast & {"fsdp", "fsdp_tp", "zero3", "tp"}, (shape, fast)
        for name, (_, _, _, refused) in LAUNCHES.items():
            assert (shape in FAST_SHAPES[name]) + (shape in SLOW_SHAPES[name]) + (shape in refused) == 1


@pytest.mark.parametrize("name,shape", [(n, s) for n, v in LAUNCHES.items() for s in v[3]])
def test_unsupported_shape_is_refused_at_start_up(name, shape, data):
    """A combination a strategy cannot run fails before any step, naming both settings."""
    from mtp_pretrain.config import compose_job_config

    nproc, common, _, refused = LAUNCHES[name]
    cfg = compose_job_config(base_overrides(data) + common + SHAPES[shape])
    strategy = build_strategy(cfg.parallel, _env(nproc))
    with pytest.raises(ValueError, match=refused[shape].replace(".", r"\.")):
        strategy.validate(cfg.model, seq_len=cfg.data.seq_len)


# --- checkpoints across strategies ---------------------------------------------------------------
def assert_continues(res: dict, ref: dict, what: str) -> None:
    """A run resumed from step 3 logs steps 4 and 5 with the uninterrupted run's losses and
    gradient norms."""
    assert res["steps"] == [4, 5], what
    for step, loss, norm in zip(res["steps"], res["losses"], res["grad_norms"]):
        assert _same(loss, ref["losses"][step - 1]), f"{what} step {step}: loss {loss} vs {ref['losses'][step - 1]}"
        assert _same(norm, ref["grad_norms"][step - 1], rel=1.0), f"{what} step {step}: gradient norm {norm}"


@pytest.mark.distributed
def test_fsdp_checkpoint_resumes_under_tp_and_one_process(data, workdir, reference):
    """fsdp (2 ranks) writes step 3; tp (2 ranks) and one process resume it for steps 4-5 and log
    the uninterrupted run's losses, ending with its parameters."""
    fsdp = strategy_runs("fsdp", data, workdir)["hs"]
    step3 = Path(fsdp["dir"]) / "checkpoints" / "step-00000003"
    assert step3.is_dir()
    base = base_overrides(data) + [f"train.resume={step3}"]
    tp = launch_worker(workdir / "resume_tp", 2, [{"name": "tp", "overrides": base + ["parallel=tp"]}])["tp"]
    one = launch_worker(workdir / "resume_one", 1, [{"name": "one", "overrides": base}])["one"]
    for what, res in (("tp x2", tp), ("1 process", one)):
        assert_continues(res, reference["hs"], what)
        diff, name = max_param_diff(final_params(res["dir"]), reference["hs"]["params"])
        assert diff < TOL, f"{what}: {name} differs by {diff:.2e}"


@pytest.mark.distributed
def test_fsdp_checkpoint_resumes_under_zero2(data, workdir, reference):
    """The common checkpoint layout also loads into DeepSpeed's partitions (weights and moments)."""
    fsdp = strategy_runs("fsdp", data, workdir)["hs"]
    step3 = Path(fsdp["dir"]) / "checkpoints" / "step-00000003"
    base = base_overrides(data) + [f"train.resume={step3}", "parallel=deepspeed", "parallel.zero_stage=2"]
    res = launch_worker(workdir / "resume_zero2", 2, [{"name": "zero2", "overrides": base}])["zero2"]
    assert_continues(res, reference["hs"], "zero2")
    diff, name = max_param_diff(final_params(res["dir"]), reference["hs"]["params"])
    assert diff < TOL, f"zero2 resume: {name} differs by {diff:.2e}"


@pytest.mark.distributed
def test_zero3_checkpoint_exports_to_one_file(data, workdir, reference, tmp_path):
    from safetensors.torch import load_file

    from mtp_pretrain.checkpoint_reader import load_model
    from mtp_pretrain.export import export_single_file

    zero3 = strategy_runs("zero3", data, workdir)["hs"]
    out = export_single_file(Path(zero3["dir"]) / "checkpoints", tmp_path / "export")
    sd = load_file(out / "model.safetensors")
    diff, name = max_param_diff(sd, reference["hs"]["params"])
    assert diff < TOL, f"ZeRO-3 export: {name} differs by {diff:.2e}"
    model, _ = load_model(out)
    assert model.cfg.n_future == N_FUTURE


# --- the shared unembedding's gradient: reduced once per step -------------------------------------
@pytest.mark.distributed
def test_unembedding_gradient_reduced_once_per_step(data, workdir):
    """FSDP, 2 ranks, 2 micro-batches per step: counting the bytes given to reduce-scatter, the
    deferred sync saves exactly (n - 1) unembedding gradients per step over syncing per head."""
    base = base_overrides(data) + ["parallel=fsdp", "train.max_steps=2"]
    res = launch_worker(workdir / "comm", 2, [
        {"name": "deferred", "overrides": base, "count_comm": True},
        {"name": "per_head", "overrides": base, "count_comm": True, "unembed_sync": "per_head"}])
    rs = {k: v["ranks"][0]["comm"]["bytes"].get("reduce_scatter_single", 0) for k, v in res.items()}
    unembed_grad = VOCAB * DIM * 4  # fp32 reduce dtype, full (unsharded) input of the reduce-scatter
    assert rs["per_head"] - rs["deferred"] == 2 * (N_FUTURE - 1) * unembed_grad, rs
    # and the numbers do not change
    assert max(abs(a - b) for a, b in zip(res["deferred"]["losses"], res["per_head"]["losses"])) < TOL


# --- torch.compile ------------------------------------------------------------------------------
def test_compile_unavailable_fails_clearly(monkeypatch):
    from mtp_pretrain.parallel import blocks

    def broken(*a, **k):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(RuntimeError, match="parallel.compile=true but torch.compile cannot run on this machine"):
        blocks.check_compile_available()


@pytest.mark.slow
def test_compiled_blocks_match(data, workdir, reference):
    """parallel.compile=true (+ every-2nd-block AC), one process, 2 steps: same losses (compiling
    the blocks takes ~1 min on a 2-core CPU)."""
    base = base_overrides(data) + ["parallel.compile=true", "parallel.activation_checkpointing=every_k",
                                   "train.max_steps=2"]
    res = launch_worker(workdir / "compile", 1, [{"name": "compiled", "overrides": base}])["compiled"]
    for a, b in zip(res["losses"], reference["hs"]["losses"]):
        assert abs(a - b) < TOL


# --- start-up validation (no processes) -----------------------------------------------------------
def _env(world: int) -> DistEnv:
    return DistEnv(rank=0, world_size=world, local_rank=0, device=torch.device("cpu"), backend="gloo")


@pytest.mark.parametrize("strategy,world,tp,model_kw,seq_len,msg", [
    ("fsdp_tp", 6, 4, {}, 32, "world size 6 is not divisible by parallel.tp_size=4"),
    ("tp", 3, 1, {}, 32, "tp_size=3 does not divide model.n_heads=4"),
    ("tp", 2, 1, {"n_kv_heads": 1}, 32, "tp_size=2 does not divide model.n_kv_heads=1"),
    ("tp", 2, 1, {"vocab_size": 511}, 32, "model.vocab_size=511"),
    ("tp", 2, 1, {"ffn_dim": 97}, 32, "model.ffn_dim=97"),
    ("tp", 2, 1, {}, 33, "data.seq_len=33"),
    ("tp", 4, 2, {}, 32, "parallel.tp_size=2 and the launcher started 4"),
    ("fsdp_tp", 4, 1, {}, 32, "fsdp_tp needs parallel.tp_size >= 2"),
])
def test_tp_validation_names_the_value(strategy, world, tp, model_kw, seq_len, msg):
    cfg = ModelConfig(**{"vocab_size": 512, "dim": 64, "n_layers": 1, "n_heads": 4, **model_kw})
    strat = build_strategy(ParallelConfig(strategy=strategy, tp_size=tp), _env(world))
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        strat.validate(cfg, seq_len=seq_len)


def test_deepspeed_validation():
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=1, n_heads=4)
    with pytest.raises(ValueError, match="parallel.zero_stage must be 1, 2 or 3.*got 0"):
        build_strategy(ParallelConfig(strategy="deepspeed", zero_stage=0), _env(2)).validate(cfg)
    # a device DeepSpeed cannot initialise on here: this machine's accelerator is the CPU
    cuda_env = DistEnv(0, 2, 0, torch.device("cuda", 0), "nccl")
    with pytest.raises(RuntimeError, match="DeepSpeed's accelerator is 'cpu' but the job runs on 'cuda'"):
        build_strategy(ParallelConfig(strategy="deepspeed", zero_stage=3), cuda_env).validate(cfg)


# --- the TP plan --------------------------------------------------------------------------------
@pytest.mark.parametrize("head_type", ["transformer", "linear", "causal"])
def test_tp_plan_covers_every_parameter(head_type):
    """Every parameter's module has a style in the one plan; attention/MLP get the expected ones."""
    from mtp_pretrain.model import MTPTransformer

    with torch.device("meta"):
        model = MTPTransformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_future=3,
                                           head_type=head_type))
    styles = assign((n for n, _ in model.named_modules()), TP_PLAN)
    for pname, _ in model.named_parameters():
        owner = pname.rsplit(".", 1)[0]
        assert owner in styles, f"{pname}: no TP style for module {owner}"
    assert styles["trunk.0.attn.q_proj"] == "column" and styles["trunk.1.mlp.down_proj"] == "row"
    assert styles["tok_embeddings"] == "vocab_embedding" and styles["unembed"] == "vocab_column"
    assert styles["trunk.0.attn_norm"] == "sequence" and styles["trunk.0.attn"] == "gather_input"


_ZERO3_GROUPS = """
import json, torch
from mtp_pretrain.config import OptimConfig, ParallelConfig
from mtp_pretrain.model import ModelConfig, MTPTransformer
from mtp_pretrain.optim import build_adamw, group_param_names
from mtp_pretrain.parallel import DistEnv, build_strategy
model = MTPTransformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_future=2, max_seq_len=64))
plain = group_param_names(model, build_adamw(model, OptimConfig()))
s = build_strategy(ParallelConfig(strategy="deepspeed", zero_stage=3), DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
model = s.parallelize(model)
opt = s.build_optimizer(model, lambda m: build_adamw(m, OptimConfig()))
saved = [g["params"] for g in s.checkpoint_state(model, opt)["optim"].state_dict()["param_groups"]]
print(json.dumps({"plain": plain, "saved": saved}))
"""


@pytest.mark.distributed
def test_zero3_checkpoint_names_optimizer_groups_like_one_process():
    """ZeRO-3 empties every module parameter, so the saved optimizer groups' parameter names
    (which another strategy's load matches groups by) are taken before DeepSpeed wraps them."""
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29631",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _ZERO3_GROUPS], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    groups = json.loads(p.stdout.strip().splitlines()[-1])
    assert groups["saved"] == groups["plain"]
    assert [len(g) for g in groups["plain"]] == [28, 12]  # decayed matrices; norms and embeddings
