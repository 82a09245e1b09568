"""Heads-only training (``train.freeze=trunk``) against full training: step time and peak memory.

Both variants: the ``small`` model (mtp_pretrain/conf/model/small.yaml, n_future=4, transformer heads), the
head-sequential loss, AdamW built as the trainer builds it (parameters that require grad only),
one optimizer step per training step; heads-only freezes embeddings, trunk, head 1 and the
unembedding exactly as the trainer does (``mtp_pretrain.train.freeze_next_token_path``).

Time: one process holds both models and alternates their steps (order flipped every pair), so
load from other processes on a shared machine hits both alike; the ratio is the median of the
per-pair ratios heads-only / full, after --warmup pairs.

Memory: one fresh child process per variant (a process's peak resident set cannot be split
between two models). The child builds model, optimizer and batch, reads its RSS (baseline),
resets the kernel's high-water mark (/proc/self/clear_refs) and runs two training steps (the
first creates the optimizer state); ``step_delta`` = peak RSS - baseline is what training adds
(gradients, optimizer state, activations). On CUDA (--device cuda): max_memory_allocated after
reset_peak_memory_stats instead.

    python -m bench.heads_only                    # the documented run (small, seq 256, batch 4)
    python -m bench.heads_only --seq 64 --pairs 2 --warmup 1   # a quick smoke run

The last line printed is one JSON object: time_ratio and mem_ratio (heads-only / full, < 1 means
heads-only is cheaper), and details.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench.common import (MiB, add_result_file_arg, launch, print_result, proc_status_bytes, reset_peak_rss,
                          write_result)

VARIANTS = ("full", "heads_only")


def build(variant: str, args):
    import torch

    from mtp_pretrain.config import OptimConfig
    from mtp_pretrain.model.config import model_config
    from mtp_pretrain.model.transformer import MTPTransformer
    from mtp_pretrain.optim import build_adamw
    from mtp_pretrain.train import freeze_next_token_path

    torch.manual_seed(0)
    model = MTPTransformer(model_config(args.model, max_seq_len=max(args.seq, 64))).to(args.device)
    if variant == "heads_only":
        freeze_next_token_path(model)
    return model, build_adamw(model, OptimConfig())


def make_step(model, optimizer, args):
    import torch

    from mtp_pretrain.loss import head_sequential_loss

    n = model.n_future
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.batch, args.seq + n), generator=gen).to(args.device)

    def step() -> float:
        out = head_sequential_loss(model, tokens, seq_len=args.seq)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return float(out.loss)

    return step


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model, optimizer = build(args.child, args)
    step = make_step(model, optimizer, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(), step()
        peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
    else:
        base = proc_status_bytes("VmRSS")
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs)")
        step(), step()
        peak, kind = proc_status_bytes("VmHWM"), "cpu VmHWM (reset before the steps)"
    state = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
    return {"variant": args.child, "trainable_params": trainable, "optimizer_state_elems": state,
            "base_mib": base / MiB, "peak_mib": peak / MiB, "step_delta_mib": (peak - base) / MiB,
            "mem_kind": kind}


def timing(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    steps = {}
    for v in VARIANTS:
        model, optimizer = build(v, args)
        steps[v] = make_step(model, optimizer, args)
    times = {v: [] for v in VARIANTS}
    total = args.warmup + args.pairs
    t_start = time.perf_counter()
    for k in range(total):
        order = VARIANTS if k % 2 == 0 else VARIANTS[::-1]
        for v in order:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
        done = time.perf_counter() - t_start
        print(f"  pair {k + 1}/{total}: full {times['full'][-1]:.2f}s heads_only {times['heads_only'][-1]:.2f}s "
              f"(eta {done / (k + 1) * (total - k - 1):.0f}s)", flush=True)
    kept = {v: t[args.warmup:] for v, t in times.items()}
    ratios = [h / f for f, h in zip(kept["full"], kept["heads_only"])]
    return {"time_ratio": statistics.median(ratios),
            "full_step_s": statistics.median(kept["full"]), "heads_only_step_s": statistics.median(kept["heads_only"]),
            "pair_ratios": [round(r, 4) for r in ratios]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pairs", type=int, default=6, help="timed step pairs (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    add_result_file_arg(p)
    args = p.parse_args()
    if args.child:
        return write_result(args.result_file, child(args))

    mem = {}
    for v in VARIANTS:  # each in a fresh process: a process's peak RSS cannot be split between two models
        mem[v] = launch(__spec__.name, ["--child", v, *sys.argv[1:]], threads=None, what=f"heads_only {v}")
        print(f"memory {v}: step delta {mem[v]['step_delta_mib']:.1f} MiB, peak {mem[v]['peak_mib']:.1f} MiB, "
              f"trainable {mem[v]['trainable_params'] / 1e6:.2f}M", flush=True)
    t = timing(args)
    result = {"bench": "heads_only", "model": args.model, "seq": args.seq, "batch": args.batch,
              "threads": args.threads, "device": args.device,
              "time_ratio": round(t["time_ratio"], 4),
              "mem_ratio": round(mem["heads_only"]["step_delta_mib"] / mem["full"]["step_delta_mib"], 4),
              "peak_ratio": round(mem["heads_only"]["peak_mib"] / mem["full"]["peak_mib"], 4),
              "timing": t, "memory": mem}
    print_result(result)


if __name__ == "__main__":
    main()
