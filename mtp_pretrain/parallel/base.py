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
        if cfg.pp_size > 1:  # no rank holds the whole model (validation passes run through the stages)
            self.full_logits = self.decodes = False

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

    @functools.cached_property
    def pipeline(self):
        """This rank's pipeline stages and their schedule (``parallel/pipeline.py``) when
        parallel.pp_size > 1, else None (built on first use: a collective, every rank asks)."""
        if self.cfg.pp_size == 1:
            return None
        from mtp_pretrain.parallel.pipeline import build_pipeline

        return build_pipeline(self.cfg, self.dims, self.env.device)

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        """Fail at start-up on a layout or model this strategy cannot run (overrides call this first)."""
        self.dims  # noqa: B018 - derives and validates the degrees

    # --- model and optimizer -------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        from mtp_pretrain.parallel.blocks import apply_block_options
        from mtp_pretrain.parallel.materialize import to_device

        return apply_block_options(to_device(self.keep_own_stages(model), self.env.device), self.cfg)

    def shards(self, model: nn.Module):
        """Where each rank keeps its part of each parameter of the parallelised ``model``
        (``materialize.Shards``: DTensor placements, else whole)."""
        from mtp_pretrain.parallel.materialize import Shards

        return Shards()

    def materialize(self, model: nn.Module, seed: int, log) -> None:
        """Storage and initial values (``model/init.py``) for the parallelised ``model`` built on the
        meta device (``materialize.builds_on_meta``): each rank only its own part of each parameter."""
        from mtp_pretrain.parallel.materialize import materialize

        materialize(model, self.env.device, seed, log, self.shards(model))

    def keep_own_stages(self, model: nn.Module, **boundary) -> nn.Module:
        """Under pipeline parallelism, the model reduced to this rank's stages (first thing in
        ``parallelize``, before any sharding); otherwise the model. ``boundary``: how hidden
        states enter and leave a stage (``Pipeline.split``)."""
        return model if self.pipeline is None else self.pipeline.split(model, **boundary)

    def build_optimizer(self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]):
        return make_optimizer(model)

    def full_model(self, model: nn.Module, model_cfg) -> nn.Module | None:
        """The whole model as one plain module on the main rank (None on the others), for
        validation decoding. Every rank must call it (fsdp gathers)."""
        if self.pipeline is not None:
            raise NotImplementedError("the whole model on one rank under pipeline parallelism (decodes=False)")
        return model if self.env.is_main else None

    # --- one step -----------------------------------------------------------------------------
    def loss_context(self):
        """Entered around each loss call (forward *and* its backward passes): TP's
        ``loss_parallel``; nothing for the other strategies."""
        return contextlib.nullcontext()

    def grad_sync_hooks(self, model: nn.Module, last_micro_batch: bool) -> GradSyncHooks:
        return GradSyncHooks()

    def forward_backward(self, model: nn.Module, batches: list[torch.Tensor], loss: Callable, autocast,
                         seq_len: int, document_end_id: int | None) -> torch.Tensor:
        """Forward and backward of one step's micro-batches: ``loss(micro, tokens, hooks, trunk_output=None)``
        is the trainer's loss of micro-batch ``micro`` (an ``MTPLoss``; it runs its own backward, scaled
        by 1 / len(batches)). Returns the per-head losses averaged over the micro-batches
        (float64, CPU), on every rank of a data-parallel replica. Under pipeline parallelism the
        schedule runs them (its stages read ``seq_len`` and ``document_end_id``: the loss is not
        the only one to need them)."""
        if self.pipeline is not None:
            with autocast, self.loss_context():
                return self.pipeline.forward_backward(
                    model, batches, loss, lambda last: self.grad_sync_hooks(model, last_micro_batch=last),
                    seq_len, document_end_id)
        per_head = None
        for micro, tokens in enumerate(batches):
            hooks = self.grad_sync_hooks(model, last_micro_batch=micro == len(batches) - 1)
            with autocast, self.loss_context():
                out = loss(micro, tokens, hooks)
            this = torch.stack(out.per_head).double().cpu() / len(batches)
            per_head = this if per_head is None else per_head + this
        return per_head

    @torch.no_grad()
    def evaluate_loss(self, model: nn.Module, tokens: torch.Tensor, *, seq_len: int, chunk_size: int,
                      pad_id: int | None, document_end_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head summed cross-entropy and target counts of one batch (float64, CPU), no
        gradients; under pipeline parallelism through the stages, on every rank."""
        from mtp_pretrain.loss import evaluate_loss

        def sums_and_counts(z=None):
            s, c = evaluate_loss(model, tokens, seq_len=seq_len, chunk_size=chunk_size, pad_id=pad_id,
                                 document_end_id=document_end_id, trunk_output=z)
            return torch.cat([torch.stack(s).double().cpu(), torch.tensor(c, dtype=torch.float64)])

        if self.pipeline is not None:
            out = self.pipeline.forward_last(tokens, seq_len, document_end_id, sums_and_counts, 2 * model.n_future)
        else:
            out = sums_and_counts()
        return out[:model.n_future], out[model.n_future:]

    def release_gathered(self, model: nn.Module) -> None:
        """After a pass of forward-only calls (validation): free what the strategy gathered and kept
        for reuse within the pass, since no backward comes to free it (FSDP: the unembedding,
        used by every head and sequence). Nothing for strategies that gather nothing."""

    def finish_backward(self, model: nn.Module) -> None:
        """After the last micro-batch's backward, before clipping."""
        if self.pipeline is not None:
            self.pipeline.finish_backward(model)

    def step(self, model: nn.Module, optimizer, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        """Clip to ``max_norm`` (0 = off) and take the optimizer step unless the loss or the
        gradient norm is non-finite; clear the gradients either way. Returns (pre-clip global
        gradient norm, whether the parameters were updated)."""
        if self.pipeline is not None:  # the norm spans every stage
            from mtp_pretrain.parallel.pipeline import clip_pipeline_grads_

            grad_norm = float(clip_pipeline_grads_(self.pipeline, model, max_norm))
        else:
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
