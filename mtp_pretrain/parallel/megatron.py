"""``parallel.strategy=megatron``: tensor parallelism with megatron-core's layers, data parallelism
(plain, or DeepSpeed ZeRO-1/2) over megatron's data-parallel group.

The model stays the plain ``MTPTransformer``; ``parallelize`` converts it from outside, module by
module, following ``tp_plan.TP_PLAN`` (the same table the DTensor executor in ``tp.py`` reads):

    column           -> ``ColumnParallelLinear``  (q/k/v, gate/up: split by head / ffn column)
    row              -> ``RowParallelLinear``     (o_proj, down_proj: output all-reduced)
    vocab_embedding  -> ``VocabParallelEmbedding``(token embedding: split over the vocabulary)
    vocab_column     -> ``ColumnParallelLinear`` over the vocabulary whose logits go straight into
                        ``vocab_parallel_cross_entropy``: every head's loss is computed on
                        [tokens, V/tp] logits, no rank ever holds B x T x V. ``loss.chunk_size``
                        bounds them further (chunks recomputed in the backward, as in ``tp``).
    sequence, replicate, gather_input -> nothing: this executor runs megatron's TP *without*
                        sequence parallelism (megatron's sequence-parallel regions assume the
                        [s, b, h] layout, our blocks are [b, s, h], and megatron's torch norm
                        refuses sequence_parallel), so activations between blocks are replicated
                        over the TP ranks, norms and the heads' small projections run replicated.

The converted modules keep the plain modules' names and parameter names (a ColumnParallelLinear
subclass still has ``.weight``), so checkpoints are written with the plain FQNs: each parameter is
exposed to DCP as a DTensor on a (dp, tp) mesh -- ``Shard(0)`` for column / vocab modules,
``Shard(1)`` for row modules, ``Replicate()`` otherwise -- and DCP reshards between this layout and
any other strategy's (``none``, ``fsdp``, ``tp``, ...) on load. Optimizer state is exposed the same
way, in the format of ``get_optimizer_state_dict``.

On the meta device (``parallel.meta_init``, the default) ``convert_model`` builds the megatron
layers with shard-sized, uninitialised storage and copies nothing; ``materialize`` then fills
each rank's shards from ``model/init.py``'s per-parameter values (``MegatronShards``), so no rank
ever holds the plain model's full weights.

Process groups come from ``megatron.core.parallel_state.initialize_model_parallel`` on top of the
process group ``setup.init_distributed`` made from the launcher's environment; TP ranks are
neighbours (rank = dp_rank * tp + tp_rank).

Data parallelism (``parallel.zero_stage``):

0    gradients all-reduced over megatron's DP group in flat buckets after the last micro-batch
     (once per step, whatever the number of heads); a plain torch optimizer on the local shards.
1, 2 ``deepspeed.initialize(..., mpu=<megatron's parallel_state>)``: ZeRO partitions optimizer
     state (1) and gradients (2) over the DP group; DeepSpeed counts TP-sharded parameters once
     per TP rank and replicated ones once in the gradient norm. The head-sequential loss runs n
     backward passes into the shared unembedding: its ZeRO-2 reduction is held back
     (``ds_grad_is_ready``) until the last head of the last micro-batch, as fsdp holds back its
     reduce-scatter; earlier micro-batches hold back every reduction (no-sync accumulation).

Randomness: on CUDA ``model_parallel_cuda_manual_seed`` sets up megatron's RNG tracker (the
default generator shared by a TP group, a ``model-parallel-rng`` state distinct per TP rank) for
dropout inside TP regions. The model has no dropout; on CPU (no tracker exists) a model config
with ``dropout > 0`` is refused at start-up rather than silently sharing or mis-seeding masks.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from mtp_pretrain.loss import GradSyncHooks
from mtp_pretrain.ops import checkpointed_chunk_sum
from mtp_pretrain.optim import group_param_names
from mtp_pretrain.parallel import tp_plan, zero
from mtp_pretrain.parallel.base import Strategy
from mtp_pretrain.parallel.blocks import apply_block_options
from mtp_pretrain.parallel.ddp import all_reduce_mean_grads
from mtp_pretrain.parallel.grad_norm import scale_grads_to_norm_
from mtp_pretrain.parallel.materialize import Shards, to_device

# Styles this executor runs as plain replicated modules (no sequence parallelism, see above).
_REPLICATED_STYLES = (tp_plan.SEQUENCE, tp_plan.REPLICATE, tp_plan.GATHER_INPUT)


def require_megatron():
    """megatron.core's parallel_state and tensor_parallel, or a clear error."""
    try:
        from megatron.core import parallel_state, tensor_parallel  # noqa: F401
        from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install raising anything
        raise RuntimeError(f"parallel.strategy=megatron needs megatron-core, which cannot be imported here "
                           f"({type(e).__name__}: {e}); pip install megatron-core, or choose another "
                           f"parallel.strategy (tp, fsdp_tp, deepspeed, ...)") from e
    return parallel_state, tensor_parallel


