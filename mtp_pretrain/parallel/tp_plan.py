"""The tensor-parallel plan of ``MTPTransformer``: written down once, as plain data.

Every executor of tensor parallelism reads this table -- ``parallel/tp.py`` (DTensor) today, a
megatron-core executor later -- so it names only *what* is split and how, never an API. A rule is
``(pattern, style)``; patterns are ``fnmatch`` patterns over module names as
``named_modules()`` spells them (``trunk.0.attn.q_proj``, ``heads.2.blocks.0.mlp.down_proj``,
``unembed``). The first matching rule wins; a module matching none is left alone (it holds no
parameters of its own, or only sub-modules the table covers).

Styles (``W`` is the weight, ``[out, in]`` for a linear, ``[vocab, dim]`` for (un)embeddings):

``column``          W split along out (dim 0). Input replicated over the TP ranks, output sharded
                    along its last (feature) dim: q/k/v split by attention heads, gate/up by ffn.
``row``             W split along in (dim 1). Input sharded along its last dim (a ``column``'s
                    output), output partial sums, reduce-scattered over the sequence.
``vocab_embedding`` embedding table split along the vocabulary (dim 0); each rank looks up the
                    ids in its range (others give zeros), partial sums reduce-scattered over the
                    sequence.
``vocab_column``    the shared unembedding, split along the vocabulary (dim 0): input gathered
                    over the sequence, logits sharded over the vocabulary, fed to a
                    vocab-parallel cross-entropy -- no rank ever holds full B x T x V logits.
``sequence``        a norm: weight replicated; its input and output are sharded along the
                    sequence (sequence parallelism), so it runs on T/tp positions per rank.
``replicate``       a small projection run on sequence-sharded activations with a replicated
                    weight (the causal heads' 2d -> d fuse, linear heads' map).
``gather_input``    a region (attention, MLP) whose first input is sharded along the sequence and
                    must be all-gathered before its ``column`` layers.

Between blocks the residual stream is sharded along the sequence (dim 1 of ``[B, T, dim]``).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable, Optional

COLUMN, ROW, VOCAB_EMBEDDING, VOCAB_COLUMN, SEQUENCE, REPLICATE, GATHER_INPUT = (
    "column", "row", "vocab_embedding", "vocab_column", "sequence", "replicate", "gather_input")
STYLES = (COLUMN, ROW, VOCAB_EMBEDDING, VOCAB_COLUMN, SEQUENCE, REPLICATE, GATHER_INPUT)

# Activations between blocks: [B, T, dim], sharded along this dim over the TP ranks.
SEQUENCE_DIM = 1

TP_PLAN: tuple[tuple[str, str], ...] = (
    ("tok_embeddings", VOCAB_EMBEDDING),
    ("unembed", VOCAB_COLUMN),
    # attention: heads split over ranks
    ("*.attn", GATHER_INPUT),
    ("*.attn.q_proj", COLUMN),
    ("*.attn.k_proj", COLUMN),
    ("*.attn.v_proj", COLUMN),
    ("*.attn.o_proj", ROW),
    # SwiGLU: ffn dim split over ranks
    ("*.mlp", GATHER_INPUT),
    ("*.mlp.gate_proj", COLUMN),
    ("*.mlp.up_proj", COLUMN),
    ("*.mlp.down_proj", ROW),
    # norms: sequence parallel
    ("*norm", SEQUENCE),
    # head-specific projections (causal heads' fuse, linear heads' map): replicated
    ("heads.*.fuse", REPLICATE),
    ("heads.*.proj", REPLICATE),
)

# Model dimensions each TP degree must divide (ModelConfig field -> what is split along it).
TP_DIVISIBLE: tuple[tuple[str, str], ...] = (
    ("n_heads", "attention heads (q_proj/o_proj are split by head)"),
    ("n_kv_heads", "key/value heads (k_proj/v_proj are split by head)"),
    ("ffn_dim", "the SwiGLU hidden dim (gate/up/down are split along it)"),
    ("vocab_size", "the vocabulary (embedding and unembedding are split along it)"),
)


def style_of(name: str, plan: Iterable[tuple[str, str]] = TP_PLAN) -> Optional[str]:
    """The style of module ``name`` (first matching rule), or None."""
    for pattern, style in plan:
        if fnmatchcase(name, pattern):
            return style
    return None


def assign(module_names: Iterable[str], plan: Iterable[tuple[str, str]] = TP_PLAN) -> dict[str, str]:
    """{module name: style} for every module the plan covers."""
    plan = tuple(plan)
    out = {}
    for name in module_names:
        style = style_of(name, plan)
        if style is not None:
            out[name] = style
    return out


def check_divisible(model_cfg, tp_size: int, seq_len: Optional[int] = None) -> None:
    """Raise ValueError naming the first dimension ``tp_size`` does not divide."""
    for field, what in TP_DIVISIBLE:
        value = getattr(model_cfg, field)
        if value % tp_size:
            raise ValueError(f"parallel.tp_size={tp_size} does not divide model.{field}={value} ({what})")
    if seq_len is not None and seq_len % tp_size:
        raise ValueError(f"parallel.tp_size={tp_size} does not divide data.seq_len={seq_len} "
                         f"(activations are sharded along the sequence between blocks)")
