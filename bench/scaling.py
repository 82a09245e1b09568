"""Scaling on CPU: tokens/s and memory per rank for 1, 2 and 4 processes under fsdp and DeepSpeed
ZeRO-3, the bytes the shared unembedding's gradient costs when reduced once per step instead of
once per head, and an estimate of the largest model each strategy fits per rank.

    flock /tmp/mtp_heavy.lock .venv/bin/python -m bench.scaling [--steps 4] [--seq-len 128]

Every configuration is one ``torch.distributed.run`` launch of this module as a worker -- the real Trainer,
synthetic random tokens, fp32, gloo -- training the ``small`` model (and ``tiny``, for the memory
slope) with the same global batch (strong scaling: 1 rank accumulates 4 micro-batches, 2 ranks 2,
4 ranks 1). Reported per configuration:

* tokens/s per rank: the mean over steps 2.. (step 1 includes warm-up), divided by ranks;
* MFU against a *measured* peak: one core's fp32 matmul FLOP/s (``hardware.peak_flops``), since
  a CPU has no datasheet figure here -- so MFU here means "fraction of what one core's matmul
  reaches", the analytic FLOPs per token being ``mtp_pretrain.flops``;
* peak RSS per rank (ru_maxrss: includes ~0.3-0.4 GB of Python/torch/DeepSpeed libraries);
* model-state bytes per rank: parameters, master copies and AdamW moments held between steps
  (local shards / ZeRO partitions), counted from the tensors -- and per parameter;
* communication: bytes handed to torch.distributed collectives and the time spent in those calls
  (fsdp; DeepSpeed's calls go through its own comm layer and are counted only where it calls
  torch.distributed by attribute).

Largest model that fits (an estimate, said so in the output): per-rank memory = intercept +
slope x parameters, fitted through the measured peak RSS of ``tiny`` and ``small`` at the same
batch and sequence length (so the slope includes the activation growth between those two
shapes, but not that of wider models); solved for this machine's RAM split over the ranks and
for an 80 GiB device.

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from bench.common import add_result_file_arg, launch, print_result, write_result
from mtp_pretrain.model.config import count_parameters, model_config

STRATEGIES = {"fsdp": ["parallel=fsdp"], "zero3": ["parallel=deepspeed", "parallel.zero_stage=3"]}
NAMED = ("124m", "1b", "7b")


def matmul_peak_flops(n: int = 1024, reps: int = 5) -> float:
    """One thread's fp32 matmul FLOP/s (best of reps)."""
    torch.set_num_threads(1)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# --- the worker: one rank of a launch ------------------------------------------------------------
