"""Model set-up under torchrun for tests/test_meta_init.py and bench/meta_init.py.

    torchrun --nproc-per-node N tests/meta_init_worker.py SPEC.json

SPEC: {"out": dir, "runs": [{"name": str, "overrides": [hydra overrides...], "mode": MODE}]}
MODE:
  init   the Trainer's model set-up (``build_model``); rank 0 saves the gathered full state dict
         to out/<name>.pt
  shard  build on the meta device and shard only (no storage): rank 0 writes every rank's
         local parameter bytes and peak RSS
  step   set-up, then the first step's forward and backward (one micro-batch of synthetic
         tokens, the job's loss, no optimizer; ``"backward": false``: the forward alone);
         rank 0 writes per-head losses, the gradient norm, set-up and step seconds, every rank's
         peak RSS after set-up and after the step
Results go to out/<name>.json. Peak RSS is the process's ``ru_maxrss`` (Linux: KiB), which
includes everything the process ever held (Python, torch, gloo) since it started.
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

faulthandler.enable(all_threads=True)
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def local_bytes(model) -> int:
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
               for p in model.parameters())


def gather_all(obj):
    out = [None] * dist.get_world_size() if dist.is_initialized() else [obj]
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    return out


def run_one(run: dict, out: Path, env) -> None:
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.parallel import build_strategy
    from mtp_pretrain.parallel.materialize import build_model

    cfg = compose_job_config(run["overrides"])
    strategy = build_strategy(cfg.parallel, env, None)
    strategy.validate(cfg.model, seq_len=cfg.data.seq_len)
    log = (lambda msg: print(f"[{run['name']}] {msg}", flush=True)) if env.is_main else (lambda msg: None)
    result: dict = {"name": run["name"], "world_size": env.world_size}
    t0 = time.perf_counter()
    if run["mode"] == "shard":
        from mtp_pretrain.model import MTPTransformer

        with torch.device("meta"):
            model = MTPTransformer(cfg.model)
        model = strategy.parallelize(model)
        result["setup_s"] = time.perf_counter() - t0
        result["all_meta"] = gather_all(all(p.is_meta for p in model.parameters()))
        result["local_param_bytes"] = gather_all(local_bytes(model))
        result["peak_rss_bytes"] = gather_all(peak_rss_bytes())
    else:
        model = build_model(cfg, strategy, env.device, log)
        result["setup_s"] = time.perf_counter() - t0
        result["local_param_bytes"] = gather_all(local_bytes(model))
        result["setup_peak_rss_bytes"] = gather_all(peak_rss_bytes())
    if run["mode"] == "init":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if env.is_main:
            torch.save(full, out / f"{run['name']}.pt")
    if run["mode"] == "step":
        from mtp_pretrain.loss import evaluate_loss, mtp_loss

        n, T, B = cfg.model.n_future, cfg.data.seq_len, cfg.train.micro_batch_size
        # The same tokens on every data-parallel rank, so the loss does not depend on the layout.
        tokens = torch.randint(0, cfg.model.vocab_size, (B, T + n), generator=torch.Generator().manual_seed(7))
        t1 = time.perf_counter()
        if run.get("backward", True):
            hooks = strategy.grad_sync_hooks(model, last_micro_batch=True)
            with strategy.loss_context():
                loss = mtp_loss(cfg.loss.impl, model, tokens, seq_len=T, weights=[1.0] * n,
                                chunk_size=cfg.loss.chunk_size, hooks=hooks)
            strategy.finish_backward(model)
            per_head = torch.stack(loss.per_head).detach().float()
            result["grad_norm"] = float(strategy.clip_grad_norm(model, 0.0))
        else:  # the forward alone (the trainer's validation path): no gradients held
            with torch.no_grad(), strategy.loss_context():
                sums, counts = evaluate_loss(model, tokens, seq_len=T, chunk_size=cfg.loss.chunk_size)
            per_head = torch.stack([s.float() / c for s, c in zip(sums, counts)])
            result["grad_norm"] = None
        result["losses"] = strategy.all_reduce_mean(per_head).tolist()
        result["step_s"] = time.perf_counter() - t1
        result["time_to_first_step_s"] = time.perf_counter() - t0
        result["peak_rss_bytes"] = gather_all(peak_rss_bytes())
    if env.is_main:
        (out / f"{run['name']}.json").write_text(json.dumps(result))
    del model
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    from mtp_pretrain.parallel import destroy_distributed, init_distributed

    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed("cpu", 600)
    try:
        for run in spec["runs"]:
            run_one(run, out, env)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
