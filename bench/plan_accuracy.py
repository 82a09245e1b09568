"""How close is ``mtp-plan``'s prediction to the measured per-rank peak of the same job?

For each setting (model, strategy, world size, n, loss, chunk, activation checkpointing, pipeline
schedule) the prediction is ``mtp_pretrain.plan.plan_job(cfg, world_size, "cpu")``: one step under
FakeTensorMode with a fake process group, as rank 0 -- under pipeline parallelism one per pp rank,
as that rank's first global rank. The measurement runs the same step for
real on this CPU, on ``world_size`` torchrun ranks over gloo (``plan.measure_step``): the peak
of the CPU allocator's running total of live bytes, from torch's profiler (``profile_memory``),
over the step -- the quantity ``torch.cuda.max_memory_allocated`` reports on a GPU.

    .venv/bin/python -m bench.plan_accuracy                 # the documented table
    .venv/bin/python -m bench.plan_accuracy --only tiny      # the tiny settings only

Error = (predicted - measured) / measured on rank 0 (every rank is printed); under pipeline
parallelism on the first rank of each pp rank, and the setting's error is the largest of those in
magnitude (each is printed). The floor is |error| <= 20 % for every setting. The last line is
one JSON object with ``max_abs_rel_error``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.common import MiB, add_result_file_arg, launch, print_result, write_result

FLOOR = 0.20

# name: (world size, Hydra overrides). Short sequences and micro-batches: real steps on 2 shared cores.
SETTINGS = {
    "tiny none n4 hs": (1, ["model=tiny", "parallel=none"]),
    "tiny none n4 naive": (1, ["model=tiny", "parallel=none", "loss.impl=naive"]),
    "tiny none n4 hs chunk64 AC": (1, ["model=tiny", "parallel=none", "loss.chunk_size=64",
                                       "parallel.activation_checkpointing=full"]),
    "tiny fsdp2 n4 hs": (2, ["model=tiny", "parallel=fsdp"]),
    "tiny fsdp2 n4 naive AC": (2, ["model=tiny", "parallel=fsdp", "loss.impl=naive",
                                   "parallel.activation_checkpointing=full"]),
    "tiny fsdp2 n1": (2, ["model=tiny", "parallel=fsdp", "model.n_future=1"]),
    "tiny fsdp2 n4 hs accum2": (2, ["model=tiny", "parallel=fsdp", "train.global_batch_tokens=1024"]),
    "tiny ddp2 n4 hs chunk64": (2, ["model=tiny", "parallel=ddp", "loss.chunk_size=64"]),
    "tiny tp2 n4 hs": (2, ["model=tiny", "parallel=tp"]),
    "small none n4 naive": (1, ["model=small", "parallel=none", "loss.impl=naive"]),
    "small fsdp2 n4 hs chunk128 AC": (2, ["model=small", "parallel=fsdp", "loss.chunk_size=128",
                                          "parallel.activation_checkpointing=full"]),
    "124m fsdp2 n4 hs": (2, ["model=124m", "parallel=fsdp"]),
    "124m none n1 AC": (1, ["model=124m", "parallel=none", "model.n_future=1",
                            "parallel.activation_checkpointing=full"]),
    # Pipeline parallelism, 2 stages, 4 micro-batches per step (1f1b holds up to 2 in flight on
    # stage 0, gpipe all 4); small's 7 trunk blocks (n = 4) split 4 + 3.
    "tiny pp2 1f1b": (2, ["model=tiny", "parallel=none", "parallel.pp_size=2", "train.global_batch_tokens=1024"]),
    "tiny pp2 gpipe": (2, ["model=tiny", "parallel=none", "parallel.pp_size=2", "parallel.pp_schedule=gpipe",
                           "train.global_batch_tokens=1024"]),
    "small pp2 1f1b": (2, ["model=small", "parallel=none", "parallel.pp_size=2", "parallel.pp_layout=[4,3]",
                           "train.global_batch_tokens=1024"]),
    "tiny fsdp4 pp2 1f1b": (4, ["model=tiny", "parallel=fsdp", "parallel.pp_size=2",
                                "train.global_batch_tokens=2048"]),
    "small fsdp4 pp2 gpipe": (4, ["model=small", "parallel=fsdp", "parallel.pp_size=2", "parallel.pp_layout=[4,3]",
                                  "parallel.pp_schedule=gpipe", "train.global_batch_tokens=2048"]),
    "small fsdp4 pp2 1f1b AC": (4, ["model=small", "parallel=fsdp", "parallel.pp_size=2", "parallel.pp_layout=[4,3]",
                                    "parallel.activation_checkpointing=full", "train.global_batch_tokens=2048"]),
}
COMMON = ["data.seq_len=128", "train.micro_batch_size=2", "train.dtype=float32", "logging=quiet"]


def worker(spec_path: str, result_file: str) -> None:
    """One torchrun rank: measure every setting of the spec; rank 0 writes every rank's figures."""
    import torch
    import torch.distributed as dist

    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.parallel import destroy_distributed, init_distributed
    from mtp_pretrain.plan import measure_step

    settings = json.loads(Path(spec_path).read_text())
    env = init_distributed("cpu")
    torch.set_num_threads(1)
    try:
        mine = {}
        for name, overrides in settings.items():
            mine[name] = measure_step(compose_job_config(overrides), env)
            gc.collect()  # the previous setting's model and optimizer (reference cycles) go now
        ranks = [mine]
        if dist.is_initialized():  # init_distributed makes no process group for one rank
            ranks = [None] * env.world_size
            dist.all_gather_object(ranks, mine)
        write_result(result_file, {name: [r[name] for r in ranks] for name in settings}, rank=env.rank)
    finally:
        destroy_distributed()