def train_and_measure(run: dict, out: Path) -> dict | None:
    """Train one run with the real Trainer in this process group. Rank 0 returns its per-step
    figures and every rank's memory and communication; the other ranks return None."""
    import torch.distributed as dist

    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.metrics import last_per_step, model_state_bytes, read_metrics
    from mtp_pretrain.parallel.comm import CommCounter
    from mtp_pretrain.train import Trainer

    run_dir = out / run["name"]
    cfg = compose_job_config(["logging=quiet", f"checkpoint.dir={run_dir / 'checkpoints'}", *run["overrides"]])
    trainer = Trainer(cfg, run_dir)
    if run.get("unembed_sync") == "per_head":  # measurement only: reduce the unembedding once per head
        trainer.strategy.defer_shared_grad_sync = False
    counter = CommCounter() if run.get("count_comm") else None
    try:
        with counter if counter is not None else contextlib.nullcontext():
            trainer.train()
    finally:  # not trainer.close(): the next run reuses this process group
        trainer.metrics.close()
        trainer.train_stream.close()
    mine = {"comm": counter.summary() if counter else None,
            "state_bytes": model_state_bytes(trainer.model, trainer.optimizer),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    result = None
    if trainer.env.is_main:
        steps = list(last_per_step(read_metrics(run_dir)).values())
        result = {"world_size": len(ranks), "losses": [r["loss"] for r in steps],
                  "tokens_per_s": [r["tokens_per_s"] for r in steps], "mfu": [r.get("mfu") for r in steps],
                  "n_params": sum(trainer.param_counts[k] for k in ("embedding", "trunk", "heads", "unembedding")),
                  "ranks": ranks}
    del trainer
    dist.barrier()
    return result


def worker(spec_file: str, result_file: str) -> None:
    import torch.distributed as dist

    from mtp_pretrain.parallel import destroy_distributed

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(Path(spec_file).read_text())
    results = {run["name"]: train_and_measure(run, Path(spec["out"])) for run in spec["runs"]}
    write_result(result_file, results, rank=dist.get_rank())
    destroy_distributed()


def train_runs(out: Path, nproc: int, runs: list[dict]) -> dict:
    """The runs one after another in one launch of ``nproc`` ranks (torchrun even for one: fsdp
    needs a process group); {run name: its figures}."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "runs": runs}))
    return launch(__spec__.name, ["--worker-spec", str(spec)], nproc=nproc, env={"DS_ACCELERATOR": "cpu"},
                  what=f"{out.name}: {', '.join(r['name'] for r in runs)} on {nproc} rank(s)")


# --- the measurements ----------------------------------------------------------------------------
def summarize(res: dict) -> dict:
    ranks = res["ranks"]
    tps = res["tokens_per_s"][1:] or res["tokens_per_s"]
    mfu = [m for m in res["mfu"][1:] if m is not None]
    comm = [r["comm"] for r in ranks if r.get("comm")]
    return {
        "world": res["world_size"], "n_params": res["n_params"],
        "tokens_per_s_per_rank": sum(tps) / len(tps) / res["world_size"],
        "mfu": sum(mfu) / len(mfu) if mfu else None,
        "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in ranks),
        "state_mb_per_rank": max(r["state_bytes"] for r in ranks) / 2**20,
        "state_bytes_per_param_per_rank": max(r["state_bytes"] for r in ranks) / res["n_params"],
        "comm_mb_per_rank": (sum(comm[0]["bytes"].values()) / 2**20) if comm else None,
        "comm_s_per_rank": (sum(comm[0]["seconds"].values())) if comm else None,
        "steps": len(res["losses"]), "final_loss": res["losses"][-1],
    }


def measure_strategies(args, worlds: list[int], overrides, tmp: Path) -> list[dict]:
    """tokens/s, memory and communication of ``small`` per strategy and world size (and the peak
    RSS of ``tiny``, for the memory slope)."""
    rows = []
    for strat, extra in STRATEGIES.items():
        for w in worlds:
            # tiny first: ru_maxrss only grows, so each run's peak is read in increasing size order
            runs = [{"name": "tiny", "overrides": overrides("tiny", 2) + extra},
                    {"name": "small", "overrides": overrides("small", args.steps) + extra, "count_comm": True}]
            res = train_runs(tmp / f"{strat}-{w}", w, runs)
            row = {"strategy": strat, **summarize(res["small"]),
                   "tiny_peak_rss_mb_per_rank": summarize(res["tiny"])["peak_rss_mb_per_rank"],
                   "tiny_n_params": res["tiny"]["n_params"]}
            rows.append(row)
            print(f"{strat:>6} x{w}: {row['tokens_per_s_per_rank']:8.0f} tok/s/rank  mfu {row['mfu'] or 0:.3f}  "
                  f"peak RSS {row['peak_rss_mb_per_rank']:6.0f} MB/rank  state {row['state_mb_per_rank']:6.1f} MB/rank "
                  f"({row['state_bytes_per_param_per_rank']:.2f} B/param)  comm {row['comm_mb_per_rank'] or 0:.1f} MB "
                  f"{row['comm_s_per_rank'] or 0:.2f} s/rank", flush=True)
    return rows


def measure_unembedding_comm(overrides, tmp: Path, steps: int = 2) -> dict:
    """The shared unembedding's gradient reduced once per step vs once per head (fsdp, 2 ranks)."""
    base = overrides("small", steps) + STRATEGIES["fsdp"]
    res = train_runs(tmp / "comm", 2, [
        {"name": "deferred", "overrides": base, "count_comm": True},
        {"name": "per_head", "overrides": base, "count_comm": True, "unembed_sync": "per_head"}])
    cfg = model_config("small")
    rs = {k: v["ranks"][0]["comm"]["bytes"].get("reduce_scatter_single", 0) for k, v in res.items()}
    total = {k: sum(v["ranks"][0]["comm"]["bytes"].values()) for k, v in res.items()}
    comm = {"reduce_scatter_bytes_per_step": {k: v / steps for k, v in rs.items()},
            "all_collective_bytes_per_step": {k: v / steps for k, v in total.items()},
            "saved_bytes_per_step": (rs["per_head"] - rs["deferred"]) / steps,
            "expected_saved_bytes_per_step": (cfg.n_future - 1) * cfg.vocab_size * cfg.dim * 4,
            "losses_equal": max(abs(a - b) for a, b in zip(res["deferred"]["losses"],
                                                           res["per_head"]["losses"])) < 1e-4}
    print(f"unembedding gradient, fsdp x2, small (n={cfg.n_future}, V={cfg.vocab_size}, d={cfg.dim}): "
          f"reduce-scatter input {comm['reduce_scatter_bytes_per_step']['deferred'] / 2**20:.2f} MB/step "
          f"deferred vs {comm['reduce_scatter_bytes_per_step']['per_head'] / 2**20:.2f} MB/step per head: "
          f"saves {comm['saved_bytes_per_step'] / 2**20:.2f} MB/step "
          f"(expected (n-1) V d 4 B = {comm['expected_saved_bytes_per_step'] / 2**20:.2f} MB)")
    return comm


def fit_largest_models(rows: list[dict], ram: int) -> list[dict]:
    """Largest model per rank: a linear fit of peak RSS through ``tiny`` and ``small``."""
    fits = []
    for row in rows:
        slope = (row["peak_rss_mb_per_rank"] - row["tiny_peak_rss_mb_per_rank"]) * 2**20 / (
            row["n_params"] - row["tiny_n_params"])
        intercept = row["peak_rss_mb_per_rank"] * 2**20 - slope * row["n_params"]
        est = {size: (intercept + slope * count_parameters(model_config(size))["total"]) / 2**30 for size in NAMED}
        budget_here = ram / row["world"]
        fit = {"strategy": row["strategy"], "world": row["world"], "rss_bytes_per_param": slope,
               "intercept_mb": intercept / 2**20,
               "max_params_this_machine": max(0.0, (budget_here - intercept) / slope) if slope > 0 else None,
               "max_params_80gib": max(0.0, (80 * 2**30 - intercept) / slope) if slope > 0 else None,
               "est_gib_per_rank": est}
        fits.append(fit)
        print(f"{row['strategy']:>6} x{row['world']}: {slope:5.1f} B/param/rank (RSS slope tiny->small), "
              f"largest model: {(fit['max_params_this_machine'] or 0) / 1e6:,.0f}M params in {budget_here / 2**30:.1f} GiB "
              f"(this machine's RAM / ranks), {(fit['max_params_80gib'] or 0) / 1e9:.2f}B in 80 GiB; "
              + ", ".join(f"{k}: {v:.1f} GiB" for k, v in est.items()))
    return fits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    add_result_file_arg(ap)
    args = ap.parse_args()
    if args.worker_spec:
        return worker(args.worker_spec, args.result_file)
    worlds = [int(w) for w in args.worlds.split(",")]
    peak = matmul_peak_flops()
    print(f"measured one-core fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (used as hardware.peak_flops)")
    tmp = Path(tempfile.mkdtemp(prefix="mtp_scaling_"))
    from mtp_pretrain.data.synthetic import write_random_dataset

    data = tmp / "data"
    write_random_dataset(data, {"train": 400_000, "val": 10_000}, seed=0)
    gbt = max(worlds) * args.micro_batch * args.seq_len

    def overrides(size: str, steps: int) -> list[str]:
        return [f"data.sources=[{{path:{data},weight:1.0}}]", f"data.seq_len={args.seq_len}", "data.prefetch=0",
                f"model={size}", f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_tokens={gbt}",
                f"train.max_steps={steps}", "train.dtype=float32", "train.device=cpu", "train.resume=never",
                "checkpoint.interval=0", f"hardware.peak_flops={peak}", "checkpoint.keep=1"]

    t_start = time.perf_counter()
    rows = measure_strategies(args, worlds, overrides, tmp)
    comm = measure_unembedding_comm(overrides, tmp) if 2 in worlds else {}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = fit_largest_models(rows, ram)
    print_result({"rows": rows, "unembedding_comm": comm, "fits": fits, "peak_flops_measured": peak,
                  "seq_len": args.seq_len, "micro_batch": args.micro_batch, "global_batch_tokens": gbt,
                  "steps": args.steps, "cpus": os.cpu_count(), "ram_gib": ram / 2**30,
                  "load_avg_1min_at_end": os.getloadavg()[0], "wall_s": time.perf_counter() - t_start})


if __name__ == "__main__":
    main()
