"""Data pipeline throughput: tokenization MB/s (1 and 2 worker processes) and loader tokens/s + memory;
`tokenize --input` against the tokenizer's own speed; document-masked vs unmasked training steps.

    .venv/bin/python -m bench.data_throughput [--data-dir data/default] [--loader-gb 1.0]

1. Tokenizes the default corpus's code documents (Python stdlib sources) with the default BPE
   tokenizer, once with 1 and once with 2 worker processes (wall time, process start-up included).
2. Writes a synthetic dataset of >= --loader-gb GB of uint16 shards in a temp dir and streams one
   whole epoch of it through ArrowTokenStream (prefetch 2), measuring tokens/s and memory growth.
   Memory is RssAnon from /proc/self/status: anonymous (heap) pages only. VmRSS is NOT used because
   the file-backed pages of the memory-mapped shards count in VmRSS as they are touched, although
   the kernel can drop them at any time; VmRSS growth is printed beside it for comparison.
3. `tokenize --input` (the file pipeline: read JSONL, encode, write unit files, assemble shards)
   on the same code as JSONL files, with 1 and 2 workers, against the raw `tokenizers`
   `encode_batch` on the same texts in this process, interleaved (raw, 1, 2 workers; best of
   --rounds). Per worker = MB per CPU-second of the whole run (this process + its workers), so
   the ratio is fair on a loaded machine; wall MB/s shows the scaling; peak RSS (VmHWM) of a
   2-worker run's workers, and of this process during the runs (it holds the benchmark's texts).
4. One training step (head-sequential loss, forward + backward) at seq 2048 of a small model on
   windows of ~8 documents, with and without data.document_masking, interleaved; median of
   --mask-steps each.
Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

from bench.common import MiB, print_result, proc_status_bytes, reset_peak_rss
from data_tools import default_corpus
from data_tools.build_default import build_default
from data_tools.corpus import cap_bytes, deduplicate
from data_tools.tokenize_corpus import tokenize_to_dataset
from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.data.synthetic import write_random_dataset


def proc_status_mb(field: str) -> float:
    return proc_status_bytes(field) / MiB


def bench_tokenize(data_dir: Path, max_mb: float, tmp: Path) -> dict[str, float]:
    if not (data_dir / "tokenizer.json").exists():
        build_default(data_dir)
    docs = list(cap_bytes(deduplicate(default_corpus.stdlib_python_sources()), int(max_mb * 2**20)))
    mb = sum(len(d["text"].encode()) for d in docs) / 1e6
    rates, per_cpu_s = {}, {}
    for workers in (1, 2):
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        tokenize_to_dataset(docs, data_dir / "tokenizer.json", tmp / f"tok{workers}", source_description="bench",
                            workers=workers, total_bytes=int(mb * 1e6))
        rates[str(workers)] = mb / (time.perf_counter() - t0)
        per_cpu_s[str(workers)] = mb / (cpu_seconds() - cpu0)
        print(f"tokenize  {mb:6.1f} MB of code, {workers} worker(s): {rates[str(workers)]:6.2f} MB/s wall, "
              f"{per_cpu_s[str(workers)]:.2f} MB per CPU-second", flush=True)
    return rates, per_cpu_s


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the tokenizer workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_loader(tmp: Path, gb: float, window: int, batch: int) -> dict:
    # Imported before the memory baseline: the stream imports torch on its first batch, and torch's
    # own ~130 MB of heap is not growth of the loader. (Not at module level: the tokenizer worker
    # processes, spawned, re-import this module and need no torch.)
    import torch  # noqa: F401

    path = tmp / "synthetic"
    num_tokens = int(gb * 1e9) // 2 + 1  # uint16: 2 bytes a token
    t0 = time.perf_counter()

    def progress(split, done, total):
        if split == "train":
            rate = done / (time.perf_counter() - t0)
            print(f"\r  writing synthetic shards: {2 * done / 1e9:5.2f}/{2 * total / 1e9:.2f} GB "
                  f"({2 * rate / 1e6:.0f} MB/s, ETA {(total - done) / rate:4.0f}s)", end="", flush=True)

    meta = write_random_dataset(path, {"train": num_tokens, "val": 1 << 16}, shard_tokens=32 << 20, doc_len=4000, progress=progress)
    shard_bytes = sum(s["bytes"] for s in meta["splits"]["train"]["shards"])
    print(f"\n  {len(meta['splits']['train']['shards'])} shards, {shard_bytes / 1e9:.2f} GB", flush=True)

    stream = ArrowTokenStream([DataSource(str(path))], window=window, micro_batch_size=batch, rank=0, world_size=1,
                              seed=0, prefetch=2, infinite=False)
    anon0, rss0 = proc_status_mb("RssAnon"), proc_status_mb("VmRSS")
    anon_max, rss_max = anon0, rss0
    tokens, t0, last = 0, time.perf_counter(), time.perf_counter()
    total = stream.datasets[0].num_windows * window
    for i, b in enumerate(stream):
        tokens += b.numel()
        if i % 256 == 0:
            anon_max, rss_max = max(anon_max, proc_status_mb("RssAnon")), max(rss_max, proc_status_mb("VmRSS"))
            if time.perf_counter() - last > 2:
                last, rate = time.perf_counter(), tokens / (time.perf_counter() - t0)
                print(f"\r  streaming: {tokens / total:5.1%}  {rate / 1e6:6.1f} M tokens/s  ETA {(total - tokens) / rate:4.0f}s  "
                      f"RssAnon +{anon_max - anon0:.1f} MB", end="", flush=True)
    seconds = time.perf_counter() - t0
    anon_max, rss_max = max(anon_max, proc_status_mb("RssAnon")), max(rss_max, proc_status_mb("VmRSS"))
    print()
    return {
        "loader_tokens_per_s": tokens / seconds,
        "rss_growth_mb": anon_max - anon0,
        "vmrss_growth_mb": rss_max - rss0,
        "streamed_gb": tokens * 2 / 1e9,
        "shard_gb": shard_bytes / 1e9,
    }


def bench_ingest(data_dir: Path, max_mb: float, tmp: Path, rounds: int) -> dict:
    """`tokenize --input` per worker as a ratio to the raw tokenizers encode_batch, same texts."""
    from data_tools.ingest import tokenize_inputs
    from mtp_pretrain.data.tokenizer import load_tokenizer

    docs = [d["text"] for d in cap_bytes(deduplicate(default_corpus.stdlib_python_sources()), int(max_mb * 2**20))]
    mb = sum(len(t.encode()) for t in docs) / 1e6
    inputs = tmp / "ingest_in"
    inputs.mkdir()
    per_file = max(1, len(docs) // 16)  # 16 input files: both workers stay busy to the end
    for k in range(0, len(docs), per_file):
        (inputs / f"part-{k // per_file:03d}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[k:k + per_file]))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # raw baseline: one thread, as one worker
    raw = load_tokenizer(data_dir / "tokenizer.json")._tok
    best = {"raw": 0.0, "1": 0.0, "2": 0.0}
    wall = {"1": 0.0, "2": 0.0}
    worker_peak, main_peak = 0.0, 0.0
    for r in range(rounds):
        cpu0 = cpu_seconds()
        for k in range(0, len(docs), 256):
            raw.encode_batch(docs[k:k + 256], add_special_tokens=False)
        best["raw"] = max(best["raw"], mb / (cpu_seconds() - cpu0))
        for workers in (1, 2):
            if not reset_peak_rss():
                raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            meta = tokenize_inputs([str(inputs)], data_dir / "tokenizer.json", tmp / f"ingest{workers}-{r}", workers=workers)
            main_peak = max(main_peak, proc_status_mb("VmHWM"))
            if workers > 1:
                worker_peak = max(worker_peak, meta["worker_peak_rss_mb"])
            best[str(workers)] = max(best[str(workers)], mb / (cpu_seconds() - cpu0))
            wall[str(workers)] = max(wall[str(workers)], mb / (time.perf_counter() - t0))
        print(f"ingest round {r}: raw encode_batch {best['raw']:.2f} MB/CPU-s; tokenize --input "
              f"1 worker {best['1']:.2f}, 2 workers {best['2']:.2f} MB/CPU-s (best so far)", flush=True)
    return {
        "ingest_mb": round(mb, 2),
        "raw_encode_batch_mb_per_cpu_s": best["raw"],
        "ingest_mb_per_cpu_s": {w: best[w] for w in ("1", "2")},
        "ingest_ratio_per_worker": {w: best[w] / best["raw"] for w in ("1", "2")},
        "ingest_mb_per_s_wall": wall,
        "ingest_peak_rss_mb_worker": worker_peak,
        "ingest_peak_rss_mb_main": main_peak,
    }


def bench_document_masking(seq_len: int, docs_per_window: int, steps: int) -> dict:
    """Step time with document masking over step time without, same model and batch, interleaved."""
    import statistics

    import torch

    from mtp_pretrain.loss import head_sequential_loss
    from mtp_pretrain.model import ModelConfig, MTPTransformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_future=2, max_seq_len=seq_len)
    model = MTPTransformer(cfg)
    eos = 2
    tokens = torch.randint(3, cfg.vocab_size, (1, seq_len + cfg.n_future))
    doc_len = seq_len // docs_per_window
    tokens[:, doc_len - 1::doc_len] = eos
    times = {"masked": [], "unmasked": []}
    for k in range(steps + 1):
        for name, end_id in (("masked", eos), ("unmasked", None)):
            t0 = time.perf_counter()
            head_sequential_loss(model, tokens, seq_len=seq_len, document_end_id=end_id)
            model.zero_grad(set_to_none=True)
            if k:  # the first round warms up
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"step at seq {seq_len}, {docs_per_window} documents/window: masked {med['masked'] * 1e3:.0f} ms, "
          f"unmasked {med['unmasked'] * 1e3:.0f} ms, ratio {med['masked'] / med['unmasked']:.3f}", flush=True)
    return {"masked_step_s": med["masked"], "unmasked_step_s": med["unmasked"],
            "masked_over_unmasked": med["masked"] / med["unmasked"], "mask_seq_len": seq_len,
            "docs_per_window": (tokens[0, :seq_len] == eos).sum().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data/default", help="default corpus (built there if absent)")
    p.add_argument("--tokenize-mb", type=float, default=16, help="MiB of code to tokenize per measurement")
    p.add_argument("--loader-gb", type=float, default=1.0, help="size of the synthetic dataset to stream")
    p.add_argument("--window", type=int, default=2049, help="tokens per sample (seq_len + n_future)")
    p.add_argument("--batch", type=int, default=8, help="micro batch size")
    p.add_argument("--ingest-mb", type=float, default=8, help="MiB of code for tokenize --input vs raw encode_batch")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the ingest comparison (best kept)")
    p.add_argument("--mask-steps", type=int, default=3, help="timed steps per variant of the masking comparison")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        tok_rates, tok_per_cpu_s = bench_tokenize(Path(args.data_dir), args.tokenize_mb, Path(tmp))
        ingest = bench_ingest(Path(args.data_dir), args.ingest_mb, Path(tmp), args.rounds)
        loader = bench_loader(Path(tmp), args.loader_gb, args.window, args.batch)
    masking = bench_document_masking(2048, 8, args.mask_steps)

    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine)")
    print("\n| measurement | value |\n| --- | --- |")
    for w, r in tok_rates.items():
        print(f"| tokenize (BPE 8192, code), {w} worker process(es) | {r:.2f} MB/s wall, {tok_per_cpu_s[w]:.2f} MB/CPU-s |")
    print(f"| loader, 1 rank, prefetch 2, window {args.window}, batch {args.batch} | {loader['loader_tokens_per_s'] / 1e6:.1f} M tokens/s |")
    print(f"| streamed | {loader['streamed_gb']:.2f} GB of {loader['shard_gb']:.2f} GB of shards |")
    print(f"| memory growth, RssAnon (heap only) | {loader['rss_growth_mb']:.1f} MB |")
    print(f"| memory growth, VmRSS (includes mapped file pages; not a leak) | {loader['vmrss_growth_mb']:.1f} MB |")
    print(f"| raw tokenizers encode_batch, 1 thread | {ingest['raw_encode_batch_mb_per_cpu_s']:.2f} MB/CPU-s |")
    for w in ("1", "2"):
        print(f"| tokenize --input, {w} worker(s) | {ingest['ingest_mb_per_cpu_s'][w]:.2f} MB/CPU-s = "
              f"{ingest['ingest_ratio_per_worker'][w]:.2f} x raw per worker (floor 0.8); {ingest['ingest_mb_per_s_wall'][w]:.2f} MB/s wall |")
    print(f"| tokenize --input peak RSS | workers {ingest['ingest_peak_rss_mb_worker']:.0f} MB, main {ingest['ingest_peak_rss_mb_main']:.0f} MB |")
    print(f"| step time masked / unmasked, seq 2048, {masking['docs_per_window']} docs/window | "
          f"{masking['masked_over_unmasked']:.3f} (ceiling 1.5) |")
    rounded = {k: (round(v, 3) if isinstance(v, float) else {kk: round(vv, 3) for kk, vv in v.items()} if isinstance(v, dict) else v)
               for k, v in {**ingest, **masking}.items()}
    print_result({"tokenize_mb_per_s": {k: round(v, 3) for k, v in tok_rates.items()},
                  "tokenize_mb_per_cpu_s": {k: round(v, 3) for k, v in tok_per_cpu_s.items()}, **rounded,
                  **{k: round(v, 3) for k, v in loader.items()}, "window": args.window, "batch": args.batch,
                  "cpus": os.cpu_count(), "load_avg_1min_at_end": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
