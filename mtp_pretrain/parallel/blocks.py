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
