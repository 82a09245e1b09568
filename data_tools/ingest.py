"""`tokenize --input`: many input files -> one tokenized dataset, in parallel, resumable, optionally
deduplicated, optionally one partition of a multi-machine run.

Two phases, both deterministic:
  1. tokenize: each unit (see sources.py) is tokenized by one worker process into
     OUT/.tokenize-work/unit-NNNNNN.{tokens,docs.npy} (its documents' tokens each + EOS, and per
     document: length, split, content hash); a `.done` marker, written last, makes it final. A
     restarted run (same command) skips units that are done.
  2. assemble: the units, in input order, are cut into shards exactly as `tokenize_to_dataset`
     does (dropping exact duplicates first when asked: an on-disk SQLite set of content hashes,
     so memory stays bounded); metadata.json is written last and the work directory removed.
Shards depend only on the inputs and settings, never on the number of workers or on
interruptions: a killed run, restarted, yields byte-identical shards.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import time
from array import array
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mtp_pretrain.data.errors import DataError
from mtp_pretrain.data.shards import SPLITS, build_metadata, write_metadata
from mtp_pretrain.data.tokenizer import TOKENIZER_FILE, load_tokenizer

from .sources import Unit, expand_inputs, iter_texts
from .tokenize_corpus import _SplitWriter, is_validation, prepare_dataset_dir

WORK_DIR = ".tokenize-work"
BATCH_BYTES = 1 << 20  # texts handed to encode_batch at once
ASSEMBLE_TOKENS = 1 << 24  # tokens routed to the split writers at once

_worker: dict = {}


def partition_units(units: list[Unit], num_partitions: int, partition: int) -> list[Unit]:
    """Partition i of N: a contiguous run of the units, so partitions merged in order are the
    single run's unit order."""
    if num_partitions < 1 or not 0 <= partition < num_partitions:
        raise DataError(f"--partition {partition} must be in [0, --num-partitions {num_partitions})")
    n = len(units)
    return units[partition * n // num_partitions:(partition + 1) * n // num_partitions]


def _init_worker(tokenizer_path: str, counter) -> None:
    # One process = one core: the Rust tokenizer must not start its own thread pool as well.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["tok"] = load_tokenizer(tokenizer_path)
    _worker["counter"] = counter


def _report(n: int) -> None:
    counter = _worker["counter"]
    with counter.get_lock():
        counter.value += n


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM; Linux), None where /proc is absent. Unlike
    ru_maxrss it is not inflated by the parent's pages a spawned worker had before its exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _tokenize_unit(job: tuple[int, dict, str, float, str]) -> float | None:
    """Tokenize one unit into the work directory; returns the worker's peak memory so far."""
    index, unit_json, text_field, val_fraction, work = job
    unit, tok = Unit(**unit_json), _worker["tok"]
    stem = Path(work) / f"unit-{index:06d}"
    reported = 0

    def report(n: int) -> None:
        nonlocal reported
        reported += n
        _report(n)

    # Per document 25 bytes (not Python objects): a unit of millions of documents stays small.
    lengths, val, digests = array("q"), bytearray(), bytearray()
    eos = np.array([tok.eos_id], dtype=np.uint32)
    with open(f"{stem}.tokens.tmp", "wb") as out:
        def flush(texts: list[str]) -> None:
            for text, ids in zip(texts, tok.encode_batch(texts)):
                out.write(np.concatenate([np.asarray(ids, dtype=np.uint32), eos]).tobytes())
                lengths.append(len(ids) + 1)
                val.append(is_validation(text, val_fraction))
                digests.extend(hashlib.sha256(text.encode("utf-8")).digest()[:16])

        texts, size = [], 0
        for text in iter_texts(unit, text_field, report):
            texts.append(text)
            size += len(text)
            if size >= BATCH_BYTES:
                flush(texts)
                texts, size = [], 0
        if texts:
            flush(texts)
    docs = np.zeros(len(lengths), dtype=[("length", "<i8"), ("val", "?"), ("digest", "S16")])
    docs["length"] = np.frombuffer(lengths, dtype=np.int64)
    docs["val"] = np.frombuffer(val, dtype=np.bool_)
    docs["digest"] = np.frombuffer(digests, dtype="S16")
    with open(f"{stem}.docs.tmp", "wb") as f:
        np.save(f, docs)
    os.replace(f"{stem}.tokens.tmp", f"{stem}.tokens")
    os.replace(f"{stem}.docs.tmp", f"{stem}.docs.npy")
    Path(f"{stem}.done").touch()
    _report(unit.size - reported)  # progress ends at the unit's size whatever the reader counted
    return peak_rss_mb()


