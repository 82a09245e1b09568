"""The parallel layout: how the world's ranks divide into pipeline stages, data-parallel ranks and
tensor-parallel groups. The one place where degrees are derived and validated, where the device
mesh (or megatron's process groups) is built, and where every rank's coordinates come from;
strategies, the data loader and the checkpoint layer all read it.

Rank order, outermost to innermost: pp, dp, tp. The ranks of one TP group are neighbours (one
node, the fastest links); a pipeline stage is a contiguous block of ``dp * tp`` ranks. Megatron
orders its groups the same way, so both backends agree on every rank's coordinates.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.distributed as dist

from mtp_pretrain.config import ParallelConfig
from mtp_pretrain.parallel.setup import DistEnv

# Strategies that shard parameters over their data-parallel ranks (the rest replicate them there).
_SHARDING = ("fsdp", "fsdp_tp")
# Strategies that take pipeline stages (parallel.pp_size > 1).
PIPELINE_STRATEGIES = ("none", "fsdp", "tp", "fsdp_tp")


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    device_type: str
    pp: int  # pipeline stages
    dp_replicate: int  # data-parallel ranks holding full replicas of their parameters
    dp_shard: int  # data-parallel ranks sharding parameters (fsdp)
    tp: int  # tensor-parallel degree

    def __post_init__(self):
        if self.pp * self.dp * self.tp != self.world_size:
            raise ValueError(f"parallel layout pp={self.pp} x dp={self.dp} x tp={self.tp} does not cover the "
                             f"{self.world_size} ranks the launcher started")
        if self.dp_replicate > 1 and self.dp_shard > 1:
            raise ValueError("replicated and sharded data parallelism together (HSDP) is not supported")

    @classmethod
    def from_config(cls, strategy: str, cfg: ParallelConfig, env: DistEnv) -> "ParallelDims":
        """Derive and validate the degrees of ``parallel.strategy`` on ``env.world_size`` ranks."""
        ws, pp = env.world_size, cfg.pp_size
        if pp > 1 and strategy not in PIPELINE_STRATEGIES:
            raise ValueError(f"parallel.pp_size={pp} does not combine with parallel.strategy={strategy}; "
                             f"pipeline stages compose with {', '.join(PIPELINE_STRATEGIES)}")
        if ws % pp:
            raise ValueError(f"world size {ws} is not divisible by parallel.pp_size={pp}")
        per_stage = ws // pp
        tp = 1
        if strategy == "none":
            if per_stage > 1:
                what = f"{pp} pipeline stages" if pp > 1 else "one process"
                raise ValueError(f"parallel.strategy=none runs {what}, but the launcher started {ws}; "
                                 f"choose ddp, fsdp, tp, fsdp_tp, deepspeed or megatron")
        elif strategy == "tp":
            tp = cfg.tp_size if cfg.tp_size > 1 else per_stage
            if tp != per_stage:
                raise ValueError(f"parallel.strategy=tp uses every rank for tensor parallelism, but parallel.tp_size="
                                 f"{cfg.tp_size} and the launcher started {ws} processes; set tp_size={per_stage} "
                                 f"(or 1 = all ranks), or use parallel.strategy=fsdp_tp for data x tensor "
                                 f"parallelism")
        elif strategy == "fsdp_tp":
            if cfg.tp_size < 2:
                raise ValueError(f"parallel.strategy=fsdp_tp needs parallel.tp_size >= 2, got {cfg.tp_size} "
                                 f"(use parallel.strategy=fsdp for data parallelism alone)")
            tp = cfg.tp_size
        elif strategy == "megatron":
            tp = cfg.tp_size
        elif cfg.tp_size != 1:
            raise ValueError(f"parallel.strategy={strategy} does not combine with tensor parallelism here "
                             f"(parallel.tp_size={cfg.tp_size}); use fsdp_tp")
        if per_stage % tp:
            suffix = {"megatron": " (parallel.strategy=megatron runs world_size / tp_size data-parallel groups)"}
            raise ValueError(f"world size {ws} is not divisible by parallel.tp_size={tp}"
                             + suffix.get(strategy, ""))
        dp = per_stage // tp
        shard = strategy in _SHARDING
        return cls(world_size=ws, rank=env.rank, device_type=env.device.type, pp=pp,
                   dp_replicate=1 if shard else dp, dp_shard=dp if shard else 1, tp=tp)

    # --- coordinates ----------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        """Ranks that see different data (gradient accumulation and data sharding use it)."""
        return self.dp_replicate * self.dp_shard

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp)

    def __str__(self) -> str:
        return f"pp={self.pp} dp={self.dp} ({'shard' if self.dp_shard > 1 else 'replicate'}) tp={self.tp}"

    # --- communication ----------------------------------------------------------------------------
    @functools.cached_property
    def mesh(self):
        """The (pp, dp, tp) DeviceMesh, built once (a collective: every rank must ask)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))

    @functools.cached_property
    def megatron_state(self):
        """megatron-core's ``parallel_state`` with this layout's TP/PP groups, initialised once (a
        collective: every rank must ask). Re-initialised if it holds another process group's or
        another layout's groups (tests run several jobs in one process)."""
        from megatron.core import parallel_state as ps

        if not dist.is_initialized():  # one process: a one-rank group so parallel_state works
            dist.init_process_group("gloo" if self.device_type == "cpu" else "nccl", store=dist.HashStore(),
                                    rank=0, world_size=1)
        world = dist.distributed_c10d._get_default_group()
        if ps.model_parallel_is_initialized() and (getattr(ps, "_mtp_world", None) is not world
                                                   or ps.get_tensor_model_parallel_world_size() != self.tp
                                                   or ps.get_pipeline_model_parallel_world_size() != self.pp):
            ps.destroy_model_parallel()
        if not ps.model_parallel_is_initialized():
            ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp)
            ps._mtp_world = world
        if (ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank()) != (self.dp_rank, self.tp_rank):
            raise RuntimeError(f"megatron's rank order differs from the layout's ({self}) on rank {self.rank}")
        return ps
