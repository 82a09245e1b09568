"""Meta-device initialisation: sharded models initialised shard by shard hold exactly the
one-process initial weights, whatever the world size and strategy; a 7b model shards on 2 ranks
without a host copy; ``train.init_from`` reads into the shards.

Each multi-rank case is one launch of bench/meta_init.py's worker (several set-ups in one
process group); rank 0 gathers the sharded model (``get_model_state_dict(full_state_dict=True)``;
DeepSpeed and megatron: their checkpoint state after the engine / optimizer exists, ZeRO-3's
module partitions too; pipeline stages: every rank's own) and the test compares it with
``MTPTransformer(cfg, init_seed=train.seed)`` built here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.common import LaunchError
from bench.meta_init import run_variants
from conftest import THREADS
from mtp_pretrain.config import compose_job_config
from mtp_pretrain.model import MTPTransformer, count_parameters, model_config

SEED = 1234
TINY = ["model=tiny", "train.device=cpu", f"train.seed={SEED}"]


def launch(out: Path, nproc: int, runs: list[dict], timeout: float = 900) -> dict[str, dict]:
    """Run the worker's ``runs`` in one launch of ``nproc`` ranks; {name: its figures}."""
    try:
        return run_variants(out, nproc, runs, threads=int(THREADS), timeout=timeout)
    except LaunchError as e:
        pytest.fail(str(e))


def one_process_init(overrides: list[str]) -> dict[str, torch.Tensor]:
    cfg = compose_job_config(overrides)
    return MTPTransformer(cfg.model, init_seed=cfg.train.seed).state_dict()


def split_module_partitions(got: dict) -> tuple[dict, dict]:
    """(the checkpoint state's tensors, ZeRO-3's gathered module partitions saved as "module/<name>")."""
    module = {k.removeprefix("module/"): v for k, v in got.items() if k.startswith("module/")}
    return {k: v for k, v in got.items() if not k.startswith("module/")}, module


