"""Independent drafting heads run as one batched computation.

Heads 2..K+1 of a transformer- or linear-head model all read the same trunk output z and have
identical shapes, so decoding does not have to run them one after the other: fold the heads into
the batch (``x`` is ``[K * B, T, dim]``, head-major) and replace every weight by the stack of
the K heads' weights. Each matmul becomes one batched matmul, each norm one broadcast, and every
other op (RoPE, attention, SwiGLU, residuals) already works per batch row. A step then pays the
per-op cost of one head block instead of K, which is what a small-batch decoding pass is bound
by (kernel launches on a GPU, op dispatch on a CPU).

The stacked module is a copy of head 2's module with its ``nn.Linear`` and ``RMSNorm`` leaves
swapped for stacked ones, so the block code that runs is the model's own. Its attention layers
get their own cache ids; the KV cache keeps K copies of the batch for them (see kv_cache.py).
``forward(..., num_heads=k)`` runs only the first k stacked heads (heads 2..k+1, the first k
copies of the batch in the cache): an adaptive draft length changes k from pass to pass without
restacking. The weights are a snapshot: :class:`~mtp_pretrain.inference.decode.Decoder` rebuilds it when the
heads' parameters change (their version counters move on every in-place update).

Head 1 never runs stacked: it verifies, so it computes exactly as in greedy decoding.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from mtp_pretrain.model.transformer import Attention, RMSNorm, rms_norm


class StackedLinear(nn.Module):
    """K bias-free linear maps of the same shape as one batched matmul over head-major rows."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.register_buffer("weight_t", torch.stack([m.weight.detach().t() for m in layers]).contiguous())
        self.active = len(layers)  # heads run (the first ones), set by StackedHeads.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.active
        y = torch.bmm(x.reshape(K, -1, x.shape[-1]), self.weight_t[:K])
        return y.view(*x.shape[:-1], y.shape[-1])


class StackedRMSNorm(nn.Module):
    def __init__(self, norms: Sequence[RMSNorm]):
        super().__init__()
        self.eps = norms[0].eps
        self.register_buffer("weight", torch.stack([m.weight.detach() for m in norms])[:, None, :])
        self.active = len(norms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = self.active
        return rms_norm(x.reshape(K, -1, x.shape[-1]), self.weight[:K], self.eps).view_as(x)


class StackedHeads(nn.Module):
    """``forward(z, cos, sin, cache)`` -> (states, normed states), each ``[K, B, T, dim]``, of
    the given heads at once. ``first_layer_id``: cache id of the first stacked attention layer
    (unused by the model's own layers)."""

    def __init__(self, heads: Sequence[nn.Module], first_layer_id: int):
        super().__init__()
        kinds = {type(h) for h in heads}
        if len(kinds) != 1:
            raise ValueError(f"stacked heads must share one type, got {sorted(k.__name__ for k in kinds)}")
        self.num_heads = len(heads)
        self.template = copy.deepcopy(heads[0])
        self._stacked_leaves: list[nn.Module] = []
        next_id = first_layer_id
        for name, module in list(self.template.named_modules()):
            if isinstance(module, Attention):
                module.layer_id, next_id = next_id, next_id + 1
            if isinstance(module, (nn.Linear, RMSNorm)):
                parts = [h.get_submodule(name) for h in heads]
                if isinstance(module, nn.Linear):
                    if module.bias is not None:
                        raise ValueError(f"{name}: stacking supports bias-free linear layers only")
                    stacked = StackedLinear(parts)
                else:
                    stacked = StackedRMSNorm(parts)
                self._stacked_leaves.append(stacked)
                parent, _, leaf = name.rpartition(".")
                setattr(self.template.get_submodule(parent) if parent else self.template, leaf, stacked)
        leftover = [n for n, _ in self.template.named_parameters()]
        if leftover:  # a weight the stacking does not know would silently be head 2's for all heads
            raise ValueError(f"cannot stack head parameters {leftover}")

    def forward(self, z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None,
                num_heads: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        K, (B, T, D) = self.num_heads if num_heads is None else num_heads, z.shape
        if not 1 <= K <= self.num_heads:
            raise ValueError(f"num_heads={K}: this stack holds {self.num_heads} heads")
        for leaf in self._stacked_leaves:
            leaf.active = K
        rep = (K,) + (1,) * (z.dim() - 1)
        state, normed = self.template(z.repeat(rep), cos.repeat(rep), sin.repeat(rep), cache)
        return state.view(K, B, T, D), normed.view(K, B, T, D)
