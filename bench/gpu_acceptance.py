"""The GPU checks in one go: on one CUDA GPU, within about 8 minutes, every figure this framework
can only claim with a GPU; one JSON line at the end.

    .venv/bin/python -m bench.gpu_acceptance             # on a machine with a CUDA GPU
    .venv/bin/python -m bench.gpu_acceptance --quick     # on CPU: the CPU-runnable parts, small

Parts (each in its own process, launched by ``bench.common.launch``, each with a time limit):

* ``mfu_1b``: the job's own training step (``Trainer.train_step``) of ``model=1b
  parallel=fsdp train.dtype=bfloat16`` on one rank, random token batches, a few steps:
  tokens/s, MFU (analytic FLOPs per token over the GPU's dense bf16 peak, as the trainer
  logs it) and ``max_memory_allocated``.
* ``loss_memory_128k``: ``bench.loss_memory --vocab 128256 --device cuda`` (naive vs
  head-sequential vs chunked loss memory at a Llama-3 vocabulary).
* ``decode_speed``: ``bench.decode_speed --device cuda`` on random weights of the 1b shape:
  what a speculative pass costs in greedy passes (``pass_cost``) and its pieces; acceptance on
  random weights means nothing.
* ``vs_megatron``: ``bench.vs_megatron`` (this framework's head-sequential step vs
  megatron-core's GPTModel with MTP: memory and time).
* ``plan_vs_measured``: ``mtp-plan``'s prediction for a 1b fsdp step on one rank against
  ``torch.cuda.max_memory_allocated`` of the same step (``mtp_pretrain.plan.measure_step``).

Without CUDA: ``plan_vs_measured`` runs against the CPU allocator's count on a small model and
``decode_speed`` on a random tiny model; the others are listed under ``skipped`` with the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import add_result_file_arg, launch, print_result, write_result

BUDGET_S = 480  # the whole run on one GPU
GPU_ONLY = {
    "mfu_1b": "needs CUDA: MFU is measured against a GPU's bf16 peak (a CPU run's MFU says nothing)",
    "loss_memory_128k": "needs CUDA: at vocab 128256 one head's logits are 4 GiB per 8k tokens; "
                        "bench.loss_memory runs smaller shapes on CPU",
    "vs_megatron": "needs CUDA: bench.vs_megatron compares against megatron-core on a GPU",
}


def run(module: str, args: list[str], timeout: float) -> dict:
    """One part: ``python -m module *args`` in a fresh process (its own process group and CUDA
    memory statistics); its result and the seconds it took."""
    t0 = time.perf_counter()
    out = launch(module, args, threads=None, timeout=timeout, what=f"gpu_acceptance: {module} {' '.join(args)}")
    return {"seconds": round(time.perf_counter() - t0, 1), **out}


def one_rank_env(cuda: bool):
    """A process group of one rank (FSDP needs one) and its DistEnv."""
    import torch.distributed as dist

    from mtp_pretrain.parallel.setup import DistEnv

    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    if cuda:
        torch.cuda.set_device(0)
    return DistEnv(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"), backend)


def mfu_1b(steps: int = 8) -> dict:
    """The job's own step (``Trainer.train_step`` through ``plan.StepOnlyTrainer``: the 1b model,
    FSDP on one rank, bf16 autocast, the head-sequential loss, AdamW) on random token batches:
    no data files and no end-of-run checkpoint (1b's would be ~27 GB)."""
    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.flops import device_peak_flops, training_flops_per_token
    from mtp_pretrain.plan import Emulation, StepOnlyTrainer

    seq, micro = 2048, 2
    cfg = compose_job_config(["model=1b", "parallel=fsdp", "train.dtype=bfloat16", f"data.seq_len={seq}",
                              f"train.micro_batch_size={micro}", "logging=quiet"])
    env = one_rank_env(cuda=True)
    trainer = StepOnlyTrainer(cfg, env, Emulation.for_device(cfg, "h100-80gb"), fake=False)
    trainer.set_up(trainer.build_model())
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        trainer.train_step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[1:])[len(times[1:]) // 2]  # median; the first step pays for warm-up
    tokens_per_s = micro * seq / step_s
    peak = device_peak_flops(env.device)
    return {"tokens_per_s": round(tokens_per_s), "step_s": round(step_s, 4), "steps": steps,
            "mfu": round(tokens_per_s * training_flops_per_token(cfg.model, seq) / peak, 4) if peak else None,
            "peak_flops": peak, "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
            "seq_len": seq, "micro_batch_size": micro}


def decode_speed(tmp: Path, timeout: float, cuda: bool) -> dict:
    prompts = tmp / "prompts.jsonl"
    gen = torch.Generator().manual_seed(0)
    prompts.write_text("".join(json.dumps({"ids": torch.randint(0, 256, (64,), generator=gen).tolist()}) + "\n"
                               for _ in range(4)))
    size = "1b" if cuda else "tiny"
    return run("bench.decode_speed", ["--random-init", "--model-size", size, "--prompts", str(prompts),
                                      "--max-new-tokens", "64" if cuda else "16", "--batch-sizes", "1", "--no-tree",
                                      "--repeats", "1", "--device", "cuda" if cuda else "cpu"], timeout)


def plan_vs_measured(cuda: bool, quick: bool) -> dict:
    """mtp-plan's prediction, then the same step for real on one rank."""
    import torch.distributed as dist

    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.plan import measure_step, plan_step

    if cuda:
        name = torch.cuda.get_device_name(0).lower()
        device = next((k for k in ("h200", "h100-80gb", "a100-80gb", "a100-40gb", "l40s")
                       if k.split("-")[0] in name), "h100-80gb")
        overrides = ["model=1b", "parallel=fsdp", "data.seq_len=2048", "train.micro_batch_size=1"]
    else:
        device = "cpu"
        overrides = ["model=tiny", "parallel=fsdp", "data.seq_len=32", "train.micro_batch_size=1",
                     "train.dtype=float32"] if quick else ["model=small", "parallel=fsdp", "data.seq_len=128",
                                                           "train.micro_batch_size=2", "train.dtype=float32"]
    cfg = compose_job_config(overrides + ["logging=quiet"])
    t0 = time.perf_counter()
    predicted = plan_step(cfg, 1, device)
    plan_s = time.perf_counter() - t0
    env = one_rank_env(cuda)
    try:
        measured = measure_step(cfg, env, device=device)
    finally:
        dist.destroy_process_group()
    err = (predicted.predicted - measured["peak"]) / measured["peak"]
    return {"config": " ".join(overrides), "plan_device": device, "plan_s": round(plan_s, 1),
            "predicted_gib": round(predicted.predicted / 2 ** 30, 3), "measured_gib": round(measured["peak"] / 2 ** 30, 3),
            "rel_error": round(err, 4), "predicted_before_step_gib": round(predicted.before_step / 2 ** 30, 3),
            "measured_before_step_gib": round(measured["before_step"] / 2 ** 30, 3),
            "predicted_set_up_peak_gib": round(predicted.set_up_peak / 2 ** 30, 3),
            "measured_set_up_peak_gib": (round(measured["set_up_peak"] / 2 ** 30, 3) if "set_up_peak" in measured
                                         else None),
            "measure": "torch.cuda.max_memory_allocated" if cuda else "CPU allocator total (torch profiler)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smallest shapes (CPU smoke test)")
    ap.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    ap.add_argument("--child", choices=["mfu_1b", "plan_vs_measured"], help=argparse.SUPPRESS)
    add_result_file_arg(ap)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.child:  # a fresh process per part: its own process group and CUDA memory statistics
        write_result(args.result_file, mfu_1b() if args.child == "mfu_1b" else plan_vs_measured(cuda, args.quick))
        return 0
    t_start = time.perf_counter()
    parts = ["plan_vs_measured", "decode_speed", "mfu_1b", "loss_memory_128k", "vs_megatron"]
    chosen = [p for p in parts if not args.only or p in args.only.split(",")]
    result = {"bench": "gpu_acceptance", "cuda": cuda,
              "device": torch.cuda.get_device_name(0) if cuda else "cpu", "results": {}, "skipped": {}, "errors": {}}
    print(f"gpu acceptance on {result['device']}: {', '.join(chosen)} (budget {BUDGET_S}s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="mtp_gpu_acc_") as tmp_dir:
        tmp = Path(tmp_dir)
        for part in chosen:
            if not cuda and part in GPU_ONLY:
                result["skipped"][part] = GPU_ONLY[part]
                print(f"  {part}: skipped ({GPU_ONLY[part]})", flush=True)
                continue
            left = BUDGET_S - (time.perf_counter() - t_start)
            if left < 20:
                result["skipped"][part] = f"time budget of {BUDGET_S}s spent"
                continue
            t0 = time.perf_counter()
            try:
                if part in ("plan_vs_measured", "mfu_1b"):
                    out = run(__spec__.name, ["--child", part] + (["--quick"] if args.quick else []), min(left, 180))
                elif part == "decode_speed":
                    out = decode_speed(tmp, min(left, 120), cuda)
                elif part == "loss_memory_128k":
                    out = run("bench.loss_memory", ["--vocab", "128256", "--device", "cuda", "--pairs", "2"],
                              min(left, 120))
                else:
                    out = run("bench.vs_megatron", ["--steps", "3", "--warmup", "1"], min(left, 150))
                result["results"][part] = out
                print(f"  {part}: done in {time.perf_counter() - t0:.0f}s", flush=True)
            except Exception as e:  # noqa: BLE001 - one failing part must not hide the others' figures
                result["errors"][part] = f"{type(e).__name__}: {str(e)[-1500:]}"
                print(f"  {part}: FAILED ({type(e).__name__}) after {time.perf_counter() - t0:.0f}s", flush=True)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    print_result(result, args.result_file)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
