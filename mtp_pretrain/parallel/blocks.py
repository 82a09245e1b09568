"""Per-block options every strategy applies before sharding: activation checkpointing and
``torch.compile``.

Both replace a block's ``forward`` on the instance (never its class, never its name), so module
and parameter names -- hence checkpoints, the TP plan's patterns and the optimizer's parameter
groups -- are the same with or without them, and sharding wrappers applied afterwards
(``fully_shard``'s hooks, ZeRO-3's fetch hooks) stay outside the checkpointed/compiled region.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtp_pretrain.config import ParallelConfig


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """Trunk blocks, then each head's blocks, in depth order (linear heads have none)."""
    out = list(model.trunk)
    for head in model.heads:
        out.extend(getattr(head, "blocks", []))
    return out


def checkpointed_blocks(model: nn.Module, mode: str, every: int) -> list[int]:
    """Indices (into ``blocks_of``) of the blocks whose activations are recomputed."""
    n = len(blocks_of(model))
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n))
    if mode == "every_k":
        return [i for i in range(n) if i % every == 0]
    raise ValueError(f"parallel.activation_checkpointing must be none, full or every_k, got {mode!r}")


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> list[int]:
    blocks = blocks_of(model)
    chosen = checkpointed_blocks(model, mode, every)
    for i in chosen:
        block = blocks[i]
        inner = block.forward
        # Non-reentrant checkpointing: only the block's inputs are kept; its activations are
        # recomputed in the backward (works with DTensor and under FSDP2 / ZeRO-3 hooks).
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
    return chosen


def check_compile_available() -> None:
    """torch.compile needs a working backend (inductor needs a C++ compiler on CPU): try a
    trivial function now, so a bad set-up fails at start-up, not in the first step."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2)
        fn(torch.ones(4))
    except Exception as e:  # noqa: BLE001 - any backend failure is reported the same way
        raise RuntimeError(f"parallel.compile=true but torch.compile cannot run on this machine "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           f"set parallel.compile=false") from e


def apply_compile(model: nn.Module) -> int:
    check_compile_available()
    blocks = blocks_of(model)
    for block in blocks:
        # Compile the (possibly checkpointed) forward of each block; hooks stay eager.
        block.forward = torch.compile(block.forward, dynamic=False)
    return len(blocks)


def apply_block_options(model: nn.Module, cfg: ParallelConfig) -> nn.Module:
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        apply_compile(model)
    return model


def grad_norm_sharded(params, world_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of parameters that may be DTensors on any mesh covering
    every rank (TP shards, FSDP shards, 2-D), or plain replicated tensors.

    Each rank adds the squares of its local shard; a placement replicated along a mesh dim is
    counted once by dividing by that dim's size; one all-reduce over all ranks sums the rest.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate

    # Accumulated on the gradients' device: no host sync per parameter, and NCCL reduces only
    # device tensors. One copy to the host at the end.
    total = None
    world = dist.get_world_size(world_group) if dist.is_initialized() else 1
    for p in params:
        g = p.grad
        if g is None:
            continue
        if isinstance(g, DTensor):
            if any(pl.is_partial() for pl in g.placements):
                # Pending sums (e.g. a vocab-parallel embedding's gradient from several lookups):
                # reduce them first, or each rank's partial value would be squared on its own.
                g = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl for pl in g.placements])
            local = g.to_local()
            replicas = 1
            for size, placement in zip(g.device_mesh.shape, g.placements):
                if isinstance(placement, Replicate):
                    replicas *= size
            # ranks outside this mesh (none for our meshes) would hold copies too
            replicas *= world // g.device_mesh.size()
        else:
            local, replicas = g, world
        sq = local.detach().double().pow(2).sum() / replicas
        total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total, group=world_group)
    return total.sqrt().cpu()


def clip_grads_(params, max_norm: float, world_group=None) -> torch.Tensor:
    params = [p for p in params if p.grad is not None]
    norm = grad_norm_sharded(params, world_group)
    scale_grads_to_norm_(params, norm, max_norm)
    return norm.float()


def scale_grads_to_norm_(params, norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients down so that their global norm ``norm`` becomes ``max_norm`` (0 = off)."""
    if max_norm > 0:
        coef = float(max_norm / (norm + 1e-6))
        if coef < 1.0:
            for p in params:
                p.grad.mul_(coef)
