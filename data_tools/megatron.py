"""Megatron indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``) to and from our Arrow shards.

    python -m data_tools import-megatron PREFIX [PREFIX ...] --tokenizer tokenizer.json --out DIR
    python -m data_tools export-megatron DIR --out PREFIX [--split train|val|all]

The format (megatron-core's ``IndexedDataset``, version 1), read and written here with numpy so
that neither direction needs megatron-core installed:

    .idx  b"MMIDIDX\\x00\\x00", <Q version=1, <B dtype code, <Q sequence count S, <Q document count D,
          int32[S] sequence lengths, int64[S] byte offsets of the sequences in .bin,
          int64[D] document indices (0, then the sequence index that ends each document)
    .bin  the tokens of every sequence, back to back, in that dtype

Documents: ours are joined by EOS (each document ends with the tokenizer's EOS). Export writes each
document, its EOS included, as one sequence and one document -- what megatron's
``preprocess_data.py --append-eod`` writes. Import concatenates the sequences of each document
and appends EOS where a document does not already end with it, so documents survive both ways
(Arrow -> .bin/.idx -> Arrow gives identical documents). Token ids are checked against the named
tokenizer's vocabulary; a .bin whose size disagrees with its .idx is refused, naming the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.shards import SPLITS, build_metadata, open_shard, read_metadata, write_metadata
from mtp_pretrain.data.tokenizer import open_tokenizer_source

from .tokenize_corpus import _SplitWriter, add_role_arguments, prepare_dataset_dir, roles_from_args

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def megatron_dtype(vocab_size: int) -> np.dtype:
    """megatron-core's choice (``DType.optimal_dtype``): uint16 below 65500 ids, else int32."""
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def strip_prefix(path: str | Path) -> Path:
    """``data/x``, ``data/x.bin`` or ``data/x.idx`` -> ``data/x``."""
    p = Path(path)
    return p.with_suffix("") if p.suffix in (".bin", ".idx") else p


@dataclass
class MegatronIndex:
    prefix: Path
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], byte offsets into .bin
    document_indices: np.ndarray  # int64 [D]: 0, then the end (sequence index) of each document

    @property
    def bin_path(self) -> Path:
        return Path(f"{self.prefix}.bin")

    @property
    def idx_path(self) -> Path:
        return Path(f"{self.prefix}.idx")

    @property
    def num_documents(self) -> int:
        return max(0, len(self.document_indices) - 1)

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.astype(np.int64).sum())


def read_index(prefix: str | Path) -> MegatronIndex:
    """Parse and check ``PREFIX.idx`` against ``PREFIX.bin``; DataError naming the file if not."""
    prefix = strip_prefix(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for p in (idx, bin_):
        if not p.is_file():
            raise DataError(f"{p}: missing (a megatron indexed dataset is PREFIX.bin + PREFIX.idx)")
    data = idx.read_bytes()
    head = len(INDEX_HEADER) + 8 + 1 + 8 + 8
    if len(data) < head or data[:len(INDEX_HEADER)] != INDEX_HEADER:
        raise DataError(f"{idx}: not a megatron indexed-dataset index (bad header)")
    version, = struct.unpack_from("<Q", data, 9)
    if version != INDEX_VERSION:
        raise DataError(f"{idx}: index version {version}, only version {INDEX_VERSION} is supported")
    code, = struct.unpack_from("<B", data, 17)
    if code not in DTYPES:
        raise DataError(f"{idx}: unknown token dtype code {code}")
    dtype = np.dtype(DTYPES[code])
    if dtype.kind == "f":
        raise DataError(f"{idx}: token dtype {dtype} is not an integer type")
    n_seq, n_doc = struct.unpack_from("<QQ", data, 18)
    need = head + n_seq * 4 + n_seq * 8 + n_doc * 8
    if len(data) < need:
        raise DataError(f"{idx}: truncated ({len(data)} bytes, the header announces {need})")
    lengths = np.frombuffer(data, np.int32, n_seq, head)
    pointers = np.frombuffer(data, np.int64, n_seq, head + 4 * n_seq)
    docs = np.frombuffer(data, np.int64, n_doc, head + 12 * n_seq)
    if (lengths < 0).any():
        raise DataError(f"{idx}: negative sequence length")
    expected_ptr = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]) * dtype.itemsize if n_seq else pointers
    if not np.array_equal(pointers, expected_ptr):
        raise DataError(f"{idx}: sequence pointers are not contiguous offsets of the sequence lengths")
    if n_doc and (docs[0] != 0 or (np.diff(docs) < 0).any() or docs[-1] != n_seq):
        raise DataError(f"{idx}: document indices must rise from 0 to the sequence count {n_seq}")
    index = MegatronIndex(prefix, dtype, lengths, pointers, docs)
    expected = index.num_tokens * dtype.itemsize
    actual = bin_.stat().st_size
    if actual != expected:
        raise DataError(f"{bin_}: {actual} bytes, but {idx} describes {index.num_tokens} {dtype} tokens = "
                        f"{expected} bytes (truncated, or .bin and .idx from different datasets)")
    return index


