"""``parallel.compile=true`` vs eager: training step time under fsdp and tp on 2 CPU ranks (gloo,
inductor), the ``tiny`` model shape of the parity test (tests/test_compile.py) scaled up a little.

    .venv/bin/python -m bench.compile_speed [--steps 8] [--dim 256] [--seq 256]

Each (strategy, compile) pair is one torchrun launch of this module as a worker running the real
Trainer on random tokens. Step 1 (and 2: inductor may recompile once for the second micro-batch's
autograd state) are warm-up; the figure is the median wall time of the steps after them. The
variants run alternately, eager then compiled per strategy, so load on a shared machine hits both.
Ends with one JSON line: per strategy, eager and compiled seconds per step and their ratio
(compiled / eager: below 1 means compile pays).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import add_result_file_arg, launch, print_result, write_result

WARMUP_STEPS = 2


def worker(spec_file: str, result_file: str) -> None:
    import torch

    from mtp_pretrain.config import compose_job_config
    from mtp_pretrain.train import Trainer

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(1)
    trainer = Trainer(compose_job_config(spec["overrides"]), Path(spec["out"]))
    trainer.train_iter = iter(trainer.train_stream)
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    write_result(result_file, {"step_s": times}, trainer.env.rank)
    trainer.close()


def run(name: str, overrides: list[str], steps: int, work: Path) -> float:
    spec = work / f"{name}.json"
    spec.write_text(json.dumps({"overrides": overrides, "out": str(work / name), "steps": steps}))
    t0 = time.perf_counter()
    out = launch(__spec__.name, ["--worker-spec", str(spec)], nproc=2, env={"WANDB_MODE": "disabled"}, what=name)
    median = statistics.median(out["step_s"][WARMUP_STEPS:])
    print(f"{name}: median step {median:.3f}s over {steps - WARMUP_STEPS} steps "
          f"(first step {out['step_s'][0]:.1f}s; launch {time.perf_counter() - t0:.0f}s)", flush=True)
    return median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker-spec", help=argparse.SUPPRESS)
    add_result_file_arg(ap)
    ap.add_argument("--steps", type=int, default=8, help="steps per run, the first 2 being warm-up")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    if args.worker_spec:
        return worker(args.worker_spec, args.result_file)
    if args.steps <= WARMUP_STEPS:
        ap.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")

    from mtp_pretrain.data.synthetic import write_random_dataset

    work = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    write_random_dataset(work / "data", {"train": 1_000_000, "val": 10_000}, seed=0, doc_len=1000)
    base = [f"data.sources=[{{path:{work / 'data'},weight:1.0}}]", f"data.seq_len={args.seq}", "data.prefetch=0",
            "model=tiny", f"model.dim={args.dim}", f"model.max_seq_len={args.seq}", "train.micro_batch_size=2",
            f"train.max_steps={args.steps}", "train.dtype=float32", "train.device=cpu", "train.resume=never",
            "logging=quiet", "logging.val_interval=0", "checkpoint.interval=0"]
    result = {}
    for strategy in ("fsdp", "tp"):
        eager = run(f"{strategy}_eager", base + [f"parallel={strategy}"], args.steps, work)
        compiled = run(f"{strategy}_compiled", base + [f"parallel={strategy}", "parallel.compile=true"],
                       args.steps, work)
        result[strategy] = {"eager_step_s": round(eager, 4), "compiled_step_s": round(compiled, 4),
                            "compiled_over_eager": round(compiled / eager, 3)}
    print_result({"bench": "compile_speed", "dim": args.dim, "seq": args.seq, "steps": args.steps, **result},
                 args.result_file)


if __name__ == "__main__":
    main()
