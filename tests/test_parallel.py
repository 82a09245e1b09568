"""Every parallel strategy against one process, with the real Trainer under torchrun (gloo, CPU).

One torchrun launch per strategy runs ``tests/parallel_worker.py``, which trains the tiny n=4
model for 5 steps several times in one process group (head-sequential loss, naive loss, and a
strategy-specific variant: chunked TP cross-entropy, activation checkpointing, ...). Every run
uses the same global batch (``train.global_batch_tokens=512``: 16 sequences of 32 tokens) so
that 1, 2 and 4 ranks see the same samples per step; fp32 throughout; gradient clipping is
active (grad norm ~5 > 1). Each run must log the single-process head-sequential run's per-step
losses within 1e-4 and end (its step-5 DCP checkpoint, read on one process) with parameters
within 1e-4. lr is 1e-3: Adam moves every element by about lr per step whatever its gradient's
size, so rounding differences of near-zero gradients (reduction order) show up as parameter
differences of order lr x 1e-2; at lr 3e-3 we measured up to 9e-5 (tp) -- see docs/parallelism.md.

Also: a checkpoint written by fsdp on 2 ranks resumed by tp on 2 ranks and by one process
(continued losses and final parameters match the uninterrupted run); a ZeRO-3 checkpoint
exported with ``mtp-export`` to one safetensors file; the communicated bytes of the shared
unembedding's gradient, reduced once per step vs once per head (FSDP); start-up validation.

Each rank of a launch logs to its own files (``<out>/logs``, torchrun ``--log-dir``); a failed
launch reports the tail of the rank torchrun names as the root cause, then the others'.

Run under ``flock /tmp/mtp_heavy.lock`` on a shared machine.
"""

from __future__ import annotations

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

# name -> (processes, overrides shared by every run of the launch, {extra run: overrides})
LAUNCHES = {
    "ddp": (2, ["parallel=ddp"], {}),
    "fsdp": (2, ["parallel=fsdp", "checkpoint.interval=3"],
             {"ac_full": ["parallel.activation_checkpointing=full"]}),
    "tp": (2, ["parallel=tp"], {"chunked": ["loss.chunk_size=40"],
                                "ac_every_2": ["parallel.activation_checkpointing=every_k", "parallel.ac_every=2"]}),
    "fsdp_tp": (4, ["parallel=fsdp_tp", "parallel.tp_size=2"], {}),
    "zero1": (2, ["parallel=deepspeed", "parallel.zero_stage=1"], {}),
    "zero2": (2, ["parallel=deepspeed", "parallel.zero_stage=2"], {}),
    "zero3": (2, ["parallel=deepspeed", "parallel.zero_stage=3"], {"ac_full": ["parallel.activation_checkpointing=full"]}),
}


def base_overrides(data: Path) -> list[str]:
    return [f"data.sources=[{{path:{data},weight:1.0}}]", "data.seq_len=32", "data.prefetch=0",
            "model=tiny", f"model.vocab_size={VOCAB}", f"model.dim={DIM}", f"model.n_future={N_FUTURE}",
            "train.micro_batch_size=4", "train.global_batch_tokens=512", f"train.max_steps={STEPS}",
            "train.dtype=float32", "train.device=cpu", "train.resume=never", "optim.lr=1e-3",
            "optim.warmup_steps=2", "checkpoint.interval=0", "checkpoint.keep=5"]


def final_params(run_dir: str | Path) -> dict[str, torch.Tensor]:
    from mtp_pretrain.export import read_model_config, read_state_dict, resolve_checkpoint

    path = resolve_checkpoint(Path(run_dir) / "checkpoints")
    return read_state_dict(path, read_model_config(path))


def max_param_diff(a: dict, b: dict) -> tuple[float, str]:
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max().item(), k) for k in a)