def iter_documents(index: MegatronIndex) -> Iterator[np.ndarray]:
    """The tokens of each document (its sequences concatenated), as views of the mapped .bin."""
    if index.num_tokens == 0:
        return
    tokens = np.memmap(index.bin_path, dtype=index.dtype, mode="r")
    starts = index.sequence_pointers // index.dtype.itemsize
    ends = starts + index.sequence_lengths
    for d in range(index.num_documents):
        a, b = int(index.document_indices[d]), int(index.document_indices[d + 1])
        if a == b:
            continue
        yield np.asarray(tokens[int(starts[a]):int(ends[b - 1])])


class IndexWriter:
    """Write ``PREFIX.bin`` / ``PREFIX.idx``, one sequence per document (atomically: temp files,
    renamed when closed)."""

    def __init__(self, prefix: str | Path, dtype: np.dtype):
        self.prefix, self.dtype = strip_prefix(prefix), np.dtype(dtype)
        if self.dtype not in CODES:
            raise ValueError(f"dtype {self.dtype} has no megatron code")
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []

    def add_document(self, tokens: np.ndarray) -> None:
        arr = np.asarray(tokens)
        if len(arr) and (int(arr.max()) > np.iinfo(self.dtype).max or int(arr.min()) < 0):
            raise ValueError(f"token ids outside {self.dtype}")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.lengths.append(len(arr))

    def close(self) -> None:
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64))[:-1]]).astype(np.int64) * self.dtype.itemsize
        docs = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_tmp = Path(f"{self.prefix}.idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<QQ", len(lengths), len(docs)))
            f.write(lengths.tobytes())
            f.write(pointers[:len(lengths)].tobytes())
            f.write(docs.tobytes())
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")


# --- Arrow -> megatron ------------------------------------------------------------------------
def split_documents(dataset_dir: str | Path, split: str) -> Iterator[np.ndarray]:
    """Documents of one split of our dataset: the token stream cut after every EOS (a final
    document without EOS, if any, as it is). Documents may span shards."""
    dataset_dir = Path(dataset_dir)
    meta = read_metadata(dataset_dir)
    if split not in meta["splits"]:
        raise DataError(f"{dataset_dir / 'metadata.json'}: no split {split!r} (has {sorted(meta['splits'])})")
    tok = meta["tokenizer"]
    eos, vocab = tok["eos_id"], tok["vocab_size"]
    dtype = np.dtype(meta["token_dtype"])
    carry: list[np.ndarray] = []
    for entry in meta["splits"][split]["shards"]:
        for arr in open_shard(dataset_dir / entry["file"], entry, dtype, vocab, verify="size"):
            ends = np.flatnonzero(arr == eos)
            start = 0
            for e in ends:
                yield np.concatenate(carry + [arr[start:e + 1]]) if carry else np.array(arr[start:e + 1])
                carry, start = [], e + 1
            if start < len(arr):
                carry.append(np.array(arr[start:]))
    if carry:
        yield np.concatenate(carry)


def export_megatron(dataset_dir: str | Path, out_prefix: str | Path, split: str = "train") -> dict:
    """Write split(s) of our dataset as megatron indexed datasets. ``split="all"`` writes
    ``OUT_train`` and ``OUT_val``; otherwise ``OUT`` itself. Returns {prefix: (documents, tokens)}."""
    dataset_dir, out_prefix = Path(dataset_dir), strip_prefix(out_prefix)
    meta = read_metadata(dataset_dir)
    dtype = megatron_dtype(meta["tokenizer"]["vocab_size"])
    splits = [s for s in SPLITS if s in meta["splits"]] if split == "all" else [split]
    out = {}
    for s in splits:
        prefix = Path(f"{out_prefix}_{s}") if split == "all" else out_prefix
        writer = IndexWriter(prefix, dtype)
        n_tok = 0
        for doc in split_documents(dataset_dir, s):
            writer.add_document(doc)
            n_tok += len(doc)
        writer.close()
        out[str(prefix)] = (len(writer.lengths), n_tok)
    return out


