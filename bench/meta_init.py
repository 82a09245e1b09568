"""Time to first step and set-up memory: meta-device initialisation vs building on the host.

    .venv/bin/python -m bench.meta_init [--model 1b] [--nproc 2] [--strategy fsdp|tp|fsdp_tp|zero3|megatron]
                                        [--repeats 1] [--no-backward]

Each variant is one ``bench.common.launch`` of this module's worker (``--worker-spec``, mode
``step``) on ``--nproc`` CPU ranks: the Trainer's model set-up (``parallel.meta_init=true``: built
on the meta device, sharded, each rank initialising its own shards; ``false``: the whole model
built and initialised on every rank's host, then sharded), then the first step's forward and
backward (head-sequential loss, one micro-batch of ``--seq-len`` tokens), no optimizer step. Under
``--strategy zero3`` set-up includes ``deepspeed.initialize`` (where the host path partitions).
``--no-backward``: the forward alone (per-head losses). The step ends with the gradient norm,
before ``optimizer.step()``: for 1b on 2 ranks AdamW's state would add 2 x 3.13 GiB per rank,
more than a 24 GB machine has left. Launch start-up (imports, process group) is not counted. Peak
RSS is each rank's ``ru_maxrss`` when the model is built (``build_model``), when set-up ends and
after the step (the whole process lifetime), and its ``VmHWM`` reset just before the step (the
step's own peak: "during the step"). Variants alternate (host, meta, host, meta, ...) so that
machine load hits both alike. Both must give the same losses and gradient norm (same initial
weights, same sharding). Ends with one JSON line.

The worker also serves tests/test_meta_init.py. Its spec (a JSON file):
``{"out": dir, "runs": [{"name": str, "overrides": [hydra overrides...], "mode": MODE}]}``, MODE:

* ``init``: the Trainer's model set-up (``build_model``); rank 0 saves the gathered full state
  dict to out/<name>.pt (``full_state_dict``: DeepSpeed and megatron through their optimizer and
  checkpoint state, ZeRO-3's module partitions also as "module/<name>", pipeline stages merged);
* ``shard``: build on the meta device and shard only (no storage): every rank's local parameter
  bytes and peak RSS;
* ``step``: set-up, then the first step's forward and backward (one micro-batch of synthetic
  tokens, the job's loss, no optimizer; ``"backward": false``: the forward alone): per-head
  losses, the gradient norm, set-up and step seconds, every rank's peak RSS after set-up and
  after the step, its peak during the step (``step_peak_rss_bytes``: None where the kernel does
  not let VmHWM be reset) and its gradient bytes (``local_grad_bytes``).

The launch returns {run name: its figures}. Peak RSS is the process's ``ru_maxrss`` (Linux: KiB),
which includes everything the process ever held (Python, torch, gloo) since it started.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import (add_result_file_arg, launch, print_result, proc_status_bytes, reset_peak_rss,
                          write_result)

GIB = 2**30


# --- the worker: one rank of a launch ------------------------------------------------------------
def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def local_bytes(model, grads: bool = False) -> int:
    """Parameter bytes this rank holds: DTensor shards, ZeRO-3 partitions, else whole tensors;
    ``grads``: the same for the parameters' gradients (``.grad``)."""
    from torch.distributed.tensor import DTensor

    def held(p):
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.to_local() if isinstance(p, DTensor) else p

    tensors = [p.grad for p in model.parameters() if p.grad is not None] if grads else list(model.parameters())
    return sum(held(t).numel() * t.element_size() for t in tensors)


