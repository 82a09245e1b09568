"""On-disk format of a tokenized dataset: Arrow IPC shard files plus one metadata.json.

    DIR/metadata.json       tokenizer (hash, special ids), token dtype, splits -> shard list
    DIR/tokenizer.json      the tokenizer the shards were built with
    DIR/train-00000.arrow   one column "tokens" (uint16 or uint32), documents joined by EOS
    DIR/val-00000.arrow

Shards are Arrow IPC *files* (not streams) so that they can be memory-mapped and read without
copying: a column of a mapped file is a view of the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .errors import DataError

FORMAT_VERSION = 1
METADATA_FILE = "metadata.json"
TOKEN_COLUMN = "tokens"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id: uint16 halves the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, tokens: np.ndarray) -> dict:
    """Write one shard atomically (temp file + rename) and return its metadata entry."""
    path = Path(path)
    tmp = path.with_suffix(".arrow.tmp")
    table = pa.table({TOKEN_COLUMN: pa.array(tokens)})
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)
    return {
        "file": path.name,
        "num_tokens": int(len(tokens)),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "max_token_id": int(tokens.max()) if len(tokens) else -1,
    }


def build_metadata(tokenizer, splits: dict, source: str, **extra) -> dict:
    """The metadata.json of a dataset whose shards are written (`splits`: split -> shard summary)."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "tokenizer": {
            "file": "tokenizer.json",
            "kind": tokenizer.kind,
            "hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.pad_id,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            # Roles by name (bos/pad may be None): every consumer reads them from here.
            **{f"{role}_token": name for role, name in tokenizer.role_tokens().items()},
        },
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "document_separator": "eos",
        "splits": splits,
        **extra,
    }


def split_summary(shards: list[dict], num_documents: int) -> dict:
    return {"num_tokens": sum(s["num_tokens"] for s in shards), "num_documents": num_documents, "shards": shards}


def read_metadata(dataset_dir: Path) -> dict:
    path = Path(dataset_dir) / METADATA_FILE
    if not path.exists():
        raise DataError(f"{path}: missing; {dataset_dir} is not a tokenized dataset (run `python -m data_tools tokenize`)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable metadata: {e}") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def write_metadata(dataset_dir: Path, meta: dict) -> None:
    path = Path(dataset_dir) / METADATA_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


def open_shard(path: Path, entry: dict, dtype: np.dtype, vocab_size: int, verify: str) -> list[np.ndarray]:
    """Memory-map one shard and check it against its metadata entry.

    Returns the token column as zero-copy numpy views, one per Arrow record batch.
    verify: "size" checks existence, byte size, token count, dtype and max id (fast, from the
    footer and metadata); "checksum" also hashes the whole file.
    """
    if not path.exists():
        raise DataError(f"{path}: shard listed in metadata.json is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise DataError(f"{path}: size {size} bytes, metadata.json says {entry['bytes']} (truncated or rewritten)")
    if verify == "checksum" and sha256_file(path) != entry["sha256"]:
        raise DataError(f"{path}: SHA-256 checksum mismatch with metadata.json (corrupt shard)")
    if entry["max_token_id"] >= vocab_size:
        raise DataError(f"{path}: token id {entry['max_token_id']} >= vocab size {vocab_size}")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow IPC file ({e})") from e
    if reader.schema.names != [TOKEN_COLUMN] or reader.schema.field(0).type != pa.from_numpy_dtype(dtype):
        raise DataError(f"{path}: schema {reader.schema} is not one {dtype} column '{TOKEN_COLUMN}'")
    arrays = [b.column(0).to_numpy(zero_copy_only=True) for b in batches]
    if sum(len(a) for a in arrays) != entry["num_tokens"]:
        raise DataError(f"{path}: {sum(len(a) for a in arrays)} tokens, metadata.json says {entry['num_tokens']}")
    return [a for a in arrays if len(a)]