# --- the converted modules ----------------------------------------------------------------------
@functools.cache
def _layer_classes():
    """Subclasses of megatron's layers that keep the plain modules' call signatures."""
    _, tensor_parallel = require_megatron()
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    class Column(tensor_parallel.ColumnParallelLinear):
        get_extra_state = nn.Module.get_extra_state  # plain state_dict keys: no "_extra_state"
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x):
            return super().forward(x)[0]

    class Row(tensor_parallel.RowParallelLinear):
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, x):
            return super().forward(x)[0]

    class VocabEmbedding(tensor_parallel.VocabParallelEmbedding):
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

    class VocabUnembedding(tensor_parallel.ColumnParallelLinear):
        """The shared unembedding, vocab-sharded; ``forward`` has ``Unembedding``'s signature."""

        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def forward(self, h, targets=None, *, chunk_size: int = 0, ignore_index: int = -100):
            logits = tensor_parallel.ColumnParallelLinear.forward
            if targets is None:  # inference: full logits, gathered over the vocabulary
                return gather_from_tensor_model_parallel_region(logits(self, h)[0])
            h2 = h.reshape(-1, h.shape[-1])
            t1 = targets.reshape(-1)

            def ce(hc, tc):
                valid = tc != ignore_index
                part = logits(self, hc)[0].float()  # [n, V/tp]: this rank's slice of the vocabulary
                per_token = tensor_parallel.vocab_parallel_cross_entropy(part, torch.where(valid, tc, 0))
                return (per_token * valid).sum()

            return checkpointed_chunk_sum(ce, h2, t1, chunk_size)

    return types.SimpleNamespace(Column=Column, Row=Row, VocabEmbedding=VocabEmbedding,
                                 VocabUnembedding=VocabUnembedding)


def _no_init(_weight):
    """Megatron's init_method: weights are copied from the plain model instead."""


def _mcore_config(tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=False,
                               use_cpu_initialization=True, perform_initialization=False,
                               params_dtype=torch.float32, gradient_accumulation_fusion=False)


# Partition dim of the weight of each style (None: replicated).
SHARD_DIM = {tp_plan.COLUMN: 0, tp_plan.ROW: 1, tp_plan.VOCAB_EMBEDDING: 0, tp_plan.VOCAB_COLUMN: 0}


def shard_of(full: torch.Tensor, dim: Optional[int], tp: int, rank: int) -> torch.Tensor:
    """This TP rank's slice of a full (plain-layout) tensor."""
    if dim is None:
        return full
    return full.chunk(tp, dim=dim)[rank]


