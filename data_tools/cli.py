"""Command line of the data pipeline: `python -m data_tools {import,train-tokenizer,tokenize,merge,inspect,build-default}`."""

from __future__ import annotations

import argparse
import os
import sys
from itertools import chain
from pathlib import Path

from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.tokenizer import BPETokenizer, ByteTokenizer

from .corpus import cap_bytes, deduplicate, iter_directory, iter_jsonl, iter_parquet, iter_text_files, read_jsonl, write_jsonl
from .tokenize_corpus import add_role_arguments, roles_from_args


def cmd_import(args) -> None:
    sources = []
    for d in args.dir or []:
        sources.append(iter_directory(d, args.ext, int(args.max_file_kb * 1024)))
    for p in args.jsonl or []:
        sources.append(iter_jsonl(p, args.text_field))
    for p in args.parquet or []:
        sources.append(iter_parquet(p, args.text_field))
    if args.text:
        sources.append(iter_text_files(args.text))
    if not sources:
        sys.exit("import: give at least one of --dir, --jsonl, --parquet, --text")
    max_bytes = int(args.max_mb * 2**20) if args.max_mb else None
    n = write_jsonl(cap_bytes(deduplicate(chain(*sources)), max_bytes), args.out)
    print(f"{args.out}: {n} unique documents")


def cmd_train_tokenizer(args) -> None:
    if args.byte_level:
        tok = ByteTokenizer()
    else:
        max_bytes = int(args.sample_mb * 2**20)
        texts = (d["text"] for d in cap_bytes(read_jsonl(args.docs), max_bytes))
        tok = BPETokenizer.train(texts, args.vocab_size)
    tok.save(Path(args.out))
    print(f"{args.out}: {tok.kind} tokenizer, vocab {tok.vocab_size}, hash {tok.hash}")


def cmd_tokenize(args) -> None:
    from .ingest import tokenize_inputs

    inputs = list(args.input or []) + ([args.docs] if args.docs else [])
    if not inputs:
        sys.exit("tokenize: give at least one --input (file, directory, glob or URL)")
    meta = tokenize_inputs(
        inputs, args.tokenizer, args.out, text_field=args.text_field, workers=args.workers, shard_mb=args.shard_mb,
        val_fraction=args.val_fraction, dedup=args.dedup, num_partitions=args.num_partitions,
        partition=args.partition, roles=roles_from_args(args), description=args.description,
    )
    for split, info in meta["splits"].items():
        print(f"{args.out} {split}: {info['num_documents']:,} documents, {info['num_tokens']:,} tokens "
              f"in {len(info['shards'])} shards")
    if "duplicates_removed" in meta:
        print(f"{args.out}: {meta['duplicates_removed']:,} exact duplicates removed")


def cmd_merge(args) -> None:
    from .ingest import merge_partitions

    meta = merge_partitions(args.parts, args.out)
    for split, info in meta["splits"].items():
        print(f"{args.out} {split}: {info['num_documents']:,} documents, {info['num_tokens']:,} tokens "
              f"in {len(info['shards'])} shards")


def cmd_inspect(args) -> None:
    from .inspect_dataset import inspect_dataset

    if inspect_dataset(args.dataset, verify=not args.no_verify, sample_tokens=args.sample_tokens):
        sys.exit(1)


def cmd_build_default(args) -> None:
    from .build_default import build_default

    build_default(args.out, max_mb=args.max_mb, vocab_size=args.vocab_size, sample_mb=args.sample_mb,
                  shard_mb=args.shard_mb, val_fraction=args.val_fraction, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description="Tokenized Arrow data pipeline for mtp_pretrain.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("import", help="read raw sources into a deduplicated documents JSONL file")
    s.add_argument("--dir", action="append", help="directory tree of source files (repeatable)")
    s.add_argument("--ext", action="append", help="keep only these extensions under --dir, e.g. --ext .py (repeatable)")
    s.add_argument("--max-file-kb", type=float, default=1024, help="skip files larger than this (default 1024)")
    s.add_argument("--jsonl", action="append", help="JSONL file with a text field (repeatable)")
    s.add_argument("--parquet", action="append", help="Parquet file with a text column (repeatable)")
    s.add_argument("--text", nargs="+", help="plain text files, one document each")
    s.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    s.add_argument("--max-mb", type=float, default=None, help="stop after this many MiB of text")
    s.add_argument("--out", required=True, help="output documents JSONL")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("train-tokenizer", help="train a byte-level BPE on documents, or write the byte tokenizer")
    s.add_argument("--docs", help="documents JSONL (from `import`)")
    s.add_argument("--vocab-size", type=int, default=8192)
    s.add_argument("--sample-mb", type=float, default=8, help="train on at most this many MiB of text")
    s.add_argument("--byte-level", action="store_true", help="the 256-byte tokenizer (+ PAD/BOS/EOS), no training")
    s.add_argument("--out", required=True, help="tokenizer.json to write")
    s.set_defaults(func=cmd_train_tokenizer)

    s = sub.add_parser("tokenize", help="inputs (files, dirs, globs, URLs) -> Arrow shards + metadata.json; resumable")
    s.add_argument("--input", action="append",
                   help="file, directory, glob or fsspec URL of JSONL / Parquet / text (.gz .zst .bz2 .xz) or a "
                        "save_to_disk directory (repeatable)")
    s.add_argument("--docs", help="documents JSONL (from `import`); same as --input")
    s.add_argument("--text-field", default="text", help="JSONL field / Parquet or Arrow column holding the text")
    s.add_argument("--tokenizer", required=True,
                   help="tokenizer.json, a directory holding one (Hugging Face), or a tiktoken BPE file (copied beside the shards)")
    add_role_arguments(s)
    s.add_argument("--out", required=True, help="dataset directory")
    s.add_argument("--shard-mb", type=float, default=64, help="target shard size in MiB")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    s.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (by document hash)")
    s.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (bounded memory, on disk)")
    s.add_argument("--num-partitions", type=int, default=1, help="split the inputs into N partitions (one per machine)")
    s.add_argument("--partition", type=int, default=0, help="which partition this run tokenizes (0..N-1)")
    s.add_argument("--description", help="source description for metadata.json")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("merge", help="join partition datasets (tokenize --num-partitions) into one dataset")
    s.add_argument("parts", nargs="+", help="partition dataset directories")
    s.add_argument("--out", required=True, help="merged dataset directory (new or empty)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("inspect", help="print metadata, token counts and a decoded sample; verify checksums")
    s.add_argument("dataset")
    s.add_argument("--no-verify", action="store_true", help="check sizes only, skip SHA-256 of every shard")
    s.add_argument("--sample-tokens", type=int, default=200)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("build-default", help="build the default code+text corpus (idempotent)")
    s.add_argument("--out", required=True)
    s.add_argument("--max-mb", type=float, default=32, help="cap on raw text per corpus, MiB (default 32)")
    s.add_argument("--vocab-size", type=int, default=8192)
    s.add_argument("--sample-mb", type=float, default=8, help="tokenizer training sample, MiB")
    s.add_argument("--shard-mb", type=float, default=64)
    s.add_argument("--val-fraction", type=float, default=0.02)
    s.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    s.set_defaults(func=cmd_build_default)

    from .megatron import add_subcommands as add_megatron_subcommands

    add_megatron_subcommands(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DataError as e:
        sys.exit(f"error: {e}")
