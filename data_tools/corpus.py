"""Corpus import: raw sources -> documents ({"text", "source"} dicts), deduplicated.

Documents travel between the steps of the pipeline as JSONL files, one document a line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

Document = dict  # {"text": str, "source": str}

SKIP_DIRS = {"__pycache__", ".git", "site-packages", "dist-packages", "node_modules"}


def _is_binary(raw: bytes) -> bool:
    return b"\0" in raw[:8192]


def iter_directory(root: str | Path, extensions: Iterable[str] | None = None, max_file_bytes: int = 1 << 20) -> Iterator[Document]:
    """Every text file under `root` (sorted, so the order is reproducible).

    Skips files whose extension is not in `extensions` (None: all), files over `max_file_bytes`
    (generated or data files, not code), binaries (a NUL byte) and files that are not UTF-8.
    """
    root = Path(root)
    exts = {e if e.startswith(".") else "." + e for e in extensions} if extensions else None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if exts is not None and path.suffix not in exts:
                continue
            try:
                if not path.is_file() or path.stat().st_size > max_file_bytes:
                    continue
                raw = path.read_bytes()
            except OSError:
                continue
            if _is_binary(raw):
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                yield {"text": text, "source": str(path.relative_to(root))}


def iter_jsonl(path: str | Path, field: str = "text") -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"{path}:{lineno}: no field {field!r} in JSONL record")
            yield {"text": record[field], "source": f"{Path(path).name}:{lineno}"}


def iter_parquet(path: str | Path, column: str = "text") -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if column not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {column!r} (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[column]):
        for text in batch.column(0).to_pylist():
            if text:
                yield {"text": text, "source": f"{Path(path).name}:{row}"}
            row += 1


def iter_text_files(paths: Iterable[str | Path]) -> Iterator[Document]:
    """One document per plain text file."""
    for p in paths:
        yield {"text": Path(p).read_text(encoding="utf-8"), "source": Path(p).name}


def document_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def deduplicate(docs: Iterable[Document]) -> Iterator[Document]:
    """Drop exact duplicates (same text), keeping the first."""
    seen: set[bytes] = set()
    for doc in docs:
        h = hashlib.sha256(doc["text"].encode("utf-8")).digest()
        if h not in seen:
            seen.add(h)
            yield doc


def cap_bytes(docs: Iterable[Document], max_bytes: int | None) -> Iterator[Document]:
    """Stop once `max_bytes` of UTF-8 text have been yielded (None: no cap)."""
    total = 0
    for doc in docs:
        if max_bytes is not None and total >= max_bytes:
            return
        total += len(doc["text"].encode("utf-8"))
        yield doc


def write_jsonl(docs: Iterable[Document], path: str | Path) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
