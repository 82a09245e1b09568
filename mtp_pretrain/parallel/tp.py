"""Tensor parallelism with ``torch.distributed.tensor`` (``tp``), and its 2-D combination with
FSDP2 (``fsdp_tp``), executing the plan in ``tp_plan.py``.

Layout: a DeviceMesh ``(dp, tp)`` with tp innermost (the ranks of one TP group are neighbours,
on one node). ``tp`` is the special case dp = 1. Sequence parallelism: norms run on T/tp
positions per rank, attention and the MLP all-gather it, split their matmuls by head / ffn column,
and reduce-scatter back. Between blocks the residual stream is a DTensor sharded along the
sequence (so shapes, hence RoPE positions, read as global), each rank holding [B, T/tp, dim].

The shared unembedding is split over the vocabulary. Its forward is replaced on the instance
(the model code knows nothing of it) by ``vocab_parallel_unembed``: gather the sequence,
``F.linear`` with the vocab-sharded weight gives logits sharded over the vocabulary,
``F.cross_entropy`` of those under ``loss_parallel`` reduces max / sum-exp / target logit across
the TP ranks. No rank holds B x T x V logits. ``loss.chunk_size`` bounds them further: the
tokens are taken ``chunk_size`` at a time, each chunk under activation checkpointing, so the
backward too recomputes one chunk's logits at a time (costing one extra unembedding matmul).
The backward of the loss must run inside ``loss_parallel()``: ``Strategy.loss_context``.

The head-sequential loss: every head's forward and backward runs on the TP modules as on plain
ones. Under pure TP the unembedding's gradient is a vocab shard that needs no communication at
all (the all-gather of its input in forward has a reduce-scatter as backward); replicated
parameters (norms) are all-reduced by DTensor as their gradients are formed. Under ``fsdp_tp``
the data-parallel reduce-scatter of the unembedding is held back to the last head, as in fsdp.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel, loss_parallel,
                                               parallelize_module)

from mtp_pretrain.loss import GradSyncHooks
from mtp_pretrain.ops import checkpointed_chunk_sum
from mtp_pretrain.parallel import tp_plan
from mtp_pretrain.parallel.base import Strategy
from mtp_pretrain.parallel.blocks import apply_block_options
from mtp_pretrain.parallel.grad_norm import clip_grads_
from mtp_pretrain.parallel.materialize import to_device
from mtp_pretrain.parallel.tp_plan import SEQUENCE_DIM

SEQ = Shard(SEQUENCE_DIM)


# --- executing the plan -----------------------------------------------------------------------
def _gather_first_input(module: nn.Module, mesh) -> None:
    """gather_input: first positional input sharded along the sequence -> replicated DTensor."""

    def hook(_mod, args):
        x = args[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (SEQ,), run_check=False)
        return (x.redistribute(mesh, (Replicate(),)),) + tuple(args[1:])

    module.register_forward_pre_hook(hook)


def _replicate(module: nn.Module, mesh) -> None:
    """replicate: weights replicated; runs on the sequence-sharded activations."""

    def partition(name, mod, device_mesh):
        for p_name, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(p_name, nn.Parameter(distribute_tensor(p.data, device_mesh, [Replicate()])))

    def input_fn(mod, inputs, device_mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, (SEQ,), run_check=False)
        return (x,) + tuple(inputs[1:])

    distribute_module(module, mesh, partition, input_fn)


def _vocab_shard(module: nn.Module, mesh) -> None:
    module.weight = nn.Parameter(distribute_tensor(module.weight.data, mesh, [Shard(0)]))


def vocab_parallel_unembed(self, h: torch.Tensor, targets=None, *, chunk_size: int = 0,
                           ignore_index: int = -100) -> torch.Tensor:
    """The TP forward of ``Unembedding`` (bound to the instance by ``apply_tp``).

    h: [B, T/tp, dim] local slice of the sequence (or a DTensor). Without targets: the full
    logits (inference only; they are gathered). With targets: the summed cross-entropy as a plain
    tensor, computed by ``F.cross_entropy`` on vocab-sharded logits under ``loss_parallel``."""
    mesh = self._tp_mesh
    if not isinstance(h, DTensor):
        h = DTensor.from_local(h, mesh, (SEQ,), run_check=False)
    h = h.redistribute(mesh, (Replicate(),))
    if targets is None:
        return F.linear(h, self.weight).full_tensor()
    h2 = h.reshape(-1, h.shape[-1])
    t1 = targets.reshape(-1)

    def ce(hc, tc):
        logits = F.linear(hc, self.weight).float()  # [n, V], sharded over V
        return F.cross_entropy(logits, tc, ignore_index=ignore_index, reduction="sum")

    return checkpointed_chunk_sum(ce, h2, t1, chunk_size).to_local()


def apply_tp(model: nn.Module, mesh) -> dict[str, str]:
    """Shard ``model`` in place over the 1-D TP ``mesh`` following ``tp_plan.TP_PLAN``; returns
    the {module: style} assignment."""
    from mtp_pretrain.parallel.pipeline import AbsentModule

    # (modules of other pipeline stages are absent here)
    assignment = tp_plan.assign(name for name, m in model.named_modules() if not isinstance(m, AbsentModule))
    modules = dict(model.named_modules())
    dtensor_plan = {}
    for name, style in assignment.items():
        if style == tp_plan.COLUMN:
            dtensor_plan[name] = ColwiseParallel()
        elif style == tp_plan.ROW:
            dtensor_plan[name] = RowwiseParallel(output_layouts=SEQ, use_local_output=False)
        elif style == tp_plan.VOCAB_EMBEDDING:
            dtensor_plan[name] = RowwiseParallel(input_layouts=Replicate(), output_layouts=SEQ,
                                                 use_local_output=False)
        elif style == tp_plan.SEQUENCE:
            dtensor_plan[name] = SequenceParallel(sequence_dim=SEQUENCE_DIM)
    parallelize_module(model, mesh, dtensor_plan)
    for name, style in assignment.items():
        mod = modules[name]
        if style == tp_plan.GATHER_INPUT:
            _gather_first_input(mod, mesh)
        elif style == tp_plan.REPLICATE:
            _replicate(mod, mesh)
        elif style == tp_plan.VOCAB_COLUMN:
            if model.cfg.tie_embeddings and not isinstance(model.tok_embeddings, AbsentModule):
                mod.weight = model.tok_embeddings.weight  # already vocab-sharded, same layout
            else:
                _vocab_shard(mod, mesh)
            mod._tp_mesh = mesh
            mod.forward = types.MethodType(vocab_parallel_unembed, mod)
    return assignment


# --- strategies -------------------------------------------------------------------------------
class TPStrategy(Strategy):
    """``tp``: all ranks form one TP group (dp = 1). ``fsdp_tp`` subclasses it with dp > 1."""

    name = "tp"
    full_logits = decodes = False  # the unembedding is vocab-sharded

    def __init__(self, cfg, env, param_dtype: torch.dtype | None = None):
        super().__init__(cfg, env)
        self.param_dtype = param_dtype

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        super().validate(model_cfg, seq_len)
        tp_plan.check_divisible(model_cfg, self.dims.tp, seq_len)

    def parallelize(self, model: nn.Module) -> nn.Module:
        to_device(self._keep_own_stages_tp(model), self.env.device)  # a meta model stays there until materialised
        apply_tp(model, self.dims.mesh["tp"])
        apply_block_options(model, self.cfg)
        return model

    def _keep_own_stages_tp(self, model: nn.Module) -> nn.Module:
        """Pipeline stages: hidden states cross stages as local tensors (each rank's part of the
        sequence), the residual stream's sequence-sharded DTensor again inside the stage."""
        tp_mesh = self.dims.mesh["tp"]
        return self.keep_own_stages(model, to_stage_input=lambda x: DTensor.from_local(x, tp_mesh, (SEQ,),
                                                                                      run_check=False),
                                    from_stage_output=lambda x: x.to_local())

    def loss_context(self):
        return loss_parallel()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return clip_grads_(model.parameters(), max_norm)


class FSDPTPStrategy(TPStrategy):
    """``fsdp_tp``: TP inside each group of ``tp_size`` neighbouring ranks, FSDP2 across groups."""

    name = "fsdp_tp"
    defer_shared_grad_sync = True

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        from mtp_pretrain.parallel.fsdp import refuse_tied_causal

        super().validate(model_cfg, seq_len)
        refuse_tied_causal(model_cfg, self.name)

    def parallelize(self, model: nn.Module) -> nn.Module:
        from mtp_pretrain.parallel.fsdp import shard_data_parallel

        to_device(self._keep_own_stages_tp(model), self.env.device)  # a meta model stays there until materialised
        apply_tp(model, self.dims.mesh["tp"])
        apply_block_options(model, self.cfg)
        shard_data_parallel(model, self)
        return model

    def grad_sync_hooks(self, model: nn.Module, last_micro_batch: bool) -> GradSyncHooks:
        from mtp_pretrain.parallel.fsdp import fsdp_grad_sync_hooks

        return fsdp_grad_sync_hooks(self, model, last_micro_batch)

    def release_gathered(self, model: nn.Module) -> None:
        from mtp_pretrain.parallel.fsdp import reshard_units

        reshard_units(model)
