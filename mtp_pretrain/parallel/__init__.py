"""Parallelism strategies, applied to the plain model from outside (see base.Strategy)."""

from __future__ import annotations

import torch

from mtp_pretrain.config import ParallelConfig
from mtp_pretrain.parallel.base import Strategy
from mtp_pretrain.parallel.setup import DistEnv, destroy_distributed, init_distributed


def build_strategy(cfg: ParallelConfig, env: DistEnv, param_dtype: torch.dtype | None = None) -> Strategy:
    if cfg.strategy == "none":
        return Strategy(cfg, env)
    if cfg.strategy == "ddp":
        from mtp_pretrain.parallel.ddp import DDPStrategy

        return DDPStrategy(cfg, env)
    if cfg.strategy == "fsdp":
        from mtp_pretrain.parallel.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, env, param_dtype)
    if cfg.strategy == "tp":
        from mtp_pretrain.parallel.tp import TPStrategy

        return TPStrategy(cfg, env, param_dtype)
    if cfg.strategy == "fsdp_tp":
        from mtp_pretrain.parallel.tp import FSDPTPStrategy

        return FSDPTPStrategy(cfg, env, param_dtype)
    if cfg.strategy == "deepspeed":
        from mtp_pretrain.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, env, param_dtype)
    if cfg.strategy == "megatron":
        from mtp_pretrain.parallel.megatron import MegatronStrategy

        return MegatronStrategy(cfg, env, param_dtype)
    raise ValueError(f"parallel.strategy={cfg.strategy!r} is not available in this build")


__all__ = ["DistEnv", "Strategy", "build_strategy", "destroy_distributed", "init_distributed"]
