"""`build-default`: the default corpus end to end — one BPE tokenizer, datasets DIR/code and DIR/text.

Idempotent: when DIR already holds both datasets built with the same settings and tokenizer it
returns at once.
"""

from __future__ import annotations

import json
import os
import time
from itertools import islice
from pathlib import Path

from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.shards import read_metadata
from mtp_pretrain.data.tokenizer import TOKENIZER_FILE, BPETokenizer, file_hash

from . import default_corpus
from .corpus import cap_bytes, deduplicate
from .tokenize_corpus import tokenize_to_dataset


def _collect(docs, max_mb: float) -> list[dict]:
    return list(cap_bytes(deduplicate(docs), int(max_mb * 2**20)))


def _already_built(out: Path, settings: dict) -> bool:
    tok_path = out / TOKENIZER_FILE
    if not tok_path.exists():
        return False
    try:
        metas = [read_metadata(out / name) for name in ("code", "text")]
    except DataError:
        return False
    shards_present = all(
        (out / name / e["file"]).exists() and (out / name / e["file"]).stat().st_size == e["bytes"]
        for name, m in zip(("code", "text"), metas)
        for split in m["splits"].values()
        for e in split["shards"]
    )
    return shards_present and all(
        m.get("build_settings") == settings and m["tokenizer"]["hash"] == file_hash(tok_path) for m in metas
    )


def _sample(docs: list[dict], max_bytes: int):
    """An evenly spread sample of documents (every k-th) of about `max_bytes`."""
    total = sum(len(d["text"]) for d in docs)
    step = max(1, round(total / max_bytes))
    return (d["text"] for d in islice(docs, 0, None, step))


def build_default(out: str | Path, max_mb: float = 32, vocab_size: int = 8192, sample_mb: float = 8,
                  shard_mb: float = 64, val_fraction: float = 0.02, workers: int | None = None) -> None:
    out = Path(out)
    settings = {"max_mb": max_mb, "vocab_size": vocab_size, "sample_mb": sample_mb, "shard_mb": shard_mb, "val_fraction": val_fraction}
    if _already_built(out, settings):
        print(f"{out}: default corpus already built ({json.dumps(settings)}); nothing to do")
        return
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)

    corpora = {
        "code": (_collect(default_corpus.stdlib_python_sources(), max_mb), default_corpus.CODE_SOURCE_DESCRIPTION),
        "text": (_collect(default_corpus.english_prose(), max_mb), default_corpus.TEXT_SOURCE_DESCRIPTION),
    }
    for name, (docs, _) in corpora.items():
        print(f"{name}: {len(docs)} documents, {sum(len(d['text'].encode()) for d in docs) / 2**20:.1f} MiB")

    print(f"training byte-level BPE, vocab {vocab_size}, on a {sample_mb} MiB sample of both corpora")
    per_corpus = int(sample_mb * 2**20 / len(corpora))
    sample = [t for docs, _ in corpora.values() for t in _sample(docs, per_corpus)]
    tok = BPETokenizer.train(sample, vocab_size)
    tok.save(out / TOKENIZER_FILE)
    print(f"tokenizer {out / TOKENIZER_FILE} hash {tok.hash} ({time.perf_counter() - t0:.0f}s so far)")

    for name, (docs, description) in corpora.items():
        meta = tokenize_to_dataset(
            docs, out / TOKENIZER_FILE, out / name,
            source_description=description, shard_mb=shard_mb, workers=workers, val_fraction=val_fraction,
            total_bytes=sum(len(d["text"].encode()) for d in docs),
            extra_metadata={"build_settings": settings},
        )
        s = meta["splits"]
        print(f"{out / name}: train {s['train']['num_tokens']:,} tokens, val {s['val']['num_tokens']:,} tokens")
    print(f"default corpus built in {time.perf_counter() - t0:.0f}s")
