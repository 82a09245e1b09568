"""Global gradient norms and clipping, the same meaning under every strategy: the L2 norm of the
whole model's gradient before clipping, whatever the gradients' placement (plain replicas, FSDP
or TP shards as DTensors, 2-D meshes), and gradients scaled down to ``optim.grad_clip``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate


def grad_norm_sharded(params, world_group=None) -> torch.Tensor:
    """Global L2 norm of the gradients of parameters that may be DTensors on any mesh covering
    every rank (TP shards, FSDP shards, 2-D), or plain replicated tensors.

    Each rank adds the squares of its local shard; a placement replicated along a mesh dim is
    counted once by dividing by that dim's size; one all-reduce over all ranks sums the rest.
    """
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
