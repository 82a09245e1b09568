"""Synthetic token datasets (random tokens, byte tokenizer) for tests and benchmarks.

Written straight as shards, without a text corpus, so that a dataset of any size (a 1 GB one for
the memory benchmark, a 50-window one for a unit test) is made in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .shards import build_metadata, split_summary, token_dtype, write_metadata, write_shard
from .tokenizer import TOKENIZER_FILE, ByteTokenizer


def write_random_dataset(
    out_dir: str | Path,
    num_tokens: dict[str, int],
    *,
    low: int = 0,
    high: int = 256,
    shard_tokens: int = 1 << 20,
    doc_len: int = 0,
    seed: int = 0,
    progress=None,
) -> dict:
    """Dataset of uniform random byte ids in [low, high), split -> number of tokens.

    doc_len > 0 puts an EOS every doc_len tokens, so that documents look like real ones.
    progress(split, tokens_written, total) is called after each shard.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    tok.save(out_dir / TOKENIZER_FILE)
    dtype = token_dtype(tok.vocab_size)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, total in num_tokens.items():
        shards, written = [], 0
        while written < total:
            n = min(shard_tokens, total - written)
            tokens = rng.integers(low, high, size=n, dtype=dtype)
            if doc_len > 0:
                tokens[doc_len - 1 - written % doc_len :: doc_len] = tok.eos_id
            shards.append(write_shard(out_dir / f"{split}-{len(shards):05d}.arrow", tokens))
            written += n
            if progress:
                progress(split, written, total)
        splits[split] = split_summary(shards, written // doc_len if doc_len else 1)
    meta = build_metadata(tok, splits, f"synthetic: uniform random ids in [{low}, {high}), seed {seed}")
    write_metadata(out_dir, meta)
    return meta