def assert_same_weights(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys() and len(want) > 0, what
    for k in want:
        assert got[k].shape == want[k].shape, f"{what}: {k} shape {tuple(got[k].shape)} vs {tuple(want[k].shape)}"
        assert torch.equal(got[k], want[k]), (f"{what}: {k} differs from the one-process init "
                                              f"(max {(got[k] - want[k]).abs().max().item():.3e})")


# --- the per-parameter rule, in this process --------------------------------------------------------
def test_initial_weights_depend_only_on_seed_and_name():
    cfg = model_config("tiny", vocab_size=256, dim=64, n_layers=2)
    a = MTPTransformer(cfg, init_seed=3).state_dict()
    torch.manual_seed(99)  # the global generator plays no part
    b = MTPTransformer(cfg, init_seed=3).state_dict()
    assert_same_weights(b, a, "same seed")
    other = MTPTransformer(cfg, init_seed=4).state_dict()
    assert not torch.equal(other["trunk.0.mlp.up_proj.weight"], a["trunk.0.mlp.up_proj.weight"])
    # Another n_future adds or drops heads, the shared parameters keep their values.
    fewer = MTPTransformer(cfg.replace(n_future=2), init_seed=3).state_dict()
    assert set(fewer) < set(a) and any(k.startswith("heads.1.") for k in fewer)
    assert_same_weights(fewer, {k: a[k] for k in fewer}, "n_future=2 vs 4")


def test_meta_build_has_no_storage_and_materialises_to_the_same_weights():
    from mtp_pretrain.parallel.materialize import materialize

    cfg = model_config("tiny", vocab_size=256, dim=64, n_layers=2, tie_embeddings=True)
    with torch.device("meta"):
        model = MTPTransformer(cfg)
    assert all(p.is_meta for p in model.parameters()) and model.rope_cos.is_meta
    materialize(model, torch.device("cpu"), seed=5)
    assert model.unembed.weight is model.tok_embeddings.weight
    ref = MTPTransformer(cfg, init_seed=5)
    assert_same_weights(model.state_dict(), ref.state_dict(), "materialised on one process")
    assert torch.equal(model.rope_cos, ref.rope_cos) and torch.equal(model.rope_sin, ref.rope_sin)


# --- sharded initialisation on 1, 2 and 4 ranks ----------------------------------------------------
ZERO3 = ["parallel=deepspeed", "parallel.zero_stage=3"]
MEGATRON = ["parallel=megatron", "parallel.tp_size=2"]
PARITY = {
    1: {"fsdp": ["parallel=fsdp"], "tp": ["parallel=tp"]},
    2: {"fsdp": ["parallel=fsdp"], "tp": ["parallel=tp"],
        "fsdp_tied": ["parallel=fsdp", "model.tie_embeddings=true"],
        "tp_causal_tied": ["parallel=tp", "model.head_type=causal", "model.tie_embeddings=true"],
        "fsdp_linear_heads": ["parallel=fsdp", "model.head_type=linear"],
        "zero3": ZERO3,
        "zero3_linear_heads": ZERO3 + ["model.head_type=linear"],
        "zero3_bf16": ZERO3 + ["train.dtype=bfloat16"],  # bf16 partitions, fp32 master copied from them
        "zero2": ["parallel=deepspeed", "parallel.zero_stage=2"],  # on the host: full replicas, same rule
        "megatron": MEGATRON,
        "megatron_causal_tied": MEGATRON + ["model.head_type=causal", "model.tie_embeddings=true"],
        "pp_shared_heads": ["parallel.pp_size=2", "model.head_type=causal", "model.share_extra_heads=true"],
        "pp_fsdp_tied": ["parallel=fsdp", "parallel.pp_size=2", "model.tie_embeddings=true"]},
    4: {"fsdp": ["parallel=fsdp"], "tp": ["parallel=tp"], "fsdp_tp": ["parallel=fsdp_tp", "parallel.tp_size=2"]},
}
# The most of the model's float32 bytes one rank may hold after set-up (default 0.6): of the tiny
# model's two pipeline stages the last holds every head and the unembedding (measured 0.85 and 0.87),
# ZeRO-2 keeps replicas.
LOCAL_SHARE = {"pp_shared_heads": 0.9, "pp_fsdp_tied": 0.9, "zero2": 1.0}
ON_HOST = {"zero2"}
SEVEN_B = ["model=7b", "parallel=fsdp", "train.device=cpu"]


def init_from_cases(reference_run: Path, export: Path) -> dict[str, list[str]]:
    ckpt = reference_run / "checkpoints"
    return {"dcp_fsdp": ["parallel=fsdp", f"train.init_from={ckpt}", "model.n_future=2"],
            "export_tp": ["parallel=tp", f"train.init_from={export}", "model.n_future=6"],
            "dcp_zero3": ZERO3 + [f"train.init_from={ckpt}", "model.n_future=6"],
            "export_zero3": ZERO3 + [f"train.init_from={export}", "model.n_future=2"],
            "dcp_megatron": MEGATRON + [f"train.init_from={ckpt}", "model.n_future=2"]}


@pytest.fixture(scope="module")
def two_rank_launch(tmp_path_factory, reference_run, train_overrides):
    """The 2-rank parity set-ups, the 7b sharding and the init_from cases, in one launch (one
    process start-up)."""
    from mtp_pretrain.export import export_single_file

    out = tmp_path_factory.mktemp("meta2")
    export = export_single_file(reference_run / "checkpoints", out / "export")
    runs = [{"name": name, "mode": "init", "overrides": TINY + extra} for name, extra in PARITY[2].items()]
    runs.append({"name": "7b", "mode": "shard", "overrides": SEVEN_B})
    runs += [{"name": name, "mode": "init", "overrides": train_overrides + extra}
             for name, extra in init_from_cases(reference_run, export).items()]
    return out, export, launch(out, 2, runs)


@pytest.mark.distributed
@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.slow), 2, 4])
def test_sharded_init_equals_one_process(world, two_rank_launch, tmp_path):
    if world == 2:
        out, _, results = two_rank_launch
    else:
        out = tmp_path
        results = launch(out, world, [{"name": name, "mode": "init", "overrides": TINY + extra}
                                      for name, extra in PARITY[world].items()])
    for name, extra in PARITY[world].items():
        assert results[name]["world_size"] == world
        assert results[name]["built_on_meta"] == [name not in ON_HOST] * world, (name, results[name])
        got, module_partitions = split_module_partitions(torch.load(out / f"{name}.pt"))
        want = one_process_init(TINY + extra)
        if name.endswith("bf16"):  # what the host path's bf16 module (and the master copied from it) holds
            want = {k: v.to(torch.bfloat16).float() for k, v in want.items()}
        assert_same_weights(got, want, f"{name} on {world} ranks")
        if name.startswith("zero3"):  # what the forward gathers, as well as the fp32 master weights
            assert_same_weights({k: v.float() for k, v in module_partitions.items()}, want,
                                f"{name}: ZeRO-3 module partitions on {world} ranks")
        # each rank held only its shards (tp: replicated norms aside), a tied / shared parameter once
        with torch.device("meta"):
            full = sum(p.numel() * 4 for p in MTPTransformer(compose_job_config(TINY + extra).model).parameters())
        if world > 1:
            assert max(results[name]["local_param_bytes"]) <= LOCAL_SHARE.get(name, 0.6) * full, \
                (name, results[name]["local_param_bytes"], full)


