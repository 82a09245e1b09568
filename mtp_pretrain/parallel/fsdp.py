"""FSDP2 (``fully_shard``): every parameter sharded over the data-parallel ranks.

Units: each trunk block, each head, the token embedding and the shared unembedding, then the
root. The embedding, heads and unembedding must be units of their own because the
head-sequential loss calls them outside the root module's forward (as a plain module they would
meet sharded DTensor parameters: "mixed torch.Tensor and DTensor"). Tied embeddings form one
unit with the unembedding.

The shared unembedding is used by every head, so its gradient arrives in n backward passes;
``FSDPGradSync`` disables its gradient reduction until the last head of the last micro-batch,
so it is reduce-scattered once per step instead of once per head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from mtp_pretrain.loss import GradSyncHooks
from mtp_pretrain.parallel.base import Strategy
from mtp_pretrain.parallel.blocks import apply_block_options
from mtp_pretrain.parallel.materialize import to_device, when_materialized


class FSDPGradSync(GradSyncHooks):
    def __init__(self, model: nn.Module, last_micro_batch: bool, defer: bool = True):
        self.model, self.last_micro_batch, self.defer = model, last_micro_batch, defer

    def before_head_backward(self, head: int, last: bool) -> None:
        if not self.defer:  # measurement only (bench/scaling.py): reduce after every head
            self.model.unembed.set_requires_gradient_sync(self.last_micro_batch, recurse=False)
            return
        self.model.unembed.set_requires_gradient_sync(self.last_micro_batch and last, recurse=False)
        if self.model.cfg.tie_embeddings or self.model.heads_chain:
            # The embedding's gradient also arrives in several passes (tied weight / causal heads).
            self.model.tok_embeddings.set_requires_gradient_sync(False, recurse=False)

    def before_trunk_backward(self) -> None:
        self.model.tok_embeddings.set_requires_gradient_sync(self.last_micro_batch, recurse=False)


def shard_units(model: nn.Module, mesh, param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """fully_shard the units described above over ``mesh`` (1-D data-parallel mesh; for
    fsdp_tp the parameters are already TP DTensors and FSDP shards them further)."""
    kw = dict(mesh=mesh,
              mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in model.trunk:
        # Explicit, not FSDP's default: every unit is its own root (see _make_root_of), and a
        # root left to the default keeps its gathered parameters from forward to backward, so
        # the whole trunk stayed unsharded through the step (found by mtp-plan).
        fully_shard(block, reshard_after_forward=True, **kw)
    for head in model.heads:
        fully_shard(head, **kw)
    # Used once per head: keep unsharded between heads rather than all-gather n times.
    if model.cfg.tie_embeddings:
        fully_shard([model.tok_embeddings, model.unembed], reshard_after_forward=False, **kw)
    else:
        fully_shard(model.tok_embeddings, **kw)
        fully_shard(model.unembed, reshard_after_forward=False, **kw)
    fully_shard(model, **kw)
    if model.cfg.tie_embeddings:
        _make_root_of(model, [model.tok_embeddings, model.unembed], kw)
    return model


def refuse_tied_causal(model_cfg, strategy: str) -> None:
    """Tied embeddings with causal heads: the embedding unit then runs forwards between its own
    backward passes (each causal head embeds tokens), and under FSDP2 the head-sequential loss
    loses part of that weight's gradient (the parity tests measured a 4-10 % lower gradient norm
    than one process). Refused until that is fixed; naive loss, untied embeddings or ddp/tp/ZeRO-1/2 work."""
    if model_cfg.tie_embeddings and model_cfg.head_type == "causal":
        raise ValueError(f"model.tie_embeddings=true with model.head_type=causal is not supported under "
                         f"parallel.strategy={strategy} (FSDP2 loses part of the tied weight's gradient); untie "
                         f"the embeddings or use parallel.strategy=ddp, tp or deepspeed with zero_stage 1/2")


class _UnitRoot(nn.Module):
    """An FSDP root above one unit that holds several modules, run once so that it becomes their root."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self) -> None:
        return None


def _make_root_of(model: nn.Module, members: list[nn.Module], kw: dict) -> None:
    """FSDP makes the first unit to run a forward the root of every unit below it, and a unit of
    several modules cannot be a root ("FSDP requires a single root module"). The loss calls the
    units directly, never the model's forward, so each unit is its own root (its own end-of-backward
    callback: one head's backward must not finalise the trunk's units). The tied embedding unit
    (embedding + unembedding) gets a parameterless module above it as its root instead, run once
    here, after every unit exists. It is kept outside the module tree (plain attribute), so parameter names do not change."""
    root = _UnitRoot(members)
    fully_shard(root, **kw)
    model.__dict__["_fsdp_unit_root"] = root
    when_materialized(model, root)  # FSDP's lazy init (the first forward) refuses meta parameters


class FSDPStrategy(Strategy):
    name = "fsdp"
    defer_shared_grad_sync = True  # False only to measure what deferring saves

    def __init__(self, cfg, env, param_dtype: torch.dtype | None = None):
        super().__init__(cfg, env)
        self.param_dtype = param_dtype
        self._gathered = None  # the main rank's full copy for validation decoding

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        super().validate(model_cfg, seq_len)
        refuse_tied_causal(model_cfg, self.name)

    def parallelize(self, model: nn.Module) -> nn.Module:
        to_device(model, self.env.device)  # a meta-device model stays there until materialised
        apply_block_options(model, self.cfg)
        shard_units(model, self.dims.mesh["dp"], self.param_dtype, self.cfg.cpu_offload)
        return model

    def full_model(self, model: nn.Module, model_cfg) -> nn.Module | None:
        """A full copy gathered on the main rank (kept between calls; its weights refreshed)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from mtp_pretrain.model import MTPTransformer

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            return None
        if self._gathered is None:
            self._gathered = MTPTransformer(model_cfg).to(self.env.device)
        self._gathered.load_state_dict(full)
        return self._gathered

    def grad_sync_hooks(self, model: nn.Module, last_micro_batch: bool) -> GradSyncHooks:
        model.set_requires_gradient_sync(last_micro_batch)
        return FSDPGradSync(model, last_micro_batch, self.defer_shared_grad_sync)