def assert_matches(result: dict, ref: dict, ref_params: dict, what: str) -> None:
    assert result["steps"] == list(range(1, STEPS + 1)), what
    loss_diff = max(abs(x - y) for x, y in zip(result["losses"], ref["losses"]))
    assert loss_diff < TOL, f"{what}: losses {result['losses']} vs reference {ref['losses']}"
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
    """One process: head-sequential (checkpoints at 3 and 5), naive, chunked CE."""
    base = base_overrides(data)
    runs = [{"name": "hs", "overrides": base + ["checkpoint.interval=3"]},
            {"name": "naive", "overrides": base + ["loss.impl=naive"]},
            {"name": "chunked", "overrides": base + ["loss.chunk_size=40"]}]
    res = launch_worker(workdir / "reference", 1, runs)
    res["params"] = final_params(res["hs"]["dir"])
    return res


_LAUNCHED: dict[str, dict] = {}


def strategy_runs(name: str, data: Path, workdir: Path) -> dict:
    if name not in _LAUNCHED:
        nproc, common, extra = LAUNCHES[name]
        base = base_overrides(data) + common
        runs = [{"name": "hs", "overrides": base}, {"name": "naive", "overrides": base + ["loss.impl=naive"]}]
        runs += [{"name": k, "overrides": base + v} for k, v in extra.items()]
        _LAUNCHED[name] = launch_worker(workdir / name, nproc, runs)
    return _LAUNCHED[name]


# --- parity ------------------------------------------------------------------------------------
def test_reference_losses_agree(reference):
    """Naive and chunked losses agree with head-sequential on one process (the baseline)."""
    for other in ("naive", "chunked"):
        assert_matches(reference[other], reference["hs"], reference["params"], f"1 process {other}")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_strategy_matches_single_process(name, data, workdir, reference):
    results = strategy_runs(name, data, workdir)
    nproc = LAUNCHES[name][0]
    for run, res in results.items():
        assert res["world_size"] == nproc
        assert_matches(res, reference["hs"], reference["params"], f"{name} x{nproc} {run}")


# --- checkpoints across strategies ---------------------------------------------------------------
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
    ref_losses = dict(zip(reference["hs"]["steps"], reference["hs"]["losses"]))
    for what, res in (("tp x2", tp), ("1 process", one)):
        assert res["steps"] == [4, 5], what
        for step, loss in zip(res["steps"], res["losses"]):
            assert abs(loss - ref_losses[step]) < TOL, f"{what} step {step}: {loss} vs {ref_losses[step]}"
        diff, name = max_param_diff(final_params(res["dir"]), reference["params"])
        assert diff < TOL, f"{what}: {name} differs by {diff:.2e}"


@pytest.mark.distributed
def test_fsdp_checkpoint_resumes_under_zero2(data, workdir, reference):
    """The common checkpoint layout also loads into DeepSpeed's partitions (weights and moments)."""
    fsdp = strategy_runs("fsdp", data, workdir)["hs"]
    step3 = Path(fsdp["dir"]) / "checkpoints" / "step-00000003"
    base = base_overrides(data) + [f"train.resume={step3}", "parallel=deepspeed", "parallel.zero_stage=2"]
    res = launch_worker(workdir / "resume_zero2", 2, [{"name": "zero2", "overrides": base}])["zero2"]
    ref_losses = dict(zip(reference["hs"]["steps"], reference["hs"]["losses"]))
    assert res["steps"] == [4, 5]
    for step, loss in zip(res["steps"], res["losses"]):
        assert abs(loss - ref_losses[step]) < TOL, f"zero2 step {step}: {loss} vs {ref_losses[step]}"
    diff, name = max_param_diff(final_params(res["dir"]), reference["params"])
    assert diff < TOL, f"zero2 resume: {name} differs by {diff:.2e}"


@pytest.mark.distributed
def test_zero3_checkpoint_exports_to_one_file(data, workdir, reference, tmp_path):
    from safetensors.torch import load_file

    from mtp_pretrain.export import export_single_file, load_model

    zero3 = strategy_runs("zero3", data, workdir)["hs"]
    out = export_single_file(Path(zero3["dir"]) / "checkpoints", tmp_path / "export")
    sd = load_file(out / "model.safetensors")
    diff, name = max_param_diff(sd, reference["params"])
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
