"""Initial weights as a function of (seed, parameter name) only.

Each parameter draws its initial value from its own CPU generator, seeded from a stable hash of
``(seed, fully-qualified parameter name)``. Nothing depends on the order in which parameters are
created or initialised, on the device, on the world size or on the parallelism strategy: a rank
that holds only a shard of ``trunk.3.mlp.up_proj.weight`` generates that parameter's full value
from its seed and keeps its own slice, and gets exactly the numbers one process would hold
(``mtp_pretrain/parallel/materialize.py``). Tied or shared parameters are initialised once, under
the name ``named_parameters()`` reports for them (its first occurrence).

The rule itself (GPT-2 / Llama style): norm weights 1; every other matrix normal with
``model.init_std``, output projections of attention and MLP (``o_proj``, ``down_proj``) scaled
down by ``sqrt(2 * depth)`` so the residual stream's variance does not grow with depth.
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch

from mtp_pretrain.model.config import ModelConfig

RESIDUAL_OUTPUTS = ("o_proj.weight", "down_proj.weight")


def parameter_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, name); stable across processes and Python versions
    (``hash()`` of a string is salted per process, so it cannot be used)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def initial_value(cfg: ModelConfig, name: str, shape: Sequence[int], seed: int) -> torch.Tensor:
    """The full float32 initial value of parameter ``name`` (global ``shape``), on the CPU.
    Generated on the CPU whatever the training device, so that the values do not depend on it."""
    if name.endswith("norm.weight"):
        return torch.ones(tuple(shape), dtype=torch.float32)
    std = cfg.init_std
    if name.endswith(RESIDUAL_OUTPUTS):
        std = std / math.sqrt(2 * (cfg.trunk_layers + cfg.head_layers))
    gen = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device="cpu").mul_(std)