def measure(world: int, settings: dict[str, list[str]], tmp: Path) -> dict[str, list[dict]]:
    """The settings measured one after another on ``world`` ranks: {name: [rank 0's, rank 1's, ...]}."""
    spec = tmp / f"spec{world}.json"
    spec.write_text(json.dumps(settings))
    return launch(__spec__.name, ["--worker", str(spec)], nproc=world,
                  what=f"plan_accuracy: {len(settings)} setting(s) on {world} rank(s)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the settings whose name contains this")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    add_result_file_arg(ap)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.result_file)
        return 0
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.plan import plan_job

    chosen = {k: (w, ov + COMMON) for k, (w, ov) in SETTINGS.items() if args.only in k}
    if not chosen:
        sys.exit(f"--only {args.only!r} matches none of: {', '.join(SETTINGS)}")
    print(f"plan accuracy: {len(chosen)} settings, {' '.join(COMMON)}; prediction = fake step as rank 0, "
          f"measurement = CPU allocator peak (profiler) over one real step on torchrun ranks", flush=True)
    t0 = time.perf_counter()
    predicted = {}
    for name, (world, overrides) in chosen.items():
        mem = plan_job(compose_job_config(overrides), world, "cpu")
        predicted[name] = mem
        print(f"  predicted {name}: {mem.predicted / MiB:.1f} MiB ({mem.seconds:.1f}s)", flush=True)
    measured = {}
    with tempfile.TemporaryDirectory(prefix="mtp_plan_acc_") as tmp:
        for world in sorted({w for w, _ in chosen.values()}):
            group = {k: ov for k, (w, ov) in chosen.items() if w == world}
            t1 = time.perf_counter()
            measured |= measure(world, group, Path(tmp))
            print(f"  measured {len(group)} settings on {world} rank(s) in {time.perf_counter() - t1:.0f}s", flush=True)

    print("\n| setting | ranks | predicted MiB | measured MiB (per rank) | error | before step pred / meas MiB |")
    print("|---|---|---|---|---|---|")
    errors = {}
    for name, (world, _) in chosen.items():
        pred, meas = predicted[name], measured[name]
        per_rank = " / ".join(f"{m['peak'] / MiB:.1f}" for m in meas)
        if not pred.stages:
            err = (pred.predicted - meas[0]["peak"]) / meas[0]["peak"]
            errors[name] = round(err, 4)
            print(f"| {name} | {world} | {pred.predicted / MiB:.1f} | {per_rank} | {100 * err:+.1f} % | "
                  f"{pred.before_step / MiB:.1f} / {meas[0]['before_step'] / MiB:.1f} |")
            continue
        # One row per pp rank, against the measurement of its first global rank.
        per_stage = world // len(pred.stages)
        stage_errors = []
        for stage in pred.stages:
            m = meas[stage.pp_rank * per_stage]
            stage_errors.append((stage.predicted - m["peak"]) / m["peak"])
            print(f"| {name}, pp rank {stage.pp_rank} (rank {stage.pp_rank * per_stage}) | {world} | "
                  f"{stage.predicted / MiB:.1f} | {per_rank} | {100 * stage_errors[-1]:+.1f} % | "
                  f"{stage.before_step / MiB:.1f} / {m['before_step'] / MiB:.1f} |")
        errors[name] = round(max(stage_errors, key=abs), 4)
    worst = max(abs(e) for e in errors.values())
    result = {"bench": "plan_accuracy", "settings": len(errors), "max_abs_rel_error": round(worst, 4),
              "floor": FLOOR, "floor_met": worst <= FLOOR, "errors": errors,
              "seconds": round(time.perf_counter() - t0, 1)}
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
