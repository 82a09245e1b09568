"""Typed, validated model configuration and the named model sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

HEAD_TYPES = ("transformer", "linear", "causal")


@dataclass
class ModelConfig:
    """Shape of a multi-token-prediction decoder.

    The model is an embedding, a trunk of ``n_layers`` blocks, ``n_future`` heads and one shared
    unembedding. With the default ``transformer`` heads of ``head_layers`` blocks each, an
    ``n_future=1`` model is an ordinary ``n_layers + head_layers`` deep next-token model.
    """

    name: str = "custom"
    vocab_size: int = 8192
    dim: int = 128
    n_layers: int = 4  # trunk depth (before any layers are handed to the heads)
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    ffn_dim: Optional[int] = None  # None = 8/3 * dim rounded up to a multiple of 64
    n_future: int = 1
    head_type: str = "transformer"
    head_layers: int = 1  # blocks per head (transformer and causal heads)
    # Paper's fair comparison: move (n_future - 1) * head_layers blocks from the trunk into the
    # extra heads so an n-head model has the parameter count of the n=1 baseline.
    match_baseline_params: bool = False
    # Causal heads: one set of weights for heads 2..n (Megatron's mtp_use_repeated_layer), so n can
    # grow without parameters. Each depth keeps its own attention cache slots.
    share_extra_heads: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 2048  # RoPE table length: the longest sequence the model accepts
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def positive(field: str) -> None:
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise ValueError(f"model.{field} must be a positive integer, got {getattr(self, field)!r}")

        for field in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "head_layers"):
            positive(field)
        if not isinstance(self.n_future, int) or self.n_future < 1:
            raise ValueError(f"model.n_future must be >= 1 (1 = plain next-token model), got {self.n_future!r}")
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"model.head_type must be one of {HEAD_TYPES}, got {self.head_type!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"model.dim / model.n_heads = {self.dim // self.n_heads} must be even for rotary embeddings")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
        if self.ffn_dim is None:
            self.ffn_dim = -(-(8 * self.dim // 3) // 64) * 64
        positive("ffn_dim")
        if self.match_baseline_params and self.head_type == "linear":
            raise ValueError("model.match_baseline_params needs head_type transformer or causal "
                             "(linear heads have no blocks to take from the trunk)")
        if self.share_extra_heads and self.head_type != "causal":
            raise ValueError(f"model.share_extra_heads needs head_type=causal (a chain that reads its own depth's "
                             f"token embedding), got head_type={self.head_type}")
        if self.trunk_layers < 1:
            raise ValueError(
                f"model: heads deeper than the model allows: n_layers={self.n_layers} leaves "
                f"{self.trunk_layers} trunk layers after giving {(self.n_future - 1) * self.head_layers} "
                f"to the extra heads (match_baseline_params); lower model.n_future or model.head_layers")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def trunk_layers(self) -> int:
        """Blocks in the shared trunk after the baseline-matching hand-over."""
        if self.match_baseline_params:
            return self.n_layers - (self.n_future - 1) * self.head_layers
        return self.n_layers

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Named sizes live in mtp_pretrain/conf/model/<size>.yaml (the one place they are written down,
# shipped as package data); this reads them for code that builds models outside a Hydra job
# (tests, benchmarks, tools).
SIZES_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"


def _load_sizes() -> dict[str, dict]:
    import yaml

    return {p.stem: {k: v for k, v in yaml.safe_load(p.read_text()).items() if k != "name"}
            for p in sorted(SIZES_DIR.glob("*.yaml"))}


MODEL_SIZES: dict[str, dict] = _load_sizes()


def model_config(size: str, **overrides) -> ModelConfig:
    if size not in MODEL_SIZES:
        raise ValueError(f"model.name must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    return ModelConfig(name=size, **{**MODEL_SIZES[size], **overrides})


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Closed-form parameter counts (checked against the built module by the tests)."""
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    block = (d * d + 2 * d * kv + d * d) + 3 * d * cfg.ffn_dim + 2 * d  # attention, SwiGLU, 2 norms
    embedding = cfg.vocab_size * d
    unembedding = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    if cfg.head_type == "linear":
        per_head = d * d + d  # linear map + its final norm
        first_head = per_head
    else:
        per_head = cfg.head_layers * block + d  # blocks + final norm
        first_head = per_head
        if cfg.head_type == "causal":
            # heads 2..n fuse [norm(h_prev); norm(emb)] through a 2d -> d projection
            per_head += 2 * d + 2 * d * d
    trunk = cfg.trunk_layers * block
    extra_heads = min(cfg.n_future - 1, 1) if cfg.share_extra_heads else cfg.n_future - 1
    heads = first_head + extra_heads * per_head
    return {
        "embedding": embedding,
        "trunk": trunk,
        "heads": heads,
        "unembedding": unembedding,
        "non_embedding": trunk + heads,
        "total": embedding + trunk + heads + unembedding,
    }


def check_vocab(cfg: ModelConfig, tokenizer_vocab_size: int) -> None:
    """Raise if the model cannot embed every id the tokenizer produces (called by the trainer).
    A larger model vocabulary (padded to a multiple of 64, say) is fine."""
    if cfg.vocab_size < tokenizer_vocab_size:
        raise ValueError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's "
                         f"vocabulary ({tokenizer_vocab_size})")