def full_state_dict(model, strategy, cfg) -> dict:
    """{name: full tensor} gathered to every rank. DeepSpeed and megatron: through the optimizer
    they wrap (ZeRO's fp32 master partitions are copied from the module's at its creation) and
    their checkpoint state; ZeRO-3's module partitions are also gathered, under "module/<name>"."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if cfg.parallel.pp_size > 1:  # each rank holds its own stages: their union
        own = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # on every rank
        merged = {}
        for part in gather_all({k: v.detach().cpu() for k, v in own.items()}):
            merged |= part
        return merged
    if cfg.parallel.strategy not in ("deepspeed", "megatron"):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    from mtp_pretrain.optim import build_adamw

    extra = {}
    if cfg.parallel.strategy == "deepspeed" and cfg.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            extra = {f"module/{k}": v.detach().clone().cpu() for k, v in model.named_parameters()}
    optimizer = strategy.build_optimizer(model, lambda m: build_adamw(m, cfg.optim))
    state = strategy.checkpoint_state(model, optimizer)["model"].state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in state.items()} | extra


def gather_all(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_one(run: dict, out: Path, env) -> dict:
    """Set up (and step) one run in this process group; its figures (every rank's, gathered)."""
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.parallel import build_strategy
    from mtp_pretrain.parallel.materialize import build_model

    from mtp_pretrain.train import autocast_dtype

    cfg = compose_job_config(run["overrides"])
    strategy = build_strategy(cfg.parallel, env, autocast_dtype(cfg, env.device))  # as the Trainer
    strategy.validate(cfg.model, seq_len=cfg.data.seq_len)
    messages: list[str] = []

    def log(msg: str) -> None:
        messages.append(msg)
        if env.is_main:
            print(f"[{run['name']}] {msg}", flush=True)

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
        result["built_peak_rss_bytes"] = gather_all(peak_rss_bytes())  # before any engine / optimizer
        if run["mode"] == "step" and cfg.parallel.strategy == "deepspeed":
            # the engine is part of ZeRO's set-up (the host path partitions there) and installs
            # ZeRO-3's parameter-fetching hooks the forward needs
            from mtp_pretrain.optim import build_adamw

            strategy.build_optimizer(model, lambda m: build_adamw(m, cfg.optim))
        result["setup_s"] = time.perf_counter() - t0
        result["built_on_meta"] = gather_all(any("built on the meta device" in m for m in messages))
        result["local_param_bytes"] = gather_all(local_bytes(model))
        result["setup_peak_rss_bytes"] = gather_all(peak_rss_bytes())
    if run["mode"] == "init":
        full = full_state_dict(model, strategy, cfg)
        if env.is_main:
            torch.save(full, out / f"{run['name']}.pt")
    if run["mode"] == "step":
        from mtp_pretrain.loss import evaluate_loss, mtp_loss

        n, T, B = cfg.model.n_future, cfg.data.seq_len, cfg.train.micro_batch_size
        # The same tokens on every data-parallel rank, so the loss does not depend on the layout.
        tokens = torch.randint(0, cfg.model.vocab_size, (B, T + n), generator=torch.Generator().manual_seed(7))
        rss_reset = reset_peak_rss()  # from here VmHWM is the step's own peak
        t1 = time.perf_counter()
        if run.get("backward", True):
            hooks = strategy.grad_sync_hooks(model, last_micro_batch=True)
            with strategy.loss_context():
                loss = mtp_loss(cfg.loss.impl, model, tokens, seq_len=T, weights=[1.0] * n,
                                chunk_size=cfg.loss.chunk_size, hooks=hooks)
            strategy.finish_backward(model)
            per_head = torch.stack(loss.per_head).detach().float()
            result["grad_norm"] = float(strategy.clip_grad_norm(model, 0.0))  # no optimizer step
        else:  # the forward alone (the trainer's validation path): no gradients held
            with torch.no_grad(), strategy.loss_context():
                sums, counts = evaluate_loss(model, tokens, seq_len=T, chunk_size=cfg.loss.chunk_size)
            strategy.release_gathered(model)
            per_head = torch.stack([s.float() / c for s, c in zip(sums, counts)])
            result["grad_norm"] = None
        result["losses"] = strategy.all_reduce_mean(per_head).tolist()
        result["step_s"] = time.perf_counter() - t1
        result["time_to_first_step_s"] = time.perf_counter() - t0
        result["peak_rss_bytes"] = gather_all(peak_rss_bytes())
        result["step_peak_rss_bytes"] = gather_all(proc_status_bytes("VmHWM") if rss_reset else None)
        result["local_grad_bytes"] = gather_all(local_bytes(model, grads=True))
    del model
    dist.barrier()
    return result


def worker(spec_file: str, result_file: str) -> None:
    from mtp_pretrain.parallel import destroy_distributed, init_distributed

    faulthandler.enable(all_threads=True)  # a hung collective shows every thread's stack
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    spec = json.loads(Path(spec_file).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed("cpu", 600)
    try:
        results = {run["name"]: run_one(run, out, env) for run in spec["runs"]}
        write_result(result_file, results, rank=env.rank)
    finally:
        destroy_distributed()


def run_variants(out: Path, nproc: int, runs: list[dict], threads: int | None = None,
                 timeout: float = 3600) -> dict[str, dict]:
    """``runs`` one after another in one launch of ``nproc`` ranks (a process group even for one);
    {run name: its figures}. ``out`` receives the spec and the ``init`` runs' state dicts."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "runs": runs}))
    return launch(__spec__.name, ["--worker-spec", str(spec)], nproc=nproc,
                  threads=threads, timeout=timeout,
                  what=f"meta_init {', '.join(r['name'] for r in runs)} on {nproc} rank(s)")


# --- the measurement -----------------------------------------------------------------------------
STRATEGY_OVERRIDES = {"fsdp": ["parallel=fsdp"], "tp": ["parallel=tp"], "fsdp_tp": ["parallel=fsdp_tp"],
                      "zero3": ["parallel=deepspeed", "parallel.zero_stage=3"], "megatron": ["parallel=megatron"]}


def overrides(args, meta: bool) -> list[str]:
    tp = [f"parallel.tp_size={args.nproc}"] if args.strategy == "megatron" else []
    return [f"model={args.model}", *STRATEGY_OVERRIDES[args.strategy], *tp, f"parallel.meta_init={str(meta).lower()}",
            "train.device=cpu", f"data.seq_len={args.seq_len}", "train.micro_batch_size=1"]


def during_step(r: dict) -> str:
    """A run's peak RSS during its step, the largest rank's."""
    peaks = r["step_peak_rss_bytes"]
    return "n/a (VmHWM not resettable)" if None in peaks else f"{max(peaks) / GIB:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="1b")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--strategy", default="fsdp", choices=sorted(STRATEGY_OVERRIDES),
                    help="zero3: deepspeed at zero_stage 3 (with --no-backward); megatron: tp = --nproc")
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-backward", action="store_true", help="time the first forward only")
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    add_result_file_arg(ap)
    args = ap.parse_args()
    if args.worker_spec:
        return worker(args.worker_spec, args.result_file)
    if args.strategy == "zero3" and not args.no_backward:
        ap.error("--strategy zero3 needs --no-backward (the worker's gradient norm reads whole gradients)")
    from mtp_pretrain.model import count_parameters, model_config

    full_gib = count_parameters(model_config(args.model))["total"] * 4 / GIB
    runs: dict[str, list[dict]] = {"host": [], "meta": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for variant in ("host", "meta"):
                name = f"{variant}_{i}"
                r = run_variants(Path(tmp) / name, args.nproc,
                                 [{"name": name, "mode": "step", "backward": not args.no_backward,
                                   "overrides": overrides(args, variant == "meta")}])[name]
                runs[variant].append(r)
                print(f"{variant:4s} #{i}: set-up {r['setup_s']:.1f}s, first step {r['step_s']:.1f}s, "
                      f"to first step {r['time_to_first_step_s']:.1f}s; peak RSS per rank when the model is "
                      f"built {max(r['built_peak_rss_bytes']) / GIB:.2f} GiB, after set-up "
                      f"{max(r['setup_peak_rss_bytes']) / GIB:.2f} GiB, after the step "
                      f"{max(r['peak_rss_bytes']) / GIB:.2f} GiB, during the step {during_step(r)}; "
                      f"losses {[round(x, 5) for x in r['losses']]}, gradient norm {r['grad_norm']}", flush=True)

    def summary(rs: list[dict]) -> dict:
        return {"setup_s": round(statistics.median(r["setup_s"] for r in rs), 2),
                "first_step_s": round(statistics.median(r["step_s"] for r in rs), 2),
                "time_to_first_step_s": round(statistics.median(r["time_to_first_step_s"] for r in rs), 2),
                "built_peak_rss_gib": round(max(max(r["built_peak_rss_bytes"]) for r in rs) / GIB, 2),
                "setup_peak_rss_gib": round(max(max(r["setup_peak_rss_bytes"]) for r in rs) / GIB, 2),
                "step_peak_rss_gib": round(max(max(r["peak_rss_bytes"]) for r in rs) / GIB, 2),
                "during_step_peak_rss_gib": None if any(None in r["step_peak_rss_bytes"] for r in rs) else
                round(max(max(r["step_peak_rss_bytes"]) for r in rs) / GIB, 2)}

    host, meta = summary(runs["host"]), summary(runs["meta"])
    same = all(r["losses"] == runs["host"][0]["losses"] and r["grad_norm"] == runs["host"][0]["grad_norm"]
               for r in runs["host"] + runs["meta"])
    print_result({"model": args.model, "strategy": args.strategy, "nproc": args.nproc,
                  "first_step": "forward" if args.no_backward else "forward+backward",
                  "full_fp32_gib": round(full_gib, 2), "host": host, "meta": meta,
                  "time_to_first_step_ratio": round(host["time_to_first_step_s"] / meta["time_to_first_step_s"], 2),
                  "same_losses_and_grad_norm": same, "repeats": args.repeats})


if __name__ == "__main__":
    main()