# --- megatron -> Arrow ------------------------------------------------------------------------
def import_megatron(prefixes: Sequence[str | Path], tokenizer_path: str | Path, out_dir: str | Path, *,
                    val_prefixes: Sequence[str | Path] = (), shard_mb: float = 64,
                    description: str | None = None, roles: dict | None = None) -> dict:
    """Megatron indexed datasets -> Arrow shards + metadata.json (+ tokenizer.json) in ``out_dir``.

    ``prefixes`` become the train split, ``val_prefixes`` the val split (documents in order).
    Every token id is checked against ``tokenizer_path``'s vocabulary. Returns the metadata."""
    out_dir = Path(out_dir)
    roles = roles or {}
    tok, _ = open_tokenizer_source(tokenizer_path, roles.get("eos"), roles.get("bos"), roles.get("pad"))
    indexes = {s: [read_index(p) for p in ps] for s, ps in (("train", prefixes), ("val", val_prefixes))}
    if not indexes["train"]:
        raise DataError("import-megatron: no PREFIX given")
    for idx in indexes["train"] + indexes["val"]:  # refuse before writing anything
        if idx.num_tokens:
            tokens = np.memmap(idx.bin_path, dtype=idx.dtype, mode="r")
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= tok.vocab_size:
                bad = hi if hi >= tok.vocab_size else lo
                raise DataError(f"{idx.bin_path}: token id {bad} is outside the vocabulary of {tokenizer_path} "
                                f"(vocab size {tok.vocab_size}); name the tokenizer the dataset was built with")
    tok, dtype, shard_tokens = prepare_dataset_dir(out_dir, tokenizer_path, shard_mb, roles)
    eos = np.array([tok.eos_id], dtype=dtype)
    splits = {}
    for split in SPLITS:
        writer = _SplitWriter(out_dir, split, shard_tokens, dtype)
        for idx in indexes[split]:
            for doc in iter_documents(idx):
                if not len(doc):
                    continue
                doc = doc.astype(dtype)
                writer.add(doc if doc[-1] == tok.eos_id else np.concatenate([doc, eos]), 1)
        splits[split] = writer.close()
    names = [str(i.prefix) for i in indexes["train"] + indexes["val"]]
    meta = build_metadata(tok, splits, description or f"megatron indexed datasets: {', '.join(names)}",
                          megatron_prefixes={s: [str(i.prefix) for i in v] for s, v in indexes.items()})
    write_metadata(out_dir, meta)
    return meta


# --- CLI --------------------------------------------------------------------------------------
def cmd_import_megatron(args) -> None:
    meta = import_megatron(args.prefix, args.tokenizer, args.out, val_prefixes=args.val_prefix or (),
                           shard_mb=args.shard_mb, description=args.description, roles=roles_from_args(args))
    for split, info in meta["splits"].items():
        print(f"{args.out} {split}: {info['num_documents']:,} documents, {info['num_tokens']:,} tokens "
              f"in {len(info['shards'])} shards")


def cmd_export_megatron(args) -> None:
    for prefix, (docs, toks) in export_megatron(args.dataset, args.out, args.split).items():
        print(f"{prefix}.bin/.idx: {docs:,} documents, {toks:,} tokens")


def add_subcommands(sub) -> None:
    s = sub.add_parser("import-megatron", help="megatron indexed datasets (PREFIX.bin/.idx) -> Arrow shards")
    s.add_argument("prefix", nargs="+", help="dataset prefix(es): PREFIX.bin + PREFIX.idx (train split)")
    s.add_argument("--tokenizer", required=True, help="tokenizer the ids were made with: tokenizer.json, a directory, or a tiktoken file (checked, copied)")
    s.add_argument("--out", required=True, help="dataset directory")
    s.add_argument("--val-prefix", action="append", help="prefix for the val split (repeatable)")
    s.add_argument("--shard-mb", type=float, default=64, help="target shard size in MiB")
    s.add_argument("--description", help="source description for metadata.json")
    add_role_arguments(s)
    s.set_defaults(func=cmd_import_megatron)

    s = sub.add_parser("export-megatron", help="Arrow shards -> megatron indexed dataset (PREFIX.bin/.idx)")
    s.add_argument("dataset", help="dataset directory (metadata.json + shards)")
    s.add_argument("--out", required=True, help="output prefix (writes PREFIX.bin + PREFIX.idx)")
    s.add_argument("--split", default="train", choices=["train", "val", "all"],
                   help="split to export; all writes PREFIX_train and PREFIX_val")
    s.set_defaults(func=cmd_export_megatron)
