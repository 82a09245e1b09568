"""Peak memory and step time of one forward+backward of the multi-token loss.

Configurations (one fresh child process each, so that peak RSS belongs to one configuration):

    ntp          n_future=1, the plain next-token loss (naive_loss with one head)
    naive        n_future=4, all heads forward, one backward (all logits alive at once)
    hs           n_future=4, head-sequential (paper Fig. 2): one head's logits alive at a time
    hs_chunked   n_future=4, head-sequential + fused chunked linear cross-entropy

Memory. CPU: resident set size. In the child, after building model + batch and one warm-up
step, gradients are dropped (zero_grad(set_to_none=True), as a training step does after the
optimizer), the current RSS is read (the *baseline*: weights, batch, allocator warm state), the
kernel's RSS high-water mark is reset (/proc/self/clear_refs, "5") and the step runs; the peak is
``getrusage(RUSAGE_SELF).ru_maxrss`` after it. The figure the ratios use is the *step delta*,
peak - baseline: the memory the step itself costs (activations, logits, gradients). Absolute
peaks are reported too; they include the ~constant weights and interpreter. If clear_refs is not
available the baseline is taken before the warm-up step and the peak is the process maximum.
CUDA (when available, --device cuda): torch.cuda.max_memory_allocated after
reset_peak_memory_stats, minus memory_allocated before the step.

Time: median over the timed steps of all children of a configuration; the configurations are
run interleaved (round-robin, --rounds times) so that load from other processes on a shared
machine affects them alike.

    python -m bench.loss_memory                 # the documented run (vocab 32768, seq 2048, batch 4)
    python -m bench.loss_memory --vocab 4096 --seq 256 --steps 1 --rounds 1   # a quick smoke run

The last line printed is one JSON object with the ratios and the floors' verdicts.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import statistics
import sys
import time
from typing import Optional

from bench.common import (MiB, add_result_file_arg, launch, print_result, proc_status_bytes, reset_peak_rss,
                          write_result)

CONFIGS = {
    "ntp": dict(n_future=1, impl="naive", chunk=False),
    "naive": dict(n_future=4, impl="naive", chunk=False),
    "hs": dict(n_future=4, impl="head_sequential", chunk=False),
    "hs_chunked": dict(n_future=4, impl="head_sequential", chunk=True),
}

FLOORS = {  # name: (ratio, comparison, bound)
    "mem_ratio_hs_vs_ntp": ("<=", 1.15),
    "mem_ratio_naive_vs_ntp": (">=", 1.8),
    "time_ratio_hs_vs_naive": ("<=", 1.05),
    "mem_ratio_chunked_vs_hs": ("<=", 0.6),
}


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def child(args) -> dict:
    import torch

    from mtp_pretrain.loss import head_sequential_loss, naive_loss
    from mtp_pretrain.model.config import ModelConfig
    from mtp_pretrain.model.transformer import MTPTransformer

    spec = CONFIGS[args.child]
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.n_heads,
                      n_future=spec["n_future"], head_type="transformer", max_seq_len=args.seq)
    model = MTPTransformer(cfg).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + spec["n_future"]), device=device)
    fn = head_sequential_loss if spec["impl"] == "head_sequential" else naive_loss
    chunk = args.chunk if spec["chunk"] else 0

    def step():
        model.zero_grad(set_to_none=True)
        return fn(model, tokens, seq_len=args.seq, chunk_size=chunk)

    def timed(fn_):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn_()
        if cuda:
            torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    gc.collect()
    pre_warmup_rss = proc_status_bytes("VmRSS")
    step()  # warm-up: allocator, thread pools, first-touch of everything
    model.zero_grad(set_to_none=True)
    gc.collect()
    out = {"config": args.child, "params": sum(p.numel() for p in model.parameters())}
    # -- the measured step
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        res, mem_step_time = timed(step)
        out.update(mem_kind="cuda max_memory_allocated", base=base, peak=torch.cuda.max_memory_allocated())
    else:
        base = proc_status_bytes("VmRSS")
        if reset_peak_rss():
            res, mem_step_time = timed(step)
            out.update(mem_kind="cpu ru_maxrss (hiwater reset before the step)", base=base, peak=max_rss())
        else:
            res, mem_step_time = timed(step)
            out.update(mem_kind="cpu ru_maxrss (process lifetime, baseline before warm-up)",
                       base=pre_warmup_rss, peak=max_rss())
    out["delta"] = out["peak"] - out["base"]
    # -- timed steps: the measured step above is the first; args.steps - 1 more
    times = [mem_step_time]
    for _ in range(args.steps - 1):
        times.append(timed(step)[1])
    out["times"] = times
    out["loss"] = float(res.loss)
    return out


def paired_child(args) -> dict:
    """Time naive vs head-sequential on one n=4 model, alternating step by step (order flipped
    each pair), so that load from other processes hits both alike; median of per-pair ratios."""
    import torch

    from mtp_pretrain.loss import head_sequential_loss, naive_loss
    from mtp_pretrain.model.config import ModelConfig
    from mtp_pretrain.model.transformer import MTPTransformer

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.n_heads,
                      n_future=4, head_type="transformer", max_seq_len=args.seq)
    model = MTPTransformer(cfg).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 4), device=device)
    fns = {"naive": naive_loss, "hs": head_sequential_loss}

    def timed(name):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fns[name](model, tokens, seq_len=args.seq)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed("naive"), timed("hs")  # warm-up
    times = {"naive": [], "hs": []}
    ratios = []
    for k in range(args.pairs):
        order = ("naive", "hs") if k % 2 == 0 else ("hs", "naive")
        t = {name: timed(name) for name in order}
        for name in t:
            times[name].append(t[name])
        ratios.append(t["hs"] / t["naive"])
    return {"config": "paired", "times": times, "ratios": ratios}


def run_child(name: str, args) -> dict:
    """One configuration (or the paired timing) in a fresh process of this module."""
    flags = ["--child", name]
    for k in ("vocab", "seq", "batch", "dim", "layers", "n_heads", "chunk", "steps", "pairs", "threads", "device"):
        flags += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = {}
    if not args.glibc_default:
        # Fixed (not dynamic) glibc thresholds: every allocation of 1 MiB or more is its own mmap,
        # unmapped when freed, and freed heap is trimmed. RSS then follows live tensors instead of
        # what the allocator kept from the warm-up step (which would hide activations in the
        # baseline). Same setting for every configuration.
        env = {k: os.environ.get(k, str(MiB)) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    return launch(__spec__.name, flags, threads=None, env=env, what=f"loss_memory {name}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2, help="trunk blocks (each head adds one block)")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per chunk for hs_chunked")
    p.add_argument("--steps", type=int, default=1,
                   help="timed steps per configuration child after the warm-up (the first is the memory step)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of all configurations")
    p.add_argument("--pairs", type=int, default=2,
                   help="naive/head-sequential step pairs timed alternately in one process (0 = skip; the "
                        "time ratio then comes from the per-configuration children)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0 = default)")
    p.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--glibc-default", action="store_true",
                   help="keep glibc's dynamic malloc thresholds in the children (RSS then includes "
                        "whatever the allocator retains between steps)")
    p.add_argument("--child", choices=sorted(CONFIGS) + ["paired"], help=argparse.SUPPRESS)
    add_result_file_arg(p)
    return p.parse_args(argv)


def run_rounds(args, names: list[str]) -> dict[str, list[dict]]:
    """Every configuration once per round, interleaved, each in its own process."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            res = run_child(n, args)
            runs[n].append(res)
            print(f"  round {r + 1} {n:<11} base {res['base'] / MiB:8.0f} MiB  peak {res['peak'] / MiB:8.0f} MiB  "
                  f"delta {res['delta'] / MiB:8.0f} MiB  steps {', '.join(f'{t:.2f}' for t in res['times'])} s",
                  flush=True)
    return runs


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per configuration: the largest peak and step delta over the rounds, the median baseline and step time."""
    return {n: dict(peak=max(x["peak"] for x in rs), base=statistics.median(x["base"] for x in rs),
                    delta=max(x["delta"] for x in rs), time=statistics.median(t for x in rs for t in x["times"]),
                    params=rs[0]["params"], mem_kind=rs[0]["mem_kind"])
            for n, rs in runs.items()}


def print_table(summary: dict[str, dict], chunk: int) -> None:
    names = list(summary)
    ref = summary.get("ntp")
    print(f"\nmemory: {summary[names[0]]['mem_kind']}; ratios use the step delta = peak - baseline "
          "(max over rounds); time = median step (s); "
          "time_ratio_hs_vs_naive in the JSON is the median per-pair ratio of the alternating run")
    header = ("| config | n | loss impl | chunk | params | baseline MiB | abs peak MiB | step delta MiB "
              "| delta / NTP | step s | time / NTP |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for n in names:
        s, spec = summary[n], CONFIGS[n]
        mr = s["delta"] / ref["delta"] if ref else float("nan")
        tr = s["time"] / ref["time"] if ref else float("nan")
        print(f"| {n} | {spec['n_future']} | {spec['impl']} | {chunk if spec['chunk'] else '-'} | "
              f"{s['params'] / 1e6:.1f}M | {s['base'] / MiB:.0f} | {s['peak'] / MiB:.0f} | {s['delta'] / MiB:.0f} | "
              f"{mr:.2f}x | {s['time']:.2f} | {tr:.2f}x |")


def figures(summary: dict[str, dict], paired: Optional[dict], args) -> dict:
    names = list(summary)

    def ratio(a, b, key):
        return round(summary[a][key] / summary[b][key], 4) if a in summary and b in summary else None

    return {
        "mem_ratio_hs_vs_ntp": ratio("hs", "ntp", "delta"),
        "mem_ratio_naive_vs_ntp": ratio("naive", "ntp", "delta"),
        "time_ratio_hs_vs_naive": (round(statistics.median(paired["ratios"]), 4) if paired
                                   else ratio("hs", "naive", "time")),
        "time_ratio_hs_vs_naive_separate_processes": ratio("hs", "naive", "time"),
        "mem_ratio_chunked_vs_hs": ratio("hs_chunked", "hs", "delta"),
        "abs_peak_ratio_hs_vs_ntp": ratio("hs", "ntp", "peak"),
        "abs_peak_ratio_naive_vs_ntp": ratio("naive", "ntp", "peak"),
        "abs_peak_ratio_chunked_vs_hs": ratio("hs_chunked", "hs", "peak"),
        "time_ratio_chunked_vs_hs": ratio("hs_chunked", "hs", "time"),
        "time_ratio_hs_vs_ntp": ratio("hs", "ntp", "time"),
        "mem_figure": "step delta (peak - RSS before the step)" if args.device == "cpu"
        else "step delta (max_memory_allocated - memory_allocated before the step)",
        "step_delta_mib": {n: round(summary[n]["delta"] / MiB) for n in names},
        "abs_peak_mib": {n: round(summary[n]["peak"] / MiB) for n in names},
        "step_s": {n: round(summary[n]["time"], 3) for n in names},
        "device": args.device,
        "malloc": "glibc default" if args.glibc_default else "MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=1MiB",
        "shape": dict(vocab=args.vocab, seq=args.seq, batch=args.batch, dim=args.dim, layers=args.layers,
                      chunk=args.chunk),
    }


def check_floors(result: dict) -> bool:
    """Print each floor's verdict; True if all are met."""
    ok = True
    print("\nfloors:")
    for key, (op, bound) in FLOORS.items():
        v = result[key]
        passed = v is not None and (v <= bound if op == "<=" else v >= bound)
        print(f"  {v} {op} {bound}: {'ok' if passed else 'MISSED'}")
        ok &= passed
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        write_result(args.result_file, paired_child(args) if args.child == "paired" else child(args))
        return 0
    names = args.configs.split(",")
    print(f"loss memory benchmark: vocab {args.vocab}, seq {args.seq}, batch {args.batch} "
          f"({args.batch * args.seq} tokens/head), trunk dim {args.dim} x {args.layers} blocks, "
          f"transformer heads of 1 block, chunk {args.chunk}, device {args.device}, "
          f"{args.rounds} interleaved round(s) x (warm-up + {args.steps} timed steps, the first also measures "
          f"memory), then {args.pairs} alternating naive/hs pairs in one process, "
          f"malloc: {'glibc default' if args.glibc_default else 'mmap/trim threshold 1 MiB'}", flush=True)
    runs = run_rounds(args, names)
    paired = None
    if args.pairs > 0 and "naive" in names and "hs" in names:
        paired = run_child("paired", args)
        print(f"  paired naive {', '.join(f'{t:.2f}' for t in paired['times']['naive'])} s, "
              f"hs {', '.join(f'{t:.2f}' for t in paired['times']['hs'])} s, "
              f"hs/naive per pair {', '.join(f'{r:.3f}' for r in paired['ratios'])}", flush=True)
    summary = summarize(runs)
    print_table(summary, args.chunk)
    result = figures(summary, paired, args)
    result["floors_met"] = check_floors(result)
    print_result(result, args.result_file)
    return 0


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    sys.exit(main())
