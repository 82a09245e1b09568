"""What the training framework costs: tokens/s of the real Trainer (mtp-train's loop, run
in-process) against a bare hand-written PyTorch loop doing the same work on one process.

Both sides: the same MTPTransformer (same config, same seed), the same batch shape, the same data
read with ArrowTokenStream (same mixture, same prefetch), the head-sequential loss, global
grad-norm clipping, AdamW and a LambdaLR schedule. The framework additionally does everything a
job does every step (config-driven set-up, strategy hooks, per-head loss bookkeeping, the
preemption check, non-finite guard, a metrics.jsonl line + console line per step: logging.interval=1,
its most expensive setting) — that is the overhead measured. Checkpointing and validation are
off in the measured window (they are not per-step costs; tokens_per_s excludes them anyway).

Per-step times: the framework's from its own metrics.jsonl (tokens_per_s of every step), the
bare loop's from perf_counter around each step. The first --warmup steps of every run are
dropped. Runs alternate framework / bare (order flipped every round) to spread the noise of a
shared machine evenly; the headline figures use the median step time over all rounds (robust
to bursts of load from other processes), the mean-based figures are reported too.

    python -m bench.trainer_overhead [--rounds 8 --steps 20 --threads 1]

CPU time (process_time, all threads of the process) is measured at the same points: tokens per
CPU-second do not depend on how much of the cores other processes take, so ``overhead_cpu`` is
the figure to trust on a busy shared machine, where wall-clock rounds swing by tens of percent.

The last line printed is one JSON object: framework_tokens_per_s, bare_tokens_per_s, overhead
(1 - framework/bare, wall clock; > 0 means the framework is slower), overhead_cpu, and details.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import print_result
import torch

from mtp_pretrain.config import compose_job_config
from mtp_pretrain.data import ArrowTokenStream, DataSource
from mtp_pretrain.data.synthetic import write_random_dataset
from mtp_pretrain.loss import head_sequential_loss
from mtp_pretrain.metrics import last_per_step, read_metrics
from mtp_pretrain.model import MTPTransformer
from mtp_pretrain.train import run


def overrides(args, sources: list[Path], run_dir: Path) -> list[str]:
    a, b = sources
    return [
        f"data.sources=[{{path:{a},weight:0.7}},{{path:{b},weight:0.3}}]",
        "model=tiny", f"model.vocab_size={args.vocab}", f"model.dim={args.dim}", f"model.n_layers={args.layers}",
        f"model.n_heads={args.heads}", f"model.n_future={args.n_future}", f"model.max_seq_len={max(1024, args.seq)}",
        f"data.seq_len={args.seq}", f"data.prefetch={args.prefetch}", f"train.micro_batch_size={args.micro}",
        f"train.max_steps={args.warmup + args.steps}", "train.device=cpu", "train.dtype=float32",
        "train.resume=never", "loss.impl=head_sequential", "loss.chunk_size=0",
        "logging=quiet", "logging.interval=1", "logging.val_interval=0",
        "checkpoint.interval=0", f"checkpoint.dir={run_dir / 'checkpoints'}",
    ]


def framework_step_times(args, sources, workdir: Path, k: int) -> tuple[list[float], list[float]]:
    """(wall, CPU) seconds of each measured step of one in-process mtp-train run.

    Wall times come from the run's own metrics.jsonl (tokens_per_s of each step). CPU times
    (process_time: this process, all threads) are read at the same points, when the Trainer hands
    each step's record to its MetricsLogger (a pass-through wrapper, not a change of the loop).
    """
    from mtp_pretrain import metrics

    run_dir = workdir / f"fw-{k}"
    cfg = compose_job_config(overrides(args, sources, run_dir))
    cpu_marks = []
    real_log = metrics.MetricsLogger.log

    def log(self, record, console=None):
        if "loss" in record:
            cpu_marks.append(time.process_time())
        return real_log(self, record, console)

    metrics.MetricsLogger.log = log
    stdout = sys.stdout
    sys.stdout = open(os.devnull, "w")  # its console line per step is part of the cost, not of our output
    try:
        assert run(cfg, run_dir) == 0
    finally:
        sys.stdout.close()
        sys.stdout = stdout
        metrics.MetricsLogger.log = real_log
    tokens = args.micro * args.seq
    wall = [tokens / r["tokens_per_s"] for step, r in last_per_step(read_metrics(run_dir)).items() if step > args.warmup]
    cpu = [b - a for a, b in zip(cpu_marks[args.warmup - 1:], cpu_marks[args.warmup:])]
    assert len(wall) == len(cpu) == args.steps, (len(wall), len(cpu))
    return wall, cpu


def bare_step_times(args, sources) -> tuple[list[float], list[float]]:
    cfg = compose_job_config(overrides(args, sources, Path(tempfile.gettempdir())))  # the same model shape
    torch.manual_seed(cfg.train.seed)
    model = MTPTransformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    total = args.warmup + args.steps
    warm = cfg.optim.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    stream = ArrowTokenStream([DataSource(str(p), w) for p, w in zip(sources, (0.7, 0.3))],
                              window=args.seq + args.n_future, micro_batch_size=args.micro,
                              seed=cfg.train.seed, prefetch=args.prefetch, infinite=True)
    it = iter(stream)
    params = list(model.parameters())
    wall, cpu = [], []
    t_last, c_last = time.perf_counter(), time.process_time()
    for step in range(total):
        tokens = next(it)
        head_sequential_loss(model, tokens, seq_len=args.seq)
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        now, c_now = time.perf_counter(), time.process_time()
        if step >= args.warmup:
            wall.append(now - t_last)
            cpu.append(c_now - c_last)
        t_last, c_last = now, c_now
    stream.close() if hasattr(stream, "close") else None
    return wall, cpu


def summarize(times: list[float], tokens: int) -> dict:
    return {"tokens_per_s_median": tokens / statistics.median(times), "tokens_per_s_mean": tokens * len(times) / sum(times),
            "step_s_median": statistics.median(times), "step_s_min": min(times), "steps": len(times)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="framework/bare pairs, interleaved")
    ap.add_argument("--steps", type=int, default=20, help="measured steps per run")
    ap.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both sides)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n-future", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=320, help="byte-level data: >= 259")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--data", help="directory holding datasets a/ and b/ (default: synthetic, made in a temp dir)")
    return ap.parse_args(argv)


def run_rounds(args, sources: list[Path], workdir: Path) -> tuple[dict[str, list[float]], list[dict]]:
    """Framework and bare runs in pairs, the order flipped every round: every measured step's
    wall and CPU seconds per side ({"fw", "bare", "fw_cpu", "bare_cpu"}), and each round's medians."""
    times = {"fw": [], "bare": [], "fw_cpu": [], "bare_cpu": []}
    rounds = []
    for k in range(args.rounds):
        order = ("fw", "bare") if k % 2 == 0 else ("bare", "fw")
        got = {}
        for mode in order:
            got[mode] = framework_step_times(args, sources, workdir, k) if mode == "fw" else bare_step_times(args, sources)
        for mode in ("fw", "bare"):
            times[mode] += got[mode][0]
            times[f"{mode}_cpu"] += got[mode][1]
        r = {"round": k, "framework_step_s": statistics.median(got["fw"][0]),
             "bare_step_s": statistics.median(got["bare"][0]),
             "framework_cpu_s": statistics.median(got["fw"][1]), "bare_cpu_s": statistics.median(got["bare"][1]),
             "load": round(os.getloadavg()[0], 2)}
        r["overhead"] = 1 - r["bare_step_s"] / r["framework_step_s"]
        r["overhead_cpu"] = 1 - r["bare_cpu_s"] / r["framework_cpu_s"]
        rounds.append(r)
        print(f"round {k}: wall framework {r['framework_step_s'] * 1e3:.1f} / bare {r['bare_step_s'] * 1e3:.1f} "
              f"ms/step ({100 * r['overhead']:+.2f}%), CPU framework {r['framework_cpu_s'] * 1e3:.1f} / bare "
              f"{r['bare_cpu_s'] * 1e3:.1f} ms/step ({100 * r['overhead_cpu']:+.2f}%)  load {r['load']}", flush=True)
    return times, rounds


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="trainer_overhead.") as tmp:
        workdir = Path(tmp)
        if args.data:
            sources = [Path(args.data) / "a", Path(args.data) / "b"]
        else:
            sources = [workdir / "a", workdir / "b"]
            need = 2 * (args.warmup + args.steps) * args.micro * (args.seq + args.n_future) + 100_000
            for i, p in enumerate(sources):
                write_random_dataset(p, {"train": need, "val": 10_000}, doc_len=1000, seed=i)
        times, rounds = run_rounds(args, sources, workdir)

    tokens = args.micro * args.seq
    f, b = summarize(times["fw"], tokens), summarize(times["bare"], tokens)
    fc, bc = summarize(times["fw_cpu"], tokens), summarize(times["bare_cpu"], tokens)
    result = {
        "framework_tokens_per_s": round(f["tokens_per_s_median"], 1),
        "bare_tokens_per_s": round(b["tokens_per_s_median"], 1),
        "overhead": round(1 - f["tokens_per_s_median"] / b["tokens_per_s_median"], 4),
        "overhead_mean_based": round(1 - f["tokens_per_s_mean"] / b["tokens_per_s_mean"], 4),
        "overhead_per_round_median": round(statistics.median(r["overhead"] for r in rounds), 4),
        # tokens per CPU-second: insensitive to other processes taking the cores away
        "framework_tokens_per_cpu_s": round(fc["tokens_per_s_median"], 1),
        "bare_tokens_per_cpu_s": round(bc["tokens_per_s_median"], 1),
        "overhead_cpu": round(1 - fc["tokens_per_s_median"] / bc["tokens_per_s_median"], 4),
        "framework": f, "bare": b, "rounds": rounds,
        "load_avg_start": [round(x, 2) for x in load_start], "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
        "shape": {"dim": args.dim, "layers": args.layers, "heads": args.heads, "n_future": args.n_future,
                  "vocab": args.vocab, "seq": args.seq, "micro_batch": args.micro, "tokens_per_step": tokens},
    }
    print_result(result)


if __name__ == "__main__":
    main()