def convert_model(model: nn.Module, tp: int, tp_rank: int) -> dict[str, Optional[int]]:
    """Replace the plain modules in place following ``tp_plan.TP_PLAN``; weights are copied
    shard by shard from the plain ones -- or, for a model on the meta device, left uninitialised
    (``MegatronShards`` and ``materialize`` fill them; the plain modules left, norms and small
    projections, stay on meta until then). Returns {parameter FQN: shard dim or None}."""
    _, tensor_parallel = require_megatron()
    cls = _layer_classes()
    config = _mcore_config(tp)
    assignment = tp_plan.assign(name for name, _ in model.named_modules())
    modules = dict(model.named_modules())
    tied = getattr(model.cfg, "tie_embeddings", False)
    for name, style in assignment.items():
        if style in _REPLICATED_STYLES:
            continue
        old = modules[name]
        if style == tp_plan.COLUMN:
            new = cls.Column(old.in_features, old.out_features, config=config, init_method=_no_init,
                             bias=False, gather_output=False, skip_bias_add=True)
        elif style == tp_plan.ROW:
            new = cls.Row(old.in_features, old.out_features, config=config, init_method=_no_init, bias=False,
                          input_is_parallel=True, skip_bias_add=True)
        elif style == tp_plan.VOCAB_EMBEDDING:
            new = cls.VocabEmbedding(old.num_embeddings, old.embedding_dim, init_method=_no_init, config=config)
        elif style == tp_plan.VOCAB_COLUMN:
            vocab, dim = old.weight.shape
            new = cls.VocabUnembedding(dim, vocab, config=config, init_method=_no_init, bias=False,
                                       gather_output=False, skip_bias_add=True)
        else:
            raise ValueError(f"tp_plan style {style!r} of module {name} has no megatron executor")
        # What megatron's own initialisation would have set (perform_initialization=False skips it):
        # DeepSpeed's gradient norm counts parameters with tensor_model_parallel once per TP rank.
        if not hasattr(new.weight, "tensor_model_parallel"):
            tensor_parallel.set_tensor_model_parallel_attributes(new.weight, True, SHARD_DIM[style], 1)
        with torch.no_grad():
            if tied and style == tp_plan.VOCAB_COLUMN:
                new.weight = model.tok_embeddings.weight  # same vocab range per rank: one parameter
            elif not old.weight.is_meta:
                new.weight.copy_(shard_of(old.weight.detach().cpu(), SHARD_DIM[style], tp, tp_rank))
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
    layout = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        module_name = fqn.rpartition(".")[0]
        style = assignment.get(module_name)
        layout[fqn] = SHARD_DIM.get(style) if style is not None else None
    return layout


class MegatronShards(Shards):
    """Where a TP rank keeps its part of each parameter: the megatron layer's weight is this rank's
    ``shard_of`` the full value (``layout``: {FQN: shard dim or None}), a plain parameter whole."""

    def __init__(self, layout: dict[str, Optional[int]], tp: int, tp_rank: int):
        self.layout, self.tp, self.tp_rank = layout, tp, tp_rank

    def global_shape(self, name: str, param: torch.Tensor) -> torch.Size:
        dim = self.layout[name]
        shape = list(param.shape)
        if dim is not None:
            shape[dim] *= self.tp
        return torch.Size(shape)

    def local_part(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        return shard_of(full, self.layout[name], self.tp, self.tp_rank)


class MegatronMPU:
    """What DeepSpeed reads from an ``mpu``: megatron's TP group as the model-parallel group (no
    pipeline stages here) and its DP group."""

    def __init__(self, ps):
        self.ps = ps

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.ps.get_data_parallel_group())

    def get_pipeline_model_parallel_world_size(self):
        return 1


# --- ZeRO-2: hold back reductions while a gradient is still accumulating -----------------------
class ZeroGradSync(GradSyncHooks):
    """Earlier micro-batches: no parameter is ready (gradients accumulate locally). Last
    micro-batch: the shared unembedding (and the embedding when it is used more than once) only
    becomes ready for its last backward pass."""

    def __init__(self, model: nn.Module, last_micro_batch: bool):
        self.model, self.last = model, last_micro_batch
        for p in model.parameters():
            p.ds_grad_is_ready = last_micro_batch

    def before_head_backward(self, head: int, last: bool) -> None:
        ready = self.last and last
        self.model.unembed.weight.ds_grad_is_ready = ready
        if self.model.cfg.tie_embeddings or self.model.heads_chain:
            self.model.tok_embeddings.weight.ds_grad_is_ready = False

    def before_trunk_backward(self) -> None:
        self.model.tok_embeddings.weight.ds_grad_is_ready = self.last


