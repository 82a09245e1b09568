"""AdamW with decoupled weight decay and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from mtp_pretrain.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; never norms, biases or the (un)embedding tables."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim  # a ZeRO-3 partition is flat
        if ndim < 2 or "norm" in name or "tok_embeddings" in name or "unembed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def group_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Each optimizer group's parameter names. Taken before a ZeRO wrapper replaces the groups'
    params with flat partitions (after which the names can no longer be derived)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def build_adamw(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of optim.lr at optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max_steps - int(cfg.decay_fraction * max_steps)  # wsd
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1.0 - cfg.min_lr_ratio) * progress


def build_scheduler(optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


@torch.no_grad()
def init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """Create now the state AdamW creates lazily at a parameter's first step (step 0, zero
    moments), for every parameter that has none. A parameter without a gradient yet (a head the
    curriculum turns on later) otherwise has no state in a checkpoint, and resuming fails: the
    optimizer being loaded initialises state for all parameters and then looks for theirs. The
    numbers are those of the lazy initialisation, so training is unchanged."""
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("capturable") or group.get("amsgrad"):
            raise ValueError("init_adamw_state supports plain AdamW (no fused / capturable / amsgrad)")
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float64 if torch.get_default_dtype() == torch.float64
                                             else torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
