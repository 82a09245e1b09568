"""Analytic training FLOPs per token and device peaks, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

from mtp_pretrain.model.config import ModelConfig, count_parameters

# Dense bf16 peak FLOP/s (no sparsity) per device.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 x matmul parameters touched per token (forward 2, backward 4), counting the shared
    unembedding once per head, plus attention scores and values (12 * layers * dim * seq_len,
    causal masking not discounted, as in the PaLM/Megatron convention)."""
    counts = count_parameters(cfg)
    matmul = counts["trunk"] + counts["heads"] + cfg.n_future * cfg.vocab_size * cfg.dim
    layers = cfg.trunk_layers + (cfg.n_future * cfg.head_layers if cfg.head_type != "linear" else 0)
    return 6 * matmul + 12 * layers * cfg.dim * seq_len


def device_peak_flops(device: torch.device, override: float | None = None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
