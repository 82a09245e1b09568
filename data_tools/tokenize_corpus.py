"""Documents -> tokens -> Arrow shards + metadata.json, in parallel worker processes."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from mtp_pretrain.data.shards import SPLITS, build_metadata, split_summary, token_dtype, write_metadata, write_shard
from mtp_pretrain.data.tokenizer import TOKENIZER_FILE, load_tokenizer, open_tokenizer_source, write_role_config

from .corpus import Document

_worker_tokenizer = None


def is_validation(text: str, val_fraction: float) -> bool:
    """The held-out split is chosen by document hash: stable whatever the order or the run."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return h % 1_000_000 < val_fraction * 1_000_000


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    # One process = one core: the Rust tokenizer must not start its own thread pool as well.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_chunk(args: tuple[list[str], float]) -> tuple[dict, dict, int]:
    """Tokenize a chunk of documents: per split, the concatenated tokens (each doc + EOS) and doc count."""
    texts, val_fraction = args
    tok = _worker_tokenizer
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    eos = np.array([tok.eos_id], dtype=np.uint32)
    for text, ids in zip(texts, tok.encode_batch(texts)):
        split = "val" if is_validation(text, val_fraction) else "train"
        parts[split] += [np.asarray(ids, dtype=np.uint32), eos]
    tokens = {s: np.concatenate(p) if p else np.empty(0, np.uint32) for s, p in parts.items()}
    ndocs = {s: len(p) // 2 for s, p in parts.items()}
    return tokens, ndocs, sum(len(t.encode("utf-8")) for t in texts)


def _chunks(docs: Iterable[Document], chunk_bytes: int, val_fraction: float) -> Iterator[tuple[list[str], float]]:
    texts, size = [], 0
    for doc in docs:
        texts.append(doc["text"])
        size += len(doc["text"])
        if size >= chunk_bytes:
            yield texts, val_fraction
            texts, size = [], 0
    if texts:
        yield texts, val_fraction


class _SplitWriter:
    """Cuts one split's token stream into shards of exactly `shard_tokens` tokens (the last one shorter)."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict] = []
        self.num_documents = 0

    def add(self, tokens: np.ndarray, ndocs: int) -> None:
        self.num_documents += ndocs
        if len(tokens):
            self.buffer.append(tokens)
            self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        tokens = np.concatenate(self.buffer)
        rest = tokens[n:]
        path = self.out_dir / f"{self.split}-{len(self.shards):05d}.arrow"
        self.shards.append(write_shard(path, tokens[:n].astype(self.dtype)))
        self.buffer, self.buffered = ([rest] if len(rest) else []), len(rest)

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        return split_summary(self.shards, self.num_documents)



def add_role_arguments(parser) -> None:
    """--eos-token/--bos-token/--pad-token: which special tokens play the roles (default: the
    tokenizer's tokenizer_config.json, else conventional names such as <|endoftext|>, </s>)."""
    parser.add_argument("--eos-token", help="token that ends each document (required role; default from the tokenizer's config)")
    parser.add_argument("--bos-token", help="beginning-of-sequence token (optional role)")
    parser.add_argument("--pad-token", help="padding token (optional role; may equal the EOS token)")


def roles_from_args(args) -> dict:
    return {"eos": args.eos_token, "bos": args.bos_token, "pad": args.pad_token}


def prepare_dataset_dir(out_dir: Path, tokenizer_path, shard_mb: float, roles: dict | None = None):
    """Empty ``out_dir`` of an older dataset (metadata.json first, so a half-rewritten directory
    never looks complete), put the tokenizer and its roles (tokenizer_config.json) beside the
    shards; returns (tokenizer, token dtype, tokens per shard).

    ``tokenizer_path``: anything `open_tokenizer_source` accepts; ``roles``: explicit
    eos/bos/pad token names (--eos-token ...), overriding the tokenizer's own config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metadata.json").unlink(missing_ok=True)
    for old in out_dir.glob("*.arrow"):
        old.unlink()
    roles = roles or {}
    source_tok, store = open_tokenizer_source(tokenizer_path, roles.get("eos"), roles.get("bos"), roles.get("pad"))
    if isinstance(store, Path):
        if store.resolve() != (out_dir / TOKENIZER_FILE).resolve():
            shutil.copyfile(store, out_dir / TOKENIZER_FILE)
    else:  # converted (tiktoken): saved in the tokenizers format
        store.save(str(out_dir / TOKENIZER_FILE))
    write_role_config(source_tok, out_dir)
    tok = load_tokenizer(out_dir / TOKENIZER_FILE)
    dtype = token_dtype(tok.vocab_size)
    return tok, dtype, max(1, int(shard_mb * 2**20) // dtype.itemsize)


def tokenize_to_dataset(
    docs: Iterable[Document],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    source_description: str,
    shard_mb: float = 64,
    workers: int = 1,
    val_fraction: float = 0.01,
    total_bytes: int | None = None,
    chunk_bytes: int = 1 << 20,
    extra_metadata: dict | None = None,
    roles: dict | None = None,
) -> dict:
    """Tokenize `docs` into `out_dir` (train/val shards, tokenizer.json, metadata.json). Returns the metadata.

    metadata.json is written last: its presence means the dataset is complete.
    """
    out_dir = Path(out_dir)
    tok, dtype, shard_tokens = prepare_dataset_dir(out_dir, tokenizer_path, shard_mb, roles)
    writers = {s: _SplitWriter(out_dir, s, shard_tokens, dtype) for s in SPLITS}

    chunks = _chunks(docs, chunk_bytes, val_fraction)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenize {out_dir.name}", mininterval=1.0)
    t0 = time.perf_counter()
    nbytes = 0
    if workers <= 1:
        _init_worker(str(out_dir / TOKENIZER_FILE))
        results = map(_encode_chunk, chunks)
        pool = None
    else:
        pool = mp.get_context("spawn").Pool(workers, _init_worker, (str(out_dir / TOKENIZER_FILE),))
        results = pool.imap(_encode_chunk, chunks)  # ordered: the dataset does not depend on `workers`
    try:
        for tokens, ndocs, chunk_size in results:
            for split in SPLITS:
                writers[split].add(tokens[split], ndocs[split])
            nbytes += chunk_size
            bar.update(chunk_size)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    seconds = time.perf_counter() - t0

    meta = build_metadata(
        tok, {s: w.close() for s, w in writers.items()}, source_description,
        val_fraction=val_fraction, raw_text_bytes=nbytes, tokenize_seconds=round(seconds, 3), workers=workers,
        **(extra_metadata or {}),
    )
    write_metadata(out_dir, meta)
    return meta
