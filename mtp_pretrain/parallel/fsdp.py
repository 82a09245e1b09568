"""FSDP2 (``fully_shard``): every parameter sharded over the data-parallel ranks.

Units: each trunk block, each head, the token embedding and the shared unembedding, then the
root. The embedding, heads and unembedding must be units of their own because the
head-sequential loss calls them outside the root module's forward (as a plain module they would
meet sharded DTensor parameters: "mixed torch.Tensor and DTensor"). Tied embeddings form one
unit with the unembedding.

The shared unembedding is used by every head, so its gradient arrives in n backward passes;
``FSDPGradSync`` disables its gradient reduction until the last head of the last micro-batch,
so it is reduce-scattered once per step instead of once per head.

When each unit holds its full parameters. FSDP2 keeps a *root* unit's parameters gathered after
its forward (for a model called through one root, its backward follows at once), and the loss
calls the embedding, each head and the unembedding directly, so each of them is a root (the
trunk's blocks are not: ``_make_root_of``). What each unit does, so that outside its own
forward/backward window it holds only its shard:

* trunk blocks and the (untied) embedding: resharded after their forward, gathered again for
  their backward (the embedding's forward comes before the trunk, its backward after every head:
  gathered in between, it would sit through the whole heads' phase);
* a head: kept gathered from its forward to its backward, which follows at once in the
  head-sequential loss; after a forward without gradients (validation) no backward comes, so
  ``_reshard_after_forward_only`` reshards it then;
* the unembedding (and the tied embedding + unembedding unit): kept gathered after each forward,
  used again by the next head or sequence; resharded by its backward in training, and after a
  validation pass by ``reshard_units`` (``release_gathered``), since no backward comes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from mtp_pretrain.loss import GradSyncHooks
from mtp_pretrain.parallel.base import Strategy
from mtp_pretrain.parallel.blocks import apply_block_options
from mtp_pretrain.parallel.materialize import to_device, when_materialized


class FSDPGradSync(GradSyncHooks):
    def __init__(self, model: nn.Module, last_micro_batch: bool, defer: bool = True,
                 pipeline_last_stage: bool = False):
        self.model, self.last_micro_batch, self.defer = model, last_micro_batch, defer
        self.pipeline_last_stage = pipeline_last_stage

    def before_head_backward(self, head: int, last: bool) -> None:
        if not self.defer:  # measurement only (bench/scaling.py): reduce after every head
            self.model.unembed.set_requires_gradient_sync(self.last_micro_batch, recurse=False)
            return
        self.model.unembed.set_requires_gradient_sync(self.last_micro_batch and last, recurse=False)
        if self.pipeline_last_stage:
            # No trunk backward follows on this stage: an embedding replica read by causal heads
            # reduces in the last backward that reaches it -- the naive loss's one backward (after
            # its last head), or head 2's own in the head-sequential loss (before_chained_head_backward).
            if isinstance(self.model.tok_embeddings, FSDPModule):
                self.model.tok_embeddings.set_requires_gradient_sync(self.last_micro_batch and last, recurse=False)
            return
        if self.model.cfg.tie_embeddings or self.model.heads_chain:
            # The embedding's gradient also arrives in several passes (tied weight / causal heads).
            self.model.tok_embeddings.set_requires_gradient_sync(False, recurse=False)

    def before_chained_head_backward(self, head: int) -> None:
        if self.defer and self.pipeline_last_stage and isinstance(self.model.tok_embeddings, FSDPModule):
            self.model.tok_embeddings.set_requires_gradient_sync(self.last_micro_batch and head == 2, recurse=False)

    def before_trunk_backward(self) -> None:
        if not self.pipeline_last_stage:
            self.model.tok_embeddings.set_requires_gradient_sync(self.last_micro_batch, recurse=False)


def shard_units(model: nn.Module, mesh, param_dtype: torch.dtype | None = None, cpu_offload: bool = False) -> nn.Module:
    """fully_shard the units described above over ``mesh`` (1-D data-parallel mesh; for
    fsdp_tp the parameters are already TP DTensors and FSDP shards them further)."""
    kw = dict(mesh=mesh,
              mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in model.trunk:
        fully_shard(block, reshard_after_forward=True, **kw)
    for head in model.heads:
        fully_shard(head, **kw)
        _reshard_after_forward_only(head)
    # Used by every head (and, in validation, by every sequence): not resharded between a forward
    # and the backward that follows it.
    if model.cfg.tie_embeddings:
        fully_shard([model.tok_embeddings, model.unembed], reshard_after_forward=False, **kw)
    else:
        fully_shard(model.tok_embeddings, reshard_after_forward=True, **kw)
        fully_shard(model.unembed, reshard_after_forward=False, **kw)
    fully_shard(model, **kw)
    # The trunk's blocks under one root: as roots of their own (the loss calls them directly, never
    # the model's forward) each kept its reduce-scatter buffer, a float32 copy of its gradient,
    # until the end of the trunk's backward (found by mtp-plan: 23 GiB per rank for 7b); under one
    # root each block's reduction waits for the previous one and frees its buffer.
    _make_root_of(model, list(model.trunk), kw)
    if model.cfg.tie_embeddings:
        _make_root_of(model, [model.tok_embeddings, model.unembed], kw)
    return model


def shard_stage_units(model: nn.Module, stage_modules: list[nn.Module], mesh, param_dtype: torch.dtype | None = None,
                      cpu_offload: bool = False) -> nn.Module:
    """``shard_units`` for a rank's pipeline stages (modules of other stages are absent): the same
    units, and each stage module as the root of its blocks (and the first stage's embedding), so
    that the schedule defers their reduction to the end of the step (``PipelineStage`` does this
    for an FSDP root). Heads, unembedding and the last stage's embedding replica are called by
    the loss outside any stage's forward: roots of their own, handled by ``FSDPGradSync``."""
    from mtp_pretrain.parallel.pipeline import AbsentModule

    kw = dict(mesh=mesh,
              mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for module in model.trunk:
        if not isinstance(module, AbsentModule):
            fully_shard(module, **kw)
    for head in model.heads:
        if not isinstance(head, AbsentModule):
            fully_shard(head, **kw)
            _reshard_after_forward_only(head)
    emb, unembed = model.tok_embeddings, model.unembed
    has_emb, has_unembed = not isinstance(emb, AbsentModule), not isinstance(unembed, AbsentModule)
    if model.cfg.tie_embeddings and has_emb and has_unembed:
        fully_shard([emb, unembed], reshard_after_forward=False, **kw)
        _make_root_of(model, [emb, unembed], kw)
    else:
        if has_emb:  # (the last stage's replica is a root of its own: explicitly resharded)
            fully_shard(emb, reshard_after_forward=True, **kw)
        if has_unembed:
            fully_shard(unembed, reshard_after_forward=False, **kw)
    for stage in stage_modules:
        fully_shard(stage, **kw)
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


def _reshard_after_forward_only(unit: nn.Module) -> None:
    """A head is a root unit (the loss calls it directly), kept gathered after its forward for the
    backward that follows; a forward whose output needs no gradient (validation under no_grad, a
    frozen head) has no backward: reshard right after it."""

    def reshard_without_backward(module: nn.Module, args, output) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in outputs):
            module.reshard()

    unit.register_forward_hook(reshard_without_backward)  # after FSDP's own post-forward hook


def reshard_units(model: nn.Module) -> None:
    """Every FSDP unit of ``model`` back to its shard: what a forward-only pass (validation) left
    gathered for reuse -- the unembedding, used by every head and sequence -- where no backward
    reshards it. FSDP's ``reset_iter_state`` on each root, not ``reshard()`` on each unit: a unit of
    several modules (the tied embedding + unembedding) whose modules ran a different number of
    times counts as still inside its forward, and ``reshard()`` keeps such a unit gathered. Only
    between steps: the reset would drop gradient reductions still in flight."""
    units = [*model.modules(), *model.__dict__.get("_fsdp_unit_roots", [])]
    for unit in units:
        if isinstance(unit, FSDPModule) and fully_shard.state(unit)._is_root:  # (None: never run)
            unit.reset_iter_state()


class _UnitRoot(nn.Module):
    """An FSDP root above one unit that holds several modules, run once so that it becomes their root."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self) -> None:
        return None


def _make_root_of(model: nn.Module, members: list[nn.Module], kw: dict) -> None:
    """FSDP makes the first unit to run a forward the root of every unit below it. The loss calls
    the units directly, never the model's forward, so each unit would be its own root (its own
    end-of-backward callback: one head's backward must not finalise the trunk's units). Units that
    belong together -- the trunk's blocks; the tied embedding unit (embedding + unembedding), which
    as a unit of several modules cannot be a root at all ("FSDP requires a single root module") --
    get a parameterless module above them as their root instead, run once after every unit
    exists. It is kept outside the module tree (plain attribute), so parameter names do not change."""
    root = _UnitRoot(members)
    fully_shard(root, **kw)
    model.__dict__.setdefault("_fsdp_unit_roots", []).append(root)
    when_materialized(model, root)  # FSDP's lazy init (the first forward) refuses meta parameters


def shard_data_parallel(model: nn.Module, strategy: Strategy) -> None:
    """FSDP over the layout's data-parallel mesh (fsdp, and fsdp_tp's second dimension): the
    units above, or each pipeline stage's units under pipeline parallelism."""
    mesh = strategy.dims.mesh["dp"]
    if strategy.pipeline is not None:
        shard_stage_units(model, strategy.pipeline.stage_modules, mesh, strategy.param_dtype, strategy.cfg.cpu_offload)
    else:
        shard_units(model, mesh, strategy.param_dtype, strategy.cfg.cpu_offload)


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
        if self.pipeline is not None and self.cfg.pp_schedule == "zbv" and model_cfg.tie_embeddings:
            raise ValueError("parallel.pp_schedule=zbv with model.tie_embeddings=true is not supported under "
                             "parallel.strategy=fsdp (rank 0's two stages would shard the one matrix twice); use "
                             "1f1b, gpipe or interleaved_1f1b")

    def parallelize(self, model: nn.Module) -> nn.Module:
        to_device(self.keep_own_stages(model), self.env.device)  # a meta-device model stays there until materialised
        apply_block_options(model, self.cfg)
        shard_data_parallel(model, self)
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
        return fsdp_grad_sync_hooks(self, model, last_micro_batch)

    def release_gathered(self, model: nn.Module) -> None:
        reshard_units(model)


def fsdp_grad_sync_hooks(strategy: Strategy, model: nn.Module, last_micro_batch: bool) -> GradSyncHooks:
    """fsdp and fsdp_tp: hold back gradient reduction to the last micro-batch (the shared
    unembedding: to its last head). Under pipeline parallelism the loss runs on the last stage
    only, and the schedule defers the stages' own reductions: the heads are this hook's."""
    if strategy.pipeline is None:
        model.set_requires_gradient_sync(last_micro_batch)
        return FSDPGradSync(model, last_micro_batch, strategy.defer_shared_grad_sync)
    for head in model.heads:
        head.set_requires_gradient_sync(last_micro_batch)
    return FSDPGradSync(model, last_micro_batch, strategy.defer_shared_grad_sync, pipeline_last_stage=True)
