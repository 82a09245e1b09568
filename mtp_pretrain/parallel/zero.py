"""DeepSpeed ZeRO glue shared by the two strategies built on it: ``deepspeed`` (ZeRO-1/2/3 over all
ranks) and ``megatron`` at ``zero_stage`` 1/2 (ZeRO over megatron's data-parallel group).

What lives here: the engine's config, creating the engine, the optimizer step (``Strategy.step``
for a ZeRO engine), AdamW state that exists before the first step (so a checkpoint can be loaded
into it), and reading/writing one parameter's AdamW moments and the optimizer's param groups in
``get_optimizer_state_dict``'s layout (groups matched by their parameter names).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from mtp_pretrain.parallel.materialize import Shards

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
# DeepSpeed 0.19 still calls the collectives torch 2.13 renamed: one warning per call otherwise.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)"
                        r"` is deprecated")


def zero_config(stage: int, bf16: bool = False) -> dict:
    """The DeepSpeed config: the Trainer owns batching, accumulation and the learning rate."""
    return {
        "train_micro_batch_size_per_gpu": 1,  # bookkeeping only: the Trainer owns batching
        "gradient_accumulation_steps": 1,  # the Trainer accumulates; one engine step per optimizer step
        "gradient_clipping": 0.0,  # set per step from optim.grad_clip (zero_engine_step)
        "zero_optimization": {
            "stage": stage,
            "overlap_comm": False,
            "contiguous_gradients": False,
            "reduce_scatter": True,
            "reduce_bucket_size": 50_000_000,
            "allgather_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 0,  # partition every parameter under ZeRO-3
        },
        # check_grad_overflow: skip a bf16 step with a non-finite gradient norm, as fp32 does.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def zero_initialize(model: nn.Module, optimizer, config: dict, local_rank: int, mpu=None):
    """Wrap ``model`` and ``optimizer`` in a ZeRO engine; returns (engine, ZeRO optimizer). The
    torch optimizer stays the one the LR scheduler drives (ZeRO steps it on its flat partitions)."""
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", str(local_rank))  # srun / one process: DeepSpeed asks
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, mpu=mpu,
                                                        dist_init_required=False)
    return engine, zero_optimizer


def zero_engine_step(engine, model: nn.Module, max_norm: float, loss_is_finite: bool) -> tuple[float, bool]:
    """``Strategy.step`` for a ZeRO engine, which owns clipping, the update and the reduced
    gradients. It skips a step itself when the gradient norm is non-finite (its overflow check,
    on for fp32 and, by ``zero_config``, bf16), discarding the reduced gradients; a non-finite loss
    is sent down that same path by marking one gradient NaN (DeepSpeed's public
    ``safe_set_full_grad``). Returns (DeepSpeed's pre-clip global norm, whether it stepped)."""
    from deepspeed.utils import safe_set_full_grad

    engine.optimizer.clip_grad = max_norm if max_norm > 0 else 0.0
    if not loss_is_finite:
        first = next(p for p in model.parameters() if p.requires_grad)
        safe_set_full_grad(first, torch.full(full_shape(first), float("nan"), device=first.device))
    skipped = engine.skipped_steps
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan"), engine.skipped_steps == skipped


def full_shape(p) -> torch.Size:
    """A parameter's shape as the model sees it (ZeRO-3 empties ``p`` between uses)."""
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


# --- ZeRO-3: partitions initialised from the meta device -----------------------------------------
class ZeroPartitions(Shards):
    """Where a rank keeps its part of a ZeRO-3 parameter: ``p.ds_tensor``, a flat slice of the
    flattened full value -- rank r holds elements [r * size, (r + 1) * size), the last rank's
    slice padded (with zeros here) to ``size`` = ceil(numel / ranks)."""

    def global_shape(self, name: str, param: torch.Tensor) -> torch.Size:
        return param.ds_shape

    def storage(self, name: str, param: torch.Tensor) -> torch.Tensor:
        return param.ds_tensor

    def local_part(self, name: str, param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        size = param.ds_tensor.ds_numel
        start = size * dist.get_rank(group=param.ds_process_group)
        part = full.reshape(-1)[start:start + size]
        return torch.cat([part, part.new_zeros(size - part.numel())]) if part.numel() < size else part


@torch.no_grad()
def partition_initial_values(model: nn.Module, device: torch.device, dtype: torch.dtype, seed: int, config: dict,
                             log=None) -> None:
    """Turn a meta-device ``MTPTransformer`` into ZeRO-3 partitioned parameters holding its initial
    values, one parameter at a time and without communication: each rank computes the parameter's
    full value (``model/init.py``), keeps its own flat slice as the partition, frees the rest. Peak
    host/device memory: the partitions plus the largest single parameter.

    This does what ``deepspeed.zero.Init`` does to each module's parameters as the module is built,
    minus its broadcast of every full parameter from rank 0 (which only makes uninitialised values
    agree; the values written here are already equal on every rank). ``deepspeed.initialize`` then
    finds ZeRO parameters and leaves them as they are."""
    import deepspeed

    from mtp_pretrain.model.init import initial_value
    from mtp_pretrain.parallel.materialize import (Progress, allocate_buffers, initialisation_names, parameter_places,
                                                   run_deferred)

    # Not entered as a context: used for its process group, dtype and the conversion of one parameter.
    partitioner = deepspeed.zero.Init(config_dict_or_path=config, dtype=dtype)
    if not hasattr(partitioner, "_convert_to_deepspeed_param"):
        raise RuntimeError(f"parallel.meta_init with ZeRO-3 needs deepspeed.zero.Init._convert_to_deepspeed_param "
                           f"(DeepSpeed 0.19); this is {deepspeed.__version__}: set parallel.meta_init=false")
    allocate_buffers(model, device)
    places = parameter_places(model)
    params = list(model.named_parameters())  # a shared parameter once, under its first name
    init_name = initialisation_names(model.cfg)
    progress = Progress("initialising ZeRO-3 partitions", sum(p.numel() for _, p in params), log)
    for name, p in params:
        full = initial_value(model.cfg, init_name[name], p.shape, seed)
        new = nn.Parameter(full.to(device=device, dtype=dtype), requires_grad=p.requires_grad)
        del full
        for module, attr in places[id(p)]:
            module._parameters[attr] = new
        partitioner._convert_to_deepspeed_param(new)
        new.partition()  # this rank's slice into new.ds_tensor; the full value freed
        progress.add(new.ds_numel)
    run_deferred(model)


# --- optimizer state ----------------------------------------------------------------------------
def ensure_adam_state(engine, optimizer) -> None:
    """Give every flat, partitioned parameter of the wrapped AdamW its state -- zeros, step 0, what
    its first step would create -- and link it to the parameters' fragments, so that a checkpoint
    can be saved or loaded before the first step."""
    created = False
    # ZeRO-3 empties the groups between steps; its flat fp32 partitions are the AdamW params
    flat = list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
    for p in flat or [p for group in optimizer.param_groups for p in group["params"]]:
        if not optimizer.state.get(p):
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                  **{k: torch.zeros_like(p, memory_format=torch.preserve_format) for k in ADAM_KEYS}}
            created = True
    if created:
        link_optimizer_state(engine)


def link_optimizer_state(engine) -> None:
    """Link each parameter to its slice of the AdamW moments. ZeRO-1/2 do it lazily after the
    *first param group's* step, before the second group has any state, so the second group (norms,
    embeddings, unembedding) would stay unlinked (DeepSpeed 0.19.8): link again once every group
    has state."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def adam_step_count(optimizer) -> torch.Tensor:
    """AdamW's step counter (one for all of ZeRO's flat groups)."""
    for st in optimizer.state.values():
        if "step" in st:
            return torch.as_tensor(st["step"], dtype=torch.float32).detach().clone().cpu()
    return torch.zeros((), dtype=torch.float32)


def set_adam_step_count(optimizer, step) -> None:
    for st in optimizer.state.values():
        if "step" in st:
            st["step"] = torch.as_tensor(step, dtype=torch.float32).clone().reshape(torch.as_tensor(st["step"]).shape)


def get_adam_moments(p) -> dict[str, torch.Tensor]:
    """{exp_avg, exp_avg_sq} of ``p`` assembled over the ZeRO group, shaped like ``p`` (zeros
    before the first step)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    shape = full_shape(p)
    out = {}
    for k in ADAM_KEYS:
        v = safe_get_full_optimizer_state(p, k)
        out[k] = torch.zeros(shape, dtype=torch.float32) if v is None else v.detach().reshape(shape).float()
    return out


def set_adam_moments(p, moments: dict[str, torch.Tensor]) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    for k in ADAM_KEYS:
        safe_set_full_optimizer_state(p, moments[k].to(device=p.device, dtype=torch.float32).reshape(-1), k)


# --- param groups by name ----------------------------------------------------------------------
def named_param_groups(optimizer, group_fqns: list[list[str]]) -> list[dict]:
    """The optimizer's param groups with parameter names in place of parameters."""
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": list(fqns)}
            for g, fqns in zip(optimizer.param_groups, group_fqns)]


def load_named_param_groups(optimizer, group_fqns: list[list[str]], saved: list[dict]) -> None:
    """Restore hyper-parameters group by group, matching groups by their parameter names."""
    by_fqns = {frozenset(g["params"]): g for g in saved}
    for group, fqns in zip(optimizer.param_groups, group_fqns):
        match = by_fqns.get(frozenset(fqns))
        if match is None:
            raise ValueError(f"the checkpoint's optimizer param groups do not match this model's "
                             f"(no saved group holds exactly these {len(fqns)} parameters: {fqns[:3]}...)")
        for k, v in match.items():
            if k != "params" and k in group:
                group[k] = v