# --- the strategy -------------------------------------------------------------------------------
class MegatronStrategy(Strategy):
    name = "megatron"
    full_logits = decodes = False  # the unembedding is vocab-sharded

    def __init__(self, cfg, env, param_dtype: torch.dtype | None = None):
        super().__init__(cfg, env)
        require_megatron()
        if cfg.zero_stage not in (0, 1, 2):
            raise ValueError(f"parallel.zero_stage={cfg.zero_stage} is not supported by parallel.strategy=megatron: "
                             f"0 = plain data parallelism, 1 or 2 = DeepSpeed ZeRO over megatron's data-parallel "
                             f"group (ZeRO-3 would partition the TP shards again: use fsdp_tp)")
        self.param_dtype = param_dtype
        self.engine = None
        self.layout: dict[str, Optional[int]] = {}

    @property
    def zero_optimizer(self) -> bool:
        return self.cfg.zero_stage > 0

    # --- layout ---------------------------------------------------------------------------------
    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def tp_rank(self) -> int:
        return self.dims.tp_rank

    @property
    def ps(self):
        """megatron-core's parallel_state, initialised by the layout."""
        return self.dims.megatron_state

    @property
    def mesh(self):
        """The (dp, tp) DeviceMesh in megatron's rank order, for the checkpoint's DTensors."""
        return self.dims.mesh["dp", "tp"]

    def validate(self, model_cfg, seq_len: int | None = None) -> None:
        super().validate(model_cfg, seq_len)
        tp_plan.check_divisible(model_cfg, self.tp)  # no sequence parallelism: seq_len is free
        dropout = getattr(model_cfg, "dropout", 0.0) or 0.0
        if dropout > 0 and self.env.device.type != "cuda":
            raise ValueError(f"model.dropout={dropout} under parallel.strategy=megatron needs CUDA (megatron's RNG "
                             f"tracker seeds dropout inside tensor-parallel regions); on CPU set model.dropout=0")
        self.ps  # noqa: B018 - the groups now, at start-up

    # --- model and optimizer --------------------------------------------------------------------
    def parallelize(self, model: nn.Module) -> nn.Module:
        if self.env.device.type == "cuda":
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(torch.initial_seed())
        self.layout = convert_model(model, self.tp, self.tp_rank)
        to_device(model, self.env.device)  # on meta: materialize moves it
        apply_block_options(model, self.cfg)
        self.mesh  # noqa: B018 - collective set-up now, not in the middle of a save
        return model

    def shards(self, model: nn.Module) -> "MegatronShards":
        return MegatronShards(self.layout, self.tp, self.tp_rank)

    def build_optimizer(self, model: nn.Module, make_optimizer):
        optimizer = make_optimizer(model)
        self.group_fqns = group_param_names(model, optimizer)  # before ZeRO flattens the groups
        if self.cfg.zero_stage == 0:
            return optimizer
        self.engine, self.ds_optimizer = zero.zero_initialize(model, optimizer, zero.zero_config(self.cfg.zero_stage),
                                                              self.env.local_rank, mpu=MegatronMPU(self.ps))
        zero.ensure_adam_state(self.engine, optimizer)
        return optimizer  # the torch optimizer: the LR scheduler drives its param_groups

    # --- one step -------------------------------------------------------------------------------
    def grad_sync_hooks(self, model: nn.Module, last_micro_batch: bool) -> GradSyncHooks:
        if self.cfg.zero_stage == 2:
            return ZeroGradSync(model, last_micro_batch)
        return GradSyncHooks()

    def finish_backward(self, model: nn.Module) -> None:
        if self.engine is not None:
            self.engine.allreduce_gradients()
            return
        if self.dp_size == 1:
            return
        all_reduce_mean_grads(model, self.dp_size, self.ps.get_data_parallel_group())

    def step(self, model: nn.Module, optimizer, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
        if self.engine is not None:  # ZeRO: DeepSpeed clips, steps and skips
            grad_norm, stepped = zero.zero_engine_step(self.engine, model, max_norm, loss_is_finite)
            for p in model.parameters():
                p.grad = None
            return grad_norm, stepped
        return super().step(model, optimizer, max_norm, loss_is_finite)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        sharded = torch.zeros((), dtype=torch.float64, device=self.env.device)
        replicated = torch.zeros((), dtype=torch.float64, device=self.env.device)
        params = []
        for fqn, p in model.named_parameters():
            if p.grad is None:
                continue
            params.append(p)
            sq = p.grad.detach().double().pow(2).sum()
            if self.layout.get(fqn) is None:
                replicated += sq
            else:
                sharded += sq
        if self.tp > 1:
            dist.all_reduce(sharded, group=self.ps.get_tensor_model_parallel_group())
        norm = (sharded + replicated).sqrt().float()
        scale_grads_to_norm_(params, norm, max_norm)
        return norm.cpu()

    # --- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state(self, model: nn.Module, optimizer) -> dict:
        return {"model": MegatronModelState(self, model), "optim": MegatronOptimState(self, model, optimizer)}

    def as_dtensor(self, local: torch.Tensor, dim: Optional[int]):
        """A local TP shard (replicated over DP) as a DTensor with the plain tensor's shape."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        shape = list(local.shape)
        if dim is not None:
            shape[dim] *= self.tp
        placements = (Replicate(), Replicate() if dim is None else Shard(dim))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, placements, run_check=False, shape=torch.Size(shape),
                                  stride=stride)


class MegatronModelState(Stateful):
    """Parameters under their plain FQNs, as DTensors over the (dp, tp) mesh."""

    def __init__(self, strategy: MegatronStrategy, model: nn.Module):
        self.s, self.model = strategy, model

    def state_dict(self):
        return {fqn: self.s.as_dtensor(p.detach(), self.s.layout[fqn])
                for fqn, p in self.model.named_parameters(remove_duplicate=False)}

    def load_state_dict(self, sd):
        # DCP loaded in place into the DTensors' local tensors, which are the parameters' storage;
        # copy anyway in case a planner handed back new tensors.
        with torch.no_grad():
            for fqn, p in self.model.named_parameters(remove_duplicate=False):
                v = sd[fqn]
                v = v.to_local() if hasattr(v, "to_local") else shard_of(v, self.s.layout[fqn], self.s.tp,
                                                                         self.s.tp_rank)
                if v.data_ptr() != p.data_ptr():
                    p.copy_(v)
        if self.s.engine is not None:  # ZeRO keeps its own fp32 partitions of the weights
            self.s.ds_optimizer.refresh_fp32_params()


class MegatronOptimState(Stateful):
    """Optimizer state in ``get_optimizer_state_dict``'s format: {"state": {fqn: {step, exp_avg,
    exp_avg_sq}}, "param_groups": [{..., "params": [fqn, ...]}]}, moments as DTensors. Under ZeRO
    the moments are gathered from DeepSpeed's partitions over the DP group (and scattered back)."""

    def __init__(self, strategy: MegatronStrategy, model: nn.Module, optimizer):
        self.s, self.model, self.optimizer = strategy, model, optimizer

    def _local_state(self, p) -> dict:
        if self.s.engine is not None:
            return {"step": zero.adam_step_count(self.optimizer), **zero.get_adam_moments(p)}
        st = self.optimizer.state.get(p)
        if not st:  # before the first step: zeros, so a load has tensors to fill
            st = self.optimizer.state[p]
            st["step"] = torch.zeros((), dtype=torch.float32)
            for k in zero.ADAM_KEYS:
                st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _local(self, fqn: str, v) -> torch.Tensor:
        """This rank's TP shard of a loaded tensor (a DTensor, or a full tensor from a plain checkpoint)."""
        return v.to_local() if hasattr(v, "to_local") else shard_of(v, self.s.layout[fqn], self.s.tp, self.s.tp_rank)

    def state_dict(self):
        state = {}
        for fqn, p in self.model.named_parameters():
            st = self._local_state(p)
            state[fqn] = {"step": torch.as_tensor(st["step"], dtype=torch.float32).detach().clone().cpu()}
            for k in zero.ADAM_KEYS:
                state[fqn][k] = self.s.as_dtensor(st[k].detach().to(p.dtype), self.s.layout[fqn])
        return {"state": state, "param_groups": zero.named_param_groups(self.optimizer, self.s.group_fqns)}

    def load_state_dict(self, sd):
        zero.load_named_param_groups(self.optimizer, self.s.group_fqns, sd["param_groups"])
        step = None
        for fqn, p in self.model.named_parameters():
            saved = sd["state"][fqn]
            step = saved["step"]
            moments = {k: self._local(fqn, saved[k]) for k in zero.ADAM_KEYS}
            if self.s.engine is not None:
                zero.set_adam_moments(p, moments)
                continue
            st = self.optimizer.state[p]
            st["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
            for k, v in moments.items():
                if k not in st or st[k].data_ptr() != v.data_ptr():
                    st[k] = v.detach().clone().to(p.device)
        if self.s.engine is not None and step is not None:
            zero.set_adam_step_count(self.optimizer, step)


__all__ = ["MegatronStrategy", "MegatronMPU", "convert_model", "require_megatron", "shard_of"]
