"""The parallel layout (parallel/layout.py): degrees per strategy, rank coordinates, refusals."""

import pytest
import torch

from mtp_pretrain.config import ParallelConfig
from mtp_pretrain.parallel.layout import ParallelDims
from mtp_pretrain.parallel.setup import DistEnv


def _dims(strategy: str, world: int, rank: int = 0, **kw) -> ParallelDims:
    env = DistEnv(rank=rank, world_size=world, local_rank=0, device=torch.device("cpu"), backend="gloo")
    return ParallelDims.from_config(strategy, ParallelConfig(strategy=strategy, **kw), env)


@pytest.mark.parametrize("strategy,world,kw,degrees", [
    ("none", 1, {}, (1, 1, 1, 1)),
    ("ddp", 4, {}, (1, 4, 1, 1)),
    ("deepspeed", 4, {"zero_stage": 3}, (1, 4, 1, 1)),
    ("fsdp", 4, {}, (1, 1, 4, 1)),
    ("tp", 4, {}, (1, 1, 1, 4)),
    ("tp", 4, {"tp_size": 4}, (1, 1, 1, 4)),
    ("fsdp_tp", 8, {"tp_size": 2}, (1, 1, 4, 2)),
    ("megatron", 8, {"tp_size": 4}, (1, 2, 1, 4)),
    ("none", 4, {"pp_size": 4}, (4, 1, 1, 1)),
    ("fsdp", 8, {"pp_size": 2}, (2, 1, 4, 1)),
    ("tp", 8, {"pp_size": 2}, (2, 1, 1, 4)),
    ("fsdp_tp", 8, {"pp_size": 2, "tp_size": 2}, (2, 1, 2, 2)),
])
def test_degrees_per_strategy(strategy, world, kw, degrees):
    d = _dims(strategy, world, **kw)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp) == degrees
    assert d.pp * d.dp * d.tp == world


def test_rank_coordinates_tp_innermost_pp_outermost():
    """Every rank gets distinct (pp, dp, tp) coordinates; TP groups are neighbouring ranks."""
    world = 16
    coords = [(d.pp_rank, d.dp_rank, d.tp_rank)
              for d in (_dims("fsdp_tp", world, rank=r, tp_size=2, pp_size=2) for r in range(world))]
    assert len(set(coords)) == world
    assert coords[:4] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
    assert coords[8] == (1, 0, 0) and coords[15] == (1, 3, 1)


@pytest.mark.parametrize("strategy,world,kw,msg", [
    ("none", 2, {}, "parallel.strategy=none runs one process, but the launcher started 2"),
    ("none", 4, {"pp_size": 2}, "parallel.strategy=none runs 2 pipeline stages, but the launcher started 4"),
    ("fsdp", 6, {"pp_size": 4}, "world size 6 is not divisible by parallel.pp_size=4"),
    ("deepspeed", 4, {"zero_stage": 1, "pp_size": 2}, "parallel.pp_size=2 does not combine with parallel.strategy="
                                                      "deepspeed"),
    ("megatron", 4, {"tp_size": 2, "pp_size": 2}, "does not combine with parallel.strategy=megatron"),
    ("ddp", 4, {"tp_size": 2}, "parallel.strategy=ddp does not combine with tensor parallelism"),
    ("fsdp_tp", 4, {"tp_size": 1}, "fsdp_tp needs parallel.tp_size >= 2, got 1"),
    ("megatron", 6, {"tp_size": 4}, "world size 6 is not divisible by parallel.tp_size=4"),
    ("tp", 4, {"tp_size": 2}, "parallel.tp_size=2 and the launcher started 4"),
])
def test_refusals_name_the_setting(strategy, world, kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(".", r"\.")):
        _dims(strategy, world, **kw)


def test_config_refuses_pp_size_below_one():
    with pytest.raises(ValueError, match="parallel.pp_size"):
        ParallelConfig(pp_size=0)
