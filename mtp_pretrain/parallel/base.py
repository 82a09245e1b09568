"""The strategy interface: everything the train loop needs from a parallelism scheme.

A strategy is applied *to* a plain ``MTPTransformer``; the model code never branches on it.
The train loop calls, per step: ``grad_sync_hooks`` (handed to the loss, once per micro-batch),
``finish_backward`` (after the last micro-batch), then ``step``: the one meaning of an optimizer
step for every strategy (pre-clip global gradient norm, clipping, the update unless the loss or the
norm is non-finite, gradients cleared either way).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from mtp_pretrain.config import ParallelConfig
from mtp_pretrain.loss import GradSyncHooks
from mtp_pretrain.parallel.layout import ParallelDims
from mtp_pretrain.parallel.setup import DistEnv


class Strategy:
    name = "none"
    # What validation can do on this strategy's model: top-1 accuracy needs full logits on a rank
    # (not where the unembedding is vocab-sharded); decoding needs the whole model (``full_model``).
    full_logits = True
    decodes = True
    # The optimizer state lives in DeepSpeed's ZeRO partitions, not in the torch optimizer.
    zero_optimizer = False

    def __init__(self, cfg: ParallelConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env

    # --- layout -------------------------------------------------------------------------------
    @functools.cached_property
    def dims(self) -> ParallelDims:
        """The parallel layout (derived and validated on first use: ``validate`` asks first)."""
        return ParallelDims.from_config(self.name, self.cfg, self.env)

    @property
    def dp_size(self) -> int:
        """Ranks that see different data (gradient accumulation and data sharding use it)."""
        return self.dims.dp

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        """Fail at start-up on a layout or model this strategy cannot run (overrides call this first)."""
        self.dims  # noqa: B018 - derives and validates the degrees

    # --- model and optimizer -------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        from mtp_pretrain.parallel.blocks import apply_block_options

        return apply_block_options(model.to(self.env.device), self.cfg)

    def build_optimizer(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        return make_optimizer(model)

    def full_model(self, model: nn.Module, model_cfg) -> nn.Module | None:
        """The whole model as one plain module on the main rank (None on the others), for
        validation decoding. Every rank must call it (fsdp gathers)."""
        return model if self.env.is_main else None

    # --- one step -----------------------------------------------------------------------------
    def loss_context(self):
        """Entered around each loss call (forward *and* its backward passes): TP's
        ``loss_parallel``; nothing for the other strategies."""
        return contextlib.nullcontext()

    def grad_sync_hooks(self, model: nn.Module, last_micro_batch: bool) -> GradSyncHooks:
        return GradSyncHooks()

    def finish_backward(self, model: nn.Module) -> None:
        """After the last micro-batch's backward, before clipping."""

    def step(self, model: nn.Module, optimizer, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Clip to ``max_norm`` (0 = off) and take the optimizer step unless the loss or the
        gradient norm is non-finite; clear the gradients either way. Returns (pre-clip global
        gradient norm, whether the parameters were updated)."""
        grad_norm = float(self.clip_grad_norm(model, max_norm))
        stepped = loss_is_finite and math.isfinite(grad_norm)
        if stepped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global pre-clip gradient norm; gradients scaled down to ``max_norm`` (0 = off)."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # --- collectives over the data-parallel ranks ---------------------------------------------
    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average over the data-parallel ranks (TP ranks of one group hold the same values)."""
        if self.dims.dp > 1:
            group = None if self.dims.dp == self.env.world_size else self.dims.mesh["dp"].get_group()
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            t /= self.dims.dp
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.env.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    # --- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module, optimizer) -> dict:
        """DCP-saveable Stateful objects for model and optimizer, keyed by parameter names of the
        plain model, so any strategy and world size can load what any other wrote."""
        return {"model": ModelState(model), "optim": OptimState(model, optimizer)}


class ModelState(Stateful):
    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd):
        set_model_state_dict(self.model, sd)


class OptimState(Stateful):
    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd):
        set_optimizer_state_dict(self.model, self.optimizer, sd)
