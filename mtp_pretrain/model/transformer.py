"""A Llama-style multi-token-prediction decoder, single-device code.

    tokens -> tok_embeddings -> trunk (L blocks) -> z
    z -> head_1 -> norm -> unembed -> logits for token t+1
    z -> head_2 -> norm -> unembed -> logits for token t+2      (transformer / linear heads)
    ...
All heads share one unembedding matrix. With ``causal`` heads (DeepSeek-V3 style) head i > 1
reads the previous head's state and the embedding of token t+i-1 instead of z, so heads chain.

Parallelism is applied to this module from ``mtp_pretrain.parallel``; nothing here knows about
it. Attention optionally reads and writes a key/value cache (``mtp_pretrain.inference``) through
a two-method protocol, so the same blocks serve training and incremental decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mtp_pretrain.model.config import ModelConfig
from mtp_pretrain.model.init import initial_value
from mtp_pretrain.ops import linear_cross_entropy


class AttentionCache(Protocol):
    """What attention needs from a key/value cache (implemented in ``mtp_pretrain.inference``)."""

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Store k/v [B, H_kv, T, hd] of the new positions; return all cached k, v and the
        boolean attention mask [B, 1, T, S] (True = attend) for the new queries."""
        ...


@dataclass
class PackedDocuments:
    """Where the documents of packed windows lie, for attention and rotary positions that stay
    inside each document. A token belongs to the document its EOS ends (the EOS included); the
    first document of a window may have begun in the previous window and starts at position 0."""

    positions: torch.Tensor  # [B, T] position of each token inside its document
    mask: torch.Tensor  # [B, 1, T, T] bool, True where query t may attend key s (same document, s <= t)

    @classmethod
    def from_tokens(cls, inputs: torch.Tensor, document_end_id: int) -> "PackedDocuments":
        ends = inputs == document_end_id
        # Document index of each token: the number of EOS strictly before it.
        doc = torch.cumsum(ends, dim=1) - ends.long()
        T = inputs.shape[1]
        t = torch.arange(T, device=inputs.device).expand_as(inputs)
        starts = torch.zeros_like(ends)
        starts[:, 1:] = ends[:, :-1]
        starts[:, 0] = True
        first = torch.cummax(torch.where(starts, t, torch.zeros_like(t)), dim=1).values
        causal = torch.ones(T, T, dtype=torch.bool, device=inputs.device).tril()
        mask = (doc[:, :, None] == doc[:, None, :]) & causal
        return cls(positions=t - first, mask=mask.unsqueeze(1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in float32 (as Llama does) so bf16 activations keep their scale exactly.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # [max_seq_len, head_dim / 2]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (the Hugging Face Llama convention, so exported q/k
    weights need no permutation). x: [B, T, H, hd]; cos/sin: [B, T, hd/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: Optional[AttentionCache] = None, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mask: [B, 1, T, T] bool (True = attend) for packed documents; None = plain causal."""
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = apply_rope(self.q_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(B, T, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v, mask = cache.update(self.layer_id, k, v)
        if k.shape[1] != q.shape[1]:  # grouped-query attention: share each k/v head
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_id)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, cache=None, mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        return x + self.mlp(self.mlp_norm(x))


class TransformerHead(nn.Module):
    """The paper's head: its own block(s), then a final norm before the shared unembedding."""

    def __init__(self, cfg: ModelConfig, first_layer_id: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, first_layer_id + j) for j in range(cfg.head_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None, emb=None, mask=None):
        """Returns (state, normed state): the state feeds a chained next head, the normed state
        the unembedding. Both come out of forward so that sharding wrappers see the norm used."""
        for block in self.blocks:
            x = block(x, cos, sin, cache, mask)
        return x, self.norm(x)


class LinearHead(nn.Module):
    """A per-head linear map of the trunk output, then a final norm."""

    def __init__(self, cfg: ModelConfig, first_layer_id: int):
        super().__init__()
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, cache=None, emb=None, mask=None):
        x = self.proj(x)
        return x, self.norm(x)


class CausalHead(TransformerHead):
    """DeepSeek-V3 style head i > 1: fuses the previous head's state at position t with the
    embedding of token t+i-1, then runs its block(s). The heads form a chain."""

    def __init__(self, cfg: ModelConfig, first_layer_id: int):
        super().__init__(cfg, first_layer_id)
        self.prev_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.emb_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.fuse = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, cache=None, emb=None, mask=None):
        x = self.fuse(torch.cat((self.prev_norm(x), self.emb_norm(emb)), dim=-1))
        return super().forward(x, cos, sin, cache, mask=mask)


