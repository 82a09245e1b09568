"""One launch of the real Trainer per strategy, for the parallel tests.

    torchrun --nproc-per-node N tests/parallel_worker.py SPEC.json

SPEC: {"out": dir, "runs": [{"name": str, "overrides": [hydra overrides...],
                             "count_comm": bool, "unembed_sync": "deferred"|"per_head",
                             "nonfinite_loss_at": [1-based steps whose loss is made NaN],
                             "check_resharded": bool}]}
Each run trains with ``mtp_pretrain.train.Trainer`` (run dir ``out/<name>``, metrics.jsonl with one
line per step, a DCP checkpoint at the last step) in the same process group, one after another;
rank 0 writes ``out/<name>/result.json`` with the per-step losses, throughput, peak memory and,
with count_comm, the collective bytes each rank sent (wrapped torch.distributed calls); with
check_resharded (FSDP), the parameters each rank holds gathered after the last training step and
after a validation pass run then (``Trainer.validate``), and how many it holds sharded.
"""

from __future__ import annotations

import faulthandler
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# A rank killed by a signal (SIGABRT from a C++ abort, SIGSEGV) prints every thread's Python stack
# to its stderr (its own log file under torchrun --log-dir) before it dies: where it was, and in which run.
faulthandler.enable(all_threads=True)
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def run_one(run: dict, out: Path) -> None:
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.metrics import TRAIN_KEY, model_state_bytes, read_metrics
    from mtp_pretrain.parallel.comm import CommCounter
    from mtp_pretrain.train import Trainer

    import mtp_pretrain.train as train_module

    run_dir = out / run["name"]
    cfg = compose_job_config(["logging=quiet", f"checkpoint.dir={run_dir / 'checkpoints'}"] + run["overrides"])
    trainer = Trainer(cfg, run_dir)
    real_loss = train_module.mtp_loss
    if run.get("nonfinite_loss_at"):
        # The loss (not the gradients) of these steps reads NaN on every rank: the strategy's
        # step must skip the update although every gradient is finite.
        def nonfinite_loss(*args, **kwargs):
            out = real_loss(*args, **kwargs)
            if trainer.step + 1 in run["nonfinite_loss_at"]:
                out.per_head = [torch.full_like(x, float("nan")) for x in out.per_head]
            return out

        train_module.mtp_loss = nonfinite_loss
    if run.get("unembed_sync") == "per_head":  # measurement only: reduce the unembedding per head
        trainer.strategy.defer_shared_grad_sync = False
    counter = CommCounter() if run.get("count_comm") else None
    t0 = time.perf_counter()
    try:
        if counter:
            with counter:
                trainer.train()
        else:
            trainer.train()
    finally:
        train_module.mtp_loss = real_loss
        trainer.metrics.close()
        if hasattr(trainer.train_stream, "close"):
            trainer.train_stream.close()
    elapsed = time.perf_counter() - t0
    comm = counter.summary() if counter else None
    resharded = None
    if run.get("check_resharded"):
        resharded = {"after_step": sharding(trainer.model)}
        trainer.validate()
        resharded["after_validation"] = sharding(trainer.model)
    ws = dist.get_world_size() if dist.is_initialized() else 1
    gathered = [None] * ws
    mine = {"rank": trainer.env.rank, "comm": comm, "state_bytes": model_state_bytes(trainer.model, trainer.optimizer),
            # elements of this rank's parameters, whole (a sharded DTensor counts its global shape)
            "param_numel": sum(p.numel() for p in trainer.model.parameters()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "resharded": resharded}
    if ws > 1:
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    if trainer.env.is_main:
        steps = [x for x in read_metrics(run_dir) if TRAIN_KEY in x]
        (run_dir / "result.json").write_text(json.dumps({
            "name": run["name"], "world_size": ws, "strategy": cfg.parallel.strategy,
            "losses": [x["loss"] for x in steps], "steps": [x["step"] for x in steps],
            "tokens_per_s": [x["tokens_per_s"] for x in steps], "grad_norms": [x["grad_norm"] for x in steps],
            "nonfinite_skipped": [x["nonfinite_skipped"] for x in steps],
            "mfu": [x.get("mfu") for x in steps], "elapsed_s": elapsed, "tokens_per_step": trainer.tokens_per_step,
            "grad_accum": trainer.grad_accum, "n_params": sum(trainer.param_counts[k] for k in (
                "embedding", "trunk", "heads", "unembedding")), "ranks": gathered}, indent=1))
    del trainer
    if ws > 1:
        dist.barrier()


def sharding(model) -> dict:
    """{"gathered": names of the parameters this rank holds whole, "sharded": how many it holds as
    its shard}. FSDP registers a unit's sharded DTensor (sharded over the "dp" mesh dimension, of
    the shard's size) while the unit is resharded, and the gathered parameter (a plain tensor, or
    a TP DTensor without the "dp" dimension) while it is unsharded."""
    import math

    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    gathered, sharded = [], 0
    for name, p in model.named_parameters():
        dims = (p.device_mesh.mesh_dim_names or ()) if isinstance(p, DTensor) else ()
        # (with TP sharding the same dim, FSDP's placement is a strided shard)
        on_dp = "dp" in dims and isinstance(p.placements[dims.index("dp")], (Shard, _StridedShard))
        # FSDP2 shards dim 0: a rank's part has at most ceil(rows / dp) rows
        shard_numel = -(-p.shape[0] // p.device_mesh.size(dims.index("dp"))) * math.prod(p.shape[1:]) if on_dp else 0
        if on_dp and p.to_local().numel() <= shard_numel:
            sharded += 1
        else:
            gathered.append(name)
    return {"gathered": gathered, "sharded": sharded}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    for run in spec["runs"]:
        run_one(run, out)
    from mtp_pretrain.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main()