@pytest.mark.distributed
def test_7b_shards_on_meta_without_a_host_copy(two_rank_launch):
    """``7b`` (n=4) with fsdp on 2 ranks: built on the meta device and sharded (every ``fully_shard``
    applied), each rank's local shards are half the model, and no rank's peak RSS (``ru_maxrss``:
    the whole process since it started, Python and torch included) reaches half the model's
    float32 size. The set-up stops before materialisation: 7b's float32 shards alone would take
    ~27 GB per 2 ranks, more than this machine has (the 1b test below materialises and steps)."""
    _, _, results = two_rank_launch
    r = results["7b"]
    full = count_parameters(model_config("7b"))["total"] * 4
    assert r["world_size"] == 2 and r["all_meta"] == [True, True]
    assert all(abs(b - full / 2) < 0.01 * full for b in r["local_param_bytes"]), (r["local_param_bytes"], full)
    assert max(r["peak_rss_bytes"]) < full / 2, (r["peak_rss_bytes"], full)


# --- init_from reads into the shards ----------------------------------------------------------------
@pytest.mark.distributed
def test_init_from_loads_into_the_shards(two_rank_launch, reference_run, train_overrides):
    """A DCP checkpoint (fsdp, n=4 -> 2 heads) and a single-file export (tp, n=4 -> 6 heads) read
    into the shards equal ``load_model_weights`` on one process; heads the source lacks keep
    their seed's init. The same into ZeRO-3's partitions and megatron's TP shards (DCP read one
    full parameter at a time there)."""
    from mtp_pretrain.checkpoint_reader import load_model_weights

    out, export, results = two_rank_launch
    for name, extra in init_from_cases(reference_run, export).items():
        assert results[name]["world_size"] == 2
        cfg = compose_job_config(train_overrides + extra)
        want = MTPTransformer(cfg.model, init_seed=cfg.train.seed)
        load_model_weights(want, cfg.train.init_from, log=lambda _: None)
        assert results[name]["built_on_meta"] == [True, True], name
        got, module_partitions = split_module_partitions(torch.load(out / f"{name}.pt"))
        assert_same_weights(got, want.state_dict(), name)
        if "zero3" in name:
            assert_same_weights(module_partitions, want.state_dict(), f"{name}: ZeRO-3 module partitions")