def _prepare_work_dir(work: Path, plan: dict) -> None:
    """Keep finished units only when the command is the same (same units, settings, tokenizer)."""
    plan_path = work / "plan.json"
    if plan_path.is_file() and json.loads(plan_path.read_text()) == plan:
        return
    if work.exists():
        print(f"{work}: made by a different command; starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    plan_path.write_text(json.dumps(plan, indent=1) + "\n")


def _assemble(out_dir: Path, work: Path, n_units: int, dtype: np.dtype, shard_tokens: int, dedup: bool) -> tuple[dict, int]:
    writers = {s: _SplitWriter(out_dir, s, shard_tokens, dtype) for s in SPLITS}
    seen = None
    if dedup:
        db_path = work / "dedup.sqlite"
        db_path.unlink(missing_ok=True)  # rebuilt by every assembly: the result depends on the inputs only
        seen = sqlite3.connect(db_path)
        seen.execute("PRAGMA journal_mode=OFF")
        seen.execute("PRAGMA synchronous=OFF")
        seen.execute("PRAGMA cache_size=-65536")  # 64 MiB of pages: bounded memory whatever the corpus size
        seen.execute("CREATE TABLE seen (h BLOB PRIMARY KEY) WITHOUT ROWID")
    duplicates = 0
    for index in tqdm(range(n_units), desc="assemble", unit="unit", mininterval=1.0):
        stem = work / f"unit-{index:06d}"
        docs = np.load(f"{stem}.docs.npy")
        tokens = np.memmap(f"{stem}.tokens", dtype=np.uint32, mode="r") if docs["length"].sum() else np.empty(0, np.uint32)
        keep = np.ones(len(docs), dtype=bool)
        if seen is not None:
            for k, digest in enumerate(docs["digest"]):
                keep[k] = seen.execute("INSERT OR IGNORE INTO seen VALUES (?)", (bytes(digest),)).rowcount == 1
            duplicates += int((~keep).sum())
        ends = np.cumsum(docs["length"])
        start_doc, start_tok = 0, 0
        while start_doc < len(docs):  # route a group of whole documents at a time
            stop_doc = max(start_doc + 1, int(np.searchsorted(ends, start_tok + ASSEMBLE_TOKENS, side="right")))
            stop_tok = int(ends[stop_doc - 1])
            group = tokens[start_tok:stop_tok]
            lengths = docs["length"][start_doc:stop_doc]
            for split in SPLITS:
                chosen = keep[start_doc:stop_doc] & (docs["val"][start_doc:stop_doc] == (split == "val"))
                writers[split].add(group[np.repeat(chosen, lengths)].astype(dtype), int(chosen.sum()))
            start_doc, start_tok = stop_doc, stop_tok
        del tokens
    if seen is not None:
        seen.close()
    return {s: w.close() for s, w in writers.items()}, duplicates


def tokenize_inputs(inputs: list[str], tokenizer, out_dir: str | Path, *, text_field: str = "text", workers: int = 1,
                    shard_mb: float = 64, val_fraction: float = 0.01, dedup: bool = False, num_partitions: int = 1,
                    partition: int = 0, roles: dict | None = None, description: str | None = None) -> dict:
    """Tokenize every unit of ``inputs`` (this partition's share) into the dataset ``out_dir``.
    Returns its metadata. Rerunning the same command after a crash resumes it."""
    out_dir = Path(out_dir)
    all_units = expand_inputs(inputs)
    units = partition_units(all_units, num_partitions, partition)
    tok, dtype, shard_tokens = prepare_dataset_dir(out_dir, tokenizer, shard_mb, roles)
    work = out_dir / WORK_DIR
    _prepare_work_dir(work, {"units": [u.to_json() for u in units], "text_field": text_field, "val_fraction": val_fraction,
                             "tokenizer": tok.hash, "eos_id": tok.eos_id})
    done = {i for i in range(len(units)) if (work / f"unit-{i:06d}.done").is_file()}
    todo = [i for i in range(len(units)) if i not in done]
    total = sum(u.size for u in units)
    skipped = sum(units[i].size for i in done)
    if done:
        print(f"resuming: {len(done)} of {len(units)} inputs already tokenized ({skipped / 2**20:.1f} MiB)")
    counter = mp.get_context("spawn").Value("q", 0)
    jobs = [(i, units[i].to_json(), text_field, val_fraction, str(work)) for i in todo]
    bar = tqdm(total=total, initial=skipped, unit="B", unit_scale=True, desc=f"tokenize {out_dir.name}",
               mininterval=1.0, smoothing=0.1)
    t0 = time.perf_counter()
    peaks: list[float] = []
    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(str(out_dir / TOKENIZER_FILE), counter)
            for job in jobs:
                peaks.append(_tokenize_unit(job))
                bar.update(skipped + counter.value - bar.n)
        else:
            with mp.get_context("spawn").Pool(workers, _init_worker, (str(out_dir / TOKENIZER_FILE), counter)) as pool:
                results = pool.imap_unordered(_tokenize_unit, jobs)
                finished = 0
                while finished < len(jobs):
                    try:
                        peaks.append(results.next(timeout=0.5))
                        finished += 1
                    except mp.TimeoutError:
                        pass
                    bar.update(skipped + counter.value - bar.n)  # bytes read so far, inside units too
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    splits, duplicates = _assemble(out_dir, work, len(units), dtype, shard_tokens, dedup)
    extra = {"input_bytes": total, "num_inputs": len(units), "tokenize_seconds": round(seconds, 3), "workers": workers,
             "val_fraction": val_fraction, "text_field": text_field,
             "worker_peak_rss_mb": max((p for p in peaks if p is not None), default=None)}
    if dedup:
        extra["duplicates_removed"] = duplicates
    if num_partitions > 1:
        extra["partition"] = {"index": partition, "count": num_partitions, "num_inputs_total": len(all_units)}
    meta = build_metadata(tok, splits, description or f"tokenize --input {' '.join(inputs)}", **extra)
    write_metadata(out_dir, meta)
    shutil.rmtree(work)
    return meta


def merge_partitions(parts: list[str | Path], out_dir: str | Path) -> dict:
    """Join partition datasets (`tokenize --num-partitions N --partition i`) into one: shards are
    copied in partition order and renumbered; their checksums are kept (and verified)."""
    from mtp_pretrain.data.shards import read_metadata, sha256_file, split_summary

    parts = [Path(p) for p in parts]
    metas = [read_metadata(p) for p in parts]
    info = [m.get("partition") for m in metas]
    if all(i is not None for i in info):
        counts = {i["count"] for i in info}
        order = sorted(range(len(parts)), key=lambda k: info[k]["index"])
        indices = [info[k]["index"] for k in order]
        if len(counts) != 1 or indices != list(range(counts.pop())):
            raise DataError(f"merge: partitions {indices} of {sorted({i['count'] for i in info})} given; "
                            "expected each partition 0..N-1 exactly once")
        parts, metas = [parts[k] for k in order], [metas[k] for k in order]
    first = metas[0]["tokenizer"]
    for p, m in zip(parts[1:], metas[1:]):
        if m["tokenizer"] != first:
            raise DataError(f"{p / 'metadata.json'}: tokenizer {m['tokenizer']['hash']} or its roles differ from "
                            f"{parts[0]}'s; partitions must share one tokenizer")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir}: merge output must be a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (TOKENIZER_FILE, "tokenizer_config.json"):
        if (parts[0] / name).is_file():
            shutil.copyfile(parts[0] / name, out_dir / name)
    splits = {}
    for split in SPLITS:
        shards, ndocs = [], 0
        for p, m in zip(parts, metas):
            ndocs += m["splits"][split]["num_documents"]
            for entry in m["splits"][split]["shards"]:
                target = out_dir / f"{split}-{len(shards):05d}.arrow"
                shutil.copyfile(p / entry["file"], target)
                if sha256_file(target) != entry["sha256"]:
                    raise DataError(f"{p / entry['file']}: SHA-256 differs from its metadata.json (corrupt partition)")
                shards.append({**entry, "file": target.name})
        splits[split] = split_summary(shards, ndocs)
    meta = {k: v for k, v in metas[0].items() if k not in ("partition", "tokenize_seconds", "duplicates_removed")}
    meta.update(splits=splits, source=f"merge of {len(parts)} partitions of: {metas[0]['source']}",
                input_bytes=sum(m.get("input_bytes", 0) for m in metas),
                num_inputs=sum(m.get("num_inputs", 0) for m in metas), merged_from=[str(p) for p in parts])
    if any("duplicates_removed" in m for m in metas):  # exact duplicates within each partition
        meta["duplicates_removed"] = sum(m.get("duplicates_removed", 0) for m in metas)
    write_metadata(out_dir, meta)
    return meta