class Unembedding(nn.Module):
    """The one output matrix every head shares. Given targets it returns the summed
    cross-entropy instead of logits (optionally over sequence chunks so that full logits never
    exist), inside this module's forward so that sharding wrappers see the weight in use."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, h: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
                chunk_size: int = 0, ignore_index: int = -100) -> torch.Tensor:
        if targets is None:
            return F.linear(h, self.weight)
        return linear_cross_entropy(h, self.weight, targets, chunk_size=chunk_size, ignore_index=ignore_index)


class MTPTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init_seed: Optional[int] = None):
        """Built under ``torch.device("meta")`` the model holds no storage and is not
        initialised (see ``mtp_pretrain/parallel/materialize.py``); otherwise its weights are
        ``init_weights(init_seed)``."""
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.trunk = nn.ModuleList(Block(cfg, i) for i in range(cfg.trunk_layers))
        heads = []
        for i in range(1, cfg.n_future + 1):
            first_layer_id = cfg.trunk_layers + (i - 1) * cfg.head_layers  # unique cache slots
            kind = {"transformer": TransformerHead, "linear": LinearHead,
                    "causal": CausalHead if i > 1 else TransformerHead}[cfg.head_type]
            heads.append(kind(cfg, first_layer_id))
        self.heads = nn.ModuleList(heads)
        if cfg.share_extra_heads:
            for head in self.heads[2:]:
                share_parameters(head, self.heads[1])
        self.unembed = Unembedding(cfg.dim, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.unembed.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if not self.rope_cos.is_meta:
            self.init_weights(init_seed)

    @property
    def n_future(self) -> int:
        return self.cfg.n_future

    @property
    def heads_chain(self) -> bool:
        """True when head i reads head i-1's state (causal heads), False when all read z."""
        return self.cfg.head_type == "causal"

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """(Re)initialise every parameter from (seed, its name) alone (``model/init.py``) and
        recompute the RoPE tables. ``seed=None`` draws the seed from torch's global generator,
        so ``torch.manual_seed`` still decides the weights of a model built without one."""
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.init_buffers()
        for name, p in self.named_parameters():
            p.copy_(initial_value(self.cfg, name, p.shape, seed).to(p.dtype))

    @torch.no_grad()
    def init_buffers(self) -> None:
        """The RoPE tables (not saved in checkpoints: a function of the config)."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [B, T, hd/2] for absolute positions [B, T] (or [T])."""
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        return self.rope_cos[positions], self.rope_sin[positions]

    def check_length(self, T: int) -> None:
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len} (the RoPE limit)")

    def trunk_forward(self, inputs: torch.Tensor, positions: Optional[torch.Tensor] = None,
                      cache: Optional[AttentionCache] = None,
                      documents: Optional[PackedDocuments] = None) -> torch.Tensor:
        """inputs [B, T] -> trunk output z [B, T, dim]. ``documents``: attention and positions
        stay inside each packed document (overrides ``positions``)."""
        if documents is not None:
            positions = documents.positions
        self.check_length(inputs.shape[1] if positions is None else int(positions.max()) + 1)
        return self.trunk_segment(self.tok_embeddings(inputs), range(len(self.trunk)), positions, cache, documents)

    def _rotary_and_mask(self, x: torch.Tensor, positions: Optional[torch.Tensor],
                         documents: Optional[PackedDocuments]):
        """(cos, sin, attention mask) for hidden states x: positions restart per document when
        ``documents`` is given, else run 0..T-1 unless given."""
        mask = None
        if documents is not None:
            positions, mask = documents.positions, documents.mask
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device)
        cos, sin = self.rope(positions)
        return cos, sin, mask

    def trunk_segment(self, x: torch.Tensor, blocks: range, positions: Optional[torch.Tensor] = None,
                      cache: Optional[AttentionCache] = None,
                      documents: Optional[PackedDocuments] = None) -> torch.Tensor:
        """Trunk blocks ``blocks`` (indices into ``trunk``) on hidden states x [B, T, dim]: the
        whole trunk after the embedding, or one pipeline stage's share of it."""
        cos, sin, mask = self._rotary_and_mask(x, positions, documents)
        for i in blocks:
            x = self.trunk[i](x, cos, sin, cache, mask)
        return x

    def head_forward(self, i: int, x: torch.Tensor, shifted_tokens: Optional[torch.Tensor] = None,
                     positions: Optional[torch.Tensor] = None,
                     cache: Optional[AttentionCache] = None,
                     documents: Optional[PackedDocuments] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(state, normed state) of head i (1-based). x is z for independent heads and
        head i-1's state for chained (causal) heads, which also embed ``shifted_tokens``: the
        tokens at t+i-1 for every position t. ``documents`` as in ``trunk_forward``."""
        cos, sin, mask = self._rotary_and_mask(x, positions, documents)
        emb = None
        if self.heads_chain and i > 1:
            emb = self.tok_embeddings(shifted_tokens)
        return self.heads[i - 1](x, cos, sin, cache, emb, mask)

    def forward(self, tokens: torch.Tensor, seq_len: Optional[int] = None,
                document_end_id: Optional[int] = None) -> list[torch.Tensor]:
        """Per-head logits [B, T, V] for inputs tokens[:, :T] (T = seq_len, default the whole
        sequence). Causal heads embed tokens beyond T when the batch has them.
        ``document_end_id``: the windows are packed documents ended by this id (see
        ``PackedDocuments``)."""
        T = tokens.shape[1] if seq_len is None else seq_len
        documents = None if document_end_id is None else PackedDocuments.from_tokens(tokens[:, :T], document_end_id)
        x = z = self.trunk_forward(tokens[:, :T], documents=documents)
        logits = []
        for i in range(1, self.n_future + 1):
            h, y = self.head_forward(i, x if self.heads_chain else z, shifted_tokens(tokens, i, T),
                                     documents=documents)
            logits.append(self.unembed(y))
            x = h
        return logits


def share_parameters(dst: nn.Module, src: nn.Module) -> None:
    """Make every parameter of ``dst`` the very Parameter of ``src`` at the same place. The
    modules stay distinct, so each keeps its own attention ``layer_id`` (its own cache slots)."""
    for (name, sub_dst), (_, sub_src) in zip(dst.named_modules(), src.named_modules()):
        for pname, p in list(sub_src.named_parameters(recurse=False)):
            setattr(sub_dst, pname, p)


def shifted_tokens(tokens: torch.Tensor, i: int, T: int, fill: int = 0) -> torch.Tensor:
    """tokens[:, i-1 : i-1+T], padded with ``fill`` where the batch ends (those positions have
    no target for head i, so what they embed never reaches a loss)."""
    out = tokens[:, i - 1: i - 1 + T]
    if out.shape[1] < T:
        out = F.pad(out, (0, T - out.shape[1]), value=fill)
    return out