# --- 1b through the first step ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_1b_first_step_on_meta_equals_the_host_path(tmp_path):
    """``1b`` (n=4: 1.68B parameters, 6.26 GiB in float32) with fsdp on 2 ranks, set up once on the
    meta device and once on the host (``parallel.meta_init=false``), one launch after the other,
    then the first training step: forward, head-sequential backward (gradients reduce-scattered)
    and the global gradient norm -- bitwise the same per-head losses and gradient norm (the same
    initial weights, sharded the same way, run through the same operations). The step stops before
    ``optimizer.step()``: AdamW's two float32 moments would add 2 x 3.13 GiB per rank, 12.5 GiB
    on top of the 20.6 GiB the two ranks peak at here, more than this 24 GB machine has.

    Set-up memory (``ru_maxrss`` after the model is built, sharded and initialised; the whole
    process, Python and torch included): on the meta device each rank stays below its shards
    (half the float32 model) + twice the largest parameter (its full value while it is
    initialised, and the slice cut from it) + 0.5 GiB for the process, while the host path holds
    the whole model on every rank.

    Step memory (``VmHWM``, reset just before the step; measured 10.13-10.31 GiB per rank, host and
    meta alike): by the end each rank holds its parameter shards and its gradient shards (half the
    model each), and the peak comes at the last reduction of the trunk's backward, the embedding's
    (V x d = 0.98 GiB, the largest unit with the unembedding): its gathered parameters, its
    full-size gradient, FSDP's float32 reduce-scatter input and the reduce-scatter's output are
    alive together. Bound: params / 2 +
    params / 2 + 4 x V x d x 4 bytes + 0.5 GiB for the process (Python, torch, gloo: 0.35 GiB on
    tiny) = 10.68 GiB. Every unit holds only its shard outside its own forward/backward window
    (tests/test_parallel.py checks it after a step and after validation); the units called as FSDP
    roots (the embedding through every head, each head and the unembedding after a forward
    without gradients) stayed gathered before, but that did not raise this peak: the same step on
    the code before that change peaked at 10.30 GiB (the embedding is gathered at this point
    either way). The backward was killed for memory here before the trunk's blocks were resharded
    after their forward and their reduce-scatter buffers freed (docs/scaling.md)."""
    cfg = model_config("1b")
    full = count_parameters(cfg)["total"] * 4
    largest = cfg.vocab_size * cfg.dim * 4
    results = {}
    for variant in ("host", "meta"):
        overrides = ["model=1b", "parallel=fsdp", f"parallel.meta_init={str(variant == 'meta').lower()}",
                     "train.device=cpu", "data.seq_len=16", "train.micro_batch_size=1"]
        results |= launch(tmp_path / variant, 2, [{"name": variant, "mode": "step", "overrides": overrides}],
                          timeout=2400)
    host, meta = results["host"], results["meta"]
    assert len(meta["losses"]) == 4 and all(5 < x < 20 for x in meta["losses"]), meta["losses"]
    assert meta["losses"] == host["losses"], (meta["losses"], host["losses"])
    assert meta["grad_norm"] is not None and meta["grad_norm"] > 0
    assert meta["grad_norm"] == host["grad_norm"], (meta["grad_norm"], host["grad_norm"])
    for r in (host, meta):  # every parameter has its gradient shard: half the model on each rank
        assert all(abs(b - full / 2) < 0.01 * full for b in r["local_grad_bytes"]), (r["local_grad_bytes"], full)
    assert max(meta["setup_peak_rss_bytes"]) < full / 2 + 2 * largest + 2**29, (meta["setup_peak_rss_bytes"], full)
    assert min(host["setup_peak_rss_bytes"]) > full, (host["setup_peak_rss_bytes"], full)
    step_bound = full + 4 * largest + 2**29
    for r in (host, meta):
        assert None not in r["step_peak_rss_bytes"], "the kernel refused to reset VmHWM"
        assert max(r["step_peak_rss_bytes"]) < step_bound, (r["name"], r["step_peak_rss_bytes"], step_bound)
