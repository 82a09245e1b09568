"""Streaming data: memory-mapped Arrow token shards, mixtures, rank sharding, resumable state."""

from .errors import DataError
from .stream import ArrowTokenStream, DataSource
from .tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = ["ArrowTokenStream", "DataSource", "DataError", "load_tokenizer", "BPETokenizer", "ByteTokenizer"]
