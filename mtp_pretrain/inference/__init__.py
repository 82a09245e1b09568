"""Incremental decoding with a key/value cache: greedy, sampling, self-speculative (blockwise
parallel) and tree (Medusa-style) decoding of multi-token-prediction models. See docs/decoding.md."""

from mtp_pretrain.inference.decode import MODES, Decoder, DraftTree, Generation, GenerationConfig, generate
from mtp_pretrain.inference.kv_cache import KVCache
from mtp_pretrain.inference.stats import RunStats, SequenceStats

__all__ = ["MODES", "Decoder", "DraftTree", "Generation", "GenerationConfig", "KVCache", "RunStats",
           "SequenceStats", "generate"]
