"""Pipeline parallelism: per-stage peak memory of a training step with the head-sequential vs the
naive loss on the last stage, and the measured pipeline bubble against the schedule's theoretical one.

Every configuration is one torchrun launch of this module (``--worker``, via ``bench.common.launch``) on CPU/gloo, each rank
running the real ``Trainer`` (``parallel.pp_size`` stages, no other parallelism) on random tokens:

* memory -- PP=2 and PP=4 (1f1b), n=4 transformer heads, vocabulary 32768, ``loss.impl`` =
  head_sequential and naive (chunk_size 0: full logits, the paper's comparison). Each rank takes
  one warm-up step (the optimizer state exists, gradients are cleared), reads its resident set
  (the *baseline*: weights, optimizer state, interpreter), resets the kernel's RSS high-water mark
  (``/proc/self/clear_refs``) and takes one step; its *step delta* is the peak minus the baseline
  (activations of the micro-batches in flight, gradients, the last stage's logits, the optimizer
  step's temporaries). The same delta is also read right after the micro-batches' forward and
  backward, before the optimizer step (whose temporaries, the same for either loss, come after the
  logits are gone): the floor is on that one -- the last stage's fwd/bwd delta with
  head-sequential <= 0.6 x with naive, for PP=2 and PP=4.
* bubble -- PP=2 and PP=4 (1f1b, and interleaved_1f1b with 2 stages per rank at PP=2), 8
  micro-batches, a small vocabulary. A rank's idle fraction over the timed steps is
  1 - (CPU time of its main thread) / (wall time): one intra-op thread per rank, so the main
  thread computes, and sleeps in gloo while it waits for a neighbour. Theoretical bubble fraction
  of the whole step: (p - 1) / (m + p - 1) for 1f1b/gpipe, (p - 1) / (v m + p - 1) interleaved
  (v stages per rank), for balanced stages; the last stage here also runs n heads and the
  unembedding, so the other stages wait longer than the formula says (the per-rank figures show
  where). On a shared machine, time a rank spends descheduled counts as idle: the figures are an
  upper bound there. A run with ``parallel.pp_layout`` balancing the two stages of PP=2 shows how
  much of the idle time is that imbalance.

    python -m bench.pipeline                # the documented run
    python -m bench.pipeline --quick        # a smoke run (small vocabulary, short sequences)

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from bench import common
from bench.common import reset_peak_rss
FLOOR_LAST_STAGE = 0.6  # head-sequential last-stage step delta <= 0.6 x naive's


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --- one rank ------------------------------------------------------------------------------------
def worker(spec_path: str, result_file: str) -> None:
    import torch
    import torch.distributed as dist

    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.train import Trainer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    cfg = compose_job_config(spec["overrides"])
    trainer = Trainer(cfg, Path(spec["out"]))
    trainer.train_iter = iter(trainer.train_stream)
    trainer.train_step()  # warm-up: optimizer state, schedule built (shape inference), gradients cleared
    # The high-water mark right after the micro-batches' forward and backward (before the
    # optimizer step, whose temporaries are the same whatever the loss).
    after_backward = []
    forward_backward = trainer.strategy.forward_backward

    def measured(*args, **kwargs):
        out = forward_backward(*args, **kwargs)
        after_backward.append(max_rss())
        return out

    trainer.strategy.forward_backward = measured
    dist.barrier()
    baseline, exact = current_rss(), reset_peak_rss()
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(spec["steps"]):
        trainer.train_step()
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    peak = max_rss()
    pipe = trainer.strategy.pipeline
    mine = {"rank": trainer.env.rank, "stages": pipe.local, "last": pipe.has_last,
            "baseline_mb": baseline / 2**20, "peak_mb": peak / 2**20, "step_delta_mb": (peak - baseline) / 2**20,
            "fwd_bwd_delta_mb": (max(after_backward) - baseline) / 2**20,
            "peak_reset": exact, "wall_s": wall, "busy_s": cpu, "idle_fraction": max(0.0, 1 - cpu / wall)}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    if trainer.env.is_main:
        common.write_result(result_file, {"ranks": ranks, "grad_accum": trainer.grad_accum})
    trainer.close()


# --- the launches --------------------------------------------------------------------------------
def launch(name: str, nproc: int, overrides: list[str], steps: int, work: Path) -> dict:
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps({"overrides": overrides, "out": str(work / name), "steps": steps}))
    t0 = time.perf_counter()
    # Fixed (not dynamic) glibc thresholds, as in bench/loss_memory.py: every allocation of 1 MiB or
    # more is its own mmap, returned on free, so the warm-up step's freed tensors do not stay in the
    # heap and hide the timed step's peak from the RSS high-water mark.
    env = {"WANDB_MODE": "disabled", "MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)}
    out = common.launch("bench.pipeline", ["--worker", str(spec_path)], nproc=nproc, env=env, what=name)
    print(f"{name}: {time.perf_counter() - t0:.0f}s  " + "  ".join(
        f"rank{r['rank']}{'(last)' if r['last'] else ''} fwd/bwd {r['fwd_bwd_delta_mb']:.0f}MB step "
        f"{r['step_delta_mb']:.0f}MB idle {r['idle_fraction']:.2f}"
        for r in out["ranks"]), flush=True)
    return out


def theoretical_bubble(pp: int, microbatches: int, stages_per_rank: int = 1) -> float:
    return (pp - 1) / (stages_per_rank * microbatches + pp - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    common.add_result_file_arg(ap)
    ap.add_argument("--quick", action="store_true", help="a smoke run: small vocabulary and sequences")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per configuration")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.result_file)
    if args.quick:
        args.vocab, args.seq = 4096, 64

    from mtp_pretrain.data.synthetic import write_random_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    data = work / "data"
    write_random_dataset(data, {"train": 400_000, "val": 10_000}, seed=0, doc_len=1000)

    def overrides(vocab: int, microbatches: int, *extra: str) -> list[str]:
        return [f"data.sources=[{{path:{data},weight:1.0}}]", f"data.seq_len={args.seq}", "data.prefetch=0",
                "data.document_masking=false", "model=tiny", f"model.vocab_size={vocab}", f"model.dim={args.dim}",
                "model.n_heads=4", "model.n_layers=8", "model.n_future=4", f"model.max_seq_len={args.seq}",
                f"train.micro_batch_size={args.micro_batch}",
                f"train.global_batch_tokens={args.micro_batch * args.seq * microbatches}", "train.max_steps=100",
                "train.dtype=float32", "train.device=cpu", "train.resume=never", "logging=quiet",
                "logging.val_interval=0", "checkpoint.interval=0", *extra]

    memory = {}
    for pp in (2, 4):
        for impl in ("head_sequential", "naive"):
            out = launch(f"mem_pp{pp}_{impl}", pp, overrides(args.vocab, pp, f"parallel.pp_size={pp}",
                                                             f"loss.impl={impl}"), args.steps, work)
            memory[(pp, impl)] = out["ranks"]
    mem_out, floors = {}, {}
    for pp in (2, 4):
        entry = {}
        for key in ("fwd_bwd_delta_mb", "step_delta_mb"):
            per_impl = {impl: [round(r[key], 1) for r in sorted(memory[(pp, impl)], key=lambda r: r["rank"])]
                        for impl in ("head_sequential", "naive")}
            # the last rank holds the last stage
            entry[key + "_per_rank"] = per_impl
            entry[key.replace("_delta_mb", "") + "_last_stage_ratio_hs_vs_naive"] = round(
                per_impl["head_sequential"][-1] / per_impl["naive"][-1], 3)
        mem_out[f"pp{pp}"] = entry
        floors[f"pp{pp}_last_stage_hs_le_{FLOOR_LAST_STAGE}x_naive"] = (
            entry["fwd_bwd_last_stage_ratio_hs_vs_naive"] <= FLOOR_LAST_STAGE)

    bubble = {}
    m = 8
    # At vocabulary 4096 and dim 256 one unembedding costs about one trunk block, so the last stage
    # (its blocks + n head blocks + n unembeddings) weighs 8 blocks more than its share: "balanced"
    # gives the first stage all 8 trunk blocks (pp_layout=[8,0]) and the last the heads alone.
    for name, pp, schedule, v, extra in (("pp2_1f1b", 2, "1f1b", 1, []),
                                         ("pp2_1f1b_balanced", 2, "1f1b", 1, ["parallel.pp_layout=[8,0]"]),
                                         ("pp2_interleaved_1f1b", 2, "interleaved_1f1b", 2, []),
                                         ("pp4_1f1b", 4, "1f1b", 1, [])):
        out = launch(f"bubble_{name}", pp, overrides(4096, m, f"parallel.pp_size={pp}",
                                                     f"parallel.pp_schedule={schedule}", *extra),
                     max(args.steps, 2), work)
        idle = [round(r["idle_fraction"], 3) for r in sorted(out["ranks"], key=lambda r: r["rank"])]
        bubble[name] = {"microbatches": out["grad_accum"], "idle_fraction_per_rank": idle,
                                        "idle_fraction_mean": round(sum(idle) / len(idle), 3),
                                        "theoretical": round(theoretical_bubble(pp, m, v), 3)}
    shutil.rmtree(work, ignore_errors=True)
    common.print_result({"bench": "pipeline", "vocab": args.vocab, "dim": args.dim, "seq": args.seq,
                         "micro_batch": args.micro_batch, "n_future": 4, "trunk_layers": 8, "memory": mem_out,
                         "bubble": bubble, "floors": floors}, args.result_file)


if __name__ == "__main__":
    main()
