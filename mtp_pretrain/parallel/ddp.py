"""Data parallelism: parameters replicated, gradients averaged once per optimizer step.

torch's DistributedDataParallel reduces inside the root module's backward; the head-sequential
loss runs several backward passes through submodules, so instead the replicas are synchronised
explicitly: parameters broadcast from rank 0 once, gradients all-reduced in flat buckets after
the last micro-batch (one reduction per step, whatever the number of heads and micro-batches).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mtp_pretrain.parallel.base import Strategy
from mtp_pretrain.parallel.blocks import apply_block_options

BUCKET_BYTES = 25 * 2**20


class DDPStrategy(Strategy):
    name = "ddp"

    def parallelize(self, model: nn.Module) -> nn.Module:
        model.to(self.env.device)
        apply_block_options(model, self.cfg)
        if self.env.distributed:
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(t, src=0)
        return model

    def finish_backward(self, model: nn.Module) -> None:
        if self.dp_size > 1:
            all_reduce_mean_grads(model, self.dp_size)


def all_reduce_mean_grads(model: nn.Module, world_size: int, group=None) -> None:
    """Average every gradient over ``group`` in flat buckets of about BUCKET_BYTES."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    bucket, size = [], 0
    for g in grads + [None]:
        if g is not None:
            bucket.append(g)
            size += g.numel() * g.element_size()
        if bucket and (g is None or size >= BUCKET_BYTES):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)
            flat /= world_size
            for dst, src in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                dst.copy_(src)
            bucket, size = [], 0
